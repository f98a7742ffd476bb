"""`kiln compare A B [C...]`: registered versions side by side, and what moved on the evidence.

For each version (a number or an alias): its eval figures (the `eval.*` tags, with their standard
errors and n from the version's eval_report.json), GGUF speed and memory (its benchmark.json),
file sizes, presets, the gate's verdict and aliases. The reports are read from the version's stored
files and checked against their sha256 tags first.

Each later version is compared with the first on paired differences (`pipeline.release.paired`):
both answered the same documents and problems, and eval_report keeps each one's result, so an
accuracy or pass@k is tested by a paired bootstrap over items and bits per byte by a paired
bootstrap over documents; each gets its difference, a 95% interval and a p-value, and is marked
`*` only when the interval excludes 0 and Holm's correction over all the figures tested keeps it
(a 5% chance, over the whole table, of starring a figure that did not move). A version evaluated
before per-item results were kept is shown with a note, not tested. GGUF speed and memory stored
at registration were measured on different days under different load: they are shown, never
starred. When both versions' GGUFs are at hand (a local artifact store), their speed is measured
again here, in turns (A, B, A, B, ...) in one process, and only that paired measurement is tested
(a t-interval over the repeats' differences).

Those paired tests compare two models. Where the registered model holds a seed spread (`kiln seeds`:
each eval figure's standard deviation across re-trains of one recipe), each eval interval also
holds one seed draw per side, so a star says the recipes differ, not only the two models
(`pipeline.release.seed_spread`).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from pipeline.errors import KilnError
from pipeline.release import registry, seed_spread
from pipeline.release.paired import MIN_REPEATS, holm, paired_mean, paired_ratio, paired_t, with_seed_spread
from pipeline.tracking import client

LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` over a local sqlite store
SPEED = {"tg": 128, "pp": 512}  # named by the lengths measured (shorter within a shorter trained context)
STORED_SPEED_NOTE = (
    "GGUF speed and memory stored at registration come from different runs under different machine load: "
    "shown, never starred"
)


def compare(
    uri: str, profile: str, which: list[str], speed_repeats: int = MIN_REPEATS, seeds: list[str] | None = None
) -> dict:
    """The versions `which` names, their figures, each later version's paired tests against the
    first, and what moved. `speed_repeats`: repeats of the interleaved speed measurement when the
    GGUFs are at hand (0: none). `seeds`: re-trains of one recipe whose spread widens the eval
    intervals (None: the spread `kiln seeds` recorded, if any; []: none)."""
    if len(which) < 2:
        raise KilnError("compare needs at least two versions (numbers or aliases)")
    versions = [_version(uri, profile, w) for w in which]
    notes = [STORED_SPEED_NOTE]
    if seeds is None:
        spread = seed_spread.stored(uri, profile)
    else:
        spread = seed_spread.measure(uri, profile, seeds) if seeds else None
    notes.append(_spread_note(spread))
    remeasured = _remeasure(versions, speed_repeats, notes) if speed_repeats else {}
    tests = [t for v in versions[1:] for t in _tests(versions[0], v, remeasured, notes, spread)]
    for v in versions:
        v.pop("ggufs", None)
        for f in v["figures"].values():
            f.pop("items", None)
            f.pop("ids", None)
    return {
        "model": registry.model_name(profile),
        "versions": versions,
        "tests": tests,
        "moved": [t for t in tests if t["moved"]],
        "remeasured": {v: {n: f["value"] for n, f in r.items()} for v, r in remeasured.items()},
        "notes": list(dict.fromkeys(notes)),
        "seed_spread": spread,
        "mlflow": _link(uri, versions),
    }


def _spread_note(spread: dict | None) -> str:
    if spread is None:
        return (
            "no seed spread used: eval intervals compare these two models on the same items; re-trains of one "
            "recipe with other seeds can differ beyond them (`kiln seeds V V V ...` records their spread)"
        )
    return (
        f"eval intervals include the spread of {len(spread['versions'])} re-trains of one recipe with different "
        f"seeds (versions {', '.join(spread['versions'])}): a star says the recipes differ, beyond re-training alone"
    )


def _version(uri: str, profile: str, which: str) -> dict:
    number, tags = registry.resolve(uri, profile, which)
    c, name = client(uri), registry.model_name(profile)
    mv = registry._call(uri, "reading the version", lambda: c.get_model_version(name, number))
    aliases = registry._call(uri, "reading aliases", lambda: c.get_registered_model(name).aliases)
    reports = _reports(uri, mv, tags, ("eval_report.json", "benchmark.json"))
    figures = {**_eval_figures(tags, reports.get("eval_report.json")), **_gguf_figures(reports.get("benchmark.json"))}
    figures.update(
        {f"size.{k[5:]}": {"value": float(v), "better": "lower"} for k, v in tags.items() if k[:5] == "size."}
    )
    tuned = {k.removeprefix("preset."): v for k, v in tags.items() if k.startswith("preset.code.")}
    return {
        "version": number,
        "asked": which,
        "aliases": sorted(a for a, v in aliases.items() if str(v) == number),
        "run_id": mv.run_id,
        "gate": tags.get("gate", ""),
        "presets": {k[7:]: json.loads(v) for k, v in tags.items() if k.startswith("preset.") and k.count(".") == 1},
        "tuned": tuned,
        "figures": figures,
        "ggufs": _local_ggufs(mv.source, tags),
    }


def _local_ggufs(source: str, tags: dict) -> dict[str, Path]:
    """quant -> the version's GGUF file where its artifacts are on this machine (a local store) and
    the file matches its sha256 tag; {} for a remote store."""
    parsed = urlparse(source)
    if parsed.scheme not in ("", "file"):
        return {}
    folder = Path(unquote(parsed.path) if parsed.scheme else source) / "gguf"
    found = {}
    for f in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        digest = tags.get(f"sha256.gguf/{f.name}")
        if digest and registry.sha256(f) == digest:
            found[f.stem.rsplit("-", 1)[-1]] = f
    return found


def _reports(uri: str, mv, tags: dict, names: tuple[str, ...]) -> dict:
    """The version's small JSON reports, each checked against its sha256 tag (a version without
    one, from before it was shipped, simply lacks its figures)."""
    import mlflow.artifacts

    out = {}
    with tempfile.TemporaryDirectory(prefix="kiln-compare-") as tmp:
        for rel in names:
            if f"sha256.{rel}" not in tags:
                continue
            got = registry._call(uri, f"downloading {rel}", lambda rel=rel: mlflow.artifacts.download_artifacts(
                artifact_uri=f"{mv.source}/{rel}", dst_path=tmp, tracking_uri=uri))  # fmt: skip
            if registry.sha256(Path(got)) != tags[f"sha256.{rel}"]:
                raise KilnError(f"{mv.name} version {mv.version}: {rel} does not match its sha256 tag (files changed)")
            out[rel] = json.loads(Path(got).read_text(encoding="utf-8"))
    return out


def _eval_figures(tags: dict, report: dict | None) -> dict:
    report = report or {}
    problems = report.get("humaneval_problems") or 0
    out = {}
    for key, value in tags.items():
        if not key.startswith(registry.EVAL_TAG):
            continue
        model, metric = key.removeprefix(registry.EVAL_TAG).split(".", 1)
        v = float(value)
        se = report.get("stderr", {}).get(model, {}).get(metric)
        if se is None and metric == "humaneval.pass_at_1" and problems:  # not pass_at_10: its own figure
            se = math.sqrt(v * (1 - v) / problems)
        better = "higher" if report.get("higher_is_better", {}).get(metric, "bits_per_byte" not in metric) else "lower"
        figure = {"value": v, "stderr": se, "n": report.get("n", {}).get(metric), "better": better}
        items = report.get("items", {}).get(model, {}).get(metric)
        if items is not None and metric in report.get("item_ids", {}):
            figure.update(items=items, ids=report["item_ids"][metric])
        out[f"eval.{model}.{metric}"] = figure
    return out


def _gguf_figures(bench: dict | None) -> dict:
    """Speed and memory as stored at registration: shown, never tested (see STORED_SPEED_NOTE)."""
    out = {}
    for quant, r in (bench or {}).get("files", {}).items():
        for test, usual in SPEED.items():
            n = r.get(f"{test}_tokens", usual)  # a version benchmarked before the lengths were recorded: the usual ones
            s, name = r.get(f"{test}_tokens_per_s") or r[f"{test}{n}_tokens_per_s"], f"{test}{n}_tokens_per_s"
            out[f"gguf.{quant}.{name}"] = {"value": s["median"], "range": [s["min"], s["max"]], "better": "higher"}
        out[f"gguf.{quant}.time_to_first_token_s"] = {"value": r["time_to_first_token_s"], "better": "lower"}
        for ctx, mb in r.get("peak_rss_mb", {}).get("peak", {}).items():
            out[f"gguf.{quant}.peak_rss_mb_ctx{ctx}"] = {"value": mb, "better": "lower"}
    return out


def _remeasure(versions: list[dict], repeats: int, notes: list[str]) -> dict[str, dict]:
    """version -> figure -> {"value", "repeats", "better"}: each GGUF quant every version has at
    hand, measured again here in turns (A, B, A, B, ...) in one process."""
    from pipeline.release.gguf_bench import interleaved_speed

    quants = set.intersection(*(set(v["ggufs"]) for v in versions))
    if not quants:
        notes.append("speed not measured again: the versions' GGUF files are not all at hand (a remote store)")
        return {}
    out: dict[str, dict] = {v["version"]: {} for v in versions}
    for quant in sorted(quants):
        runs = interleaved_speed({v["version"]: v["ggufs"][quant] for v in versions}, repeats)
        for version, r in runs.items():
            for test in ("pp", "tg"):
                name = f"remeasured.{quant}.{test}{r[f'{test}_tokens']}_tokens_per_s"
                out[version][name] = {"value": sum(r[test]) / repeats, "repeats": r[test], "better": "higher"}
    notes.append(
        f"remeasured.*: measured now, {repeats} repeats in turns (A, B, A, B, ...) in one process; "
        "tested by a t-interval over the repeats' paired differences"
    )
    return out


def _paired(name: str, a: dict, b: dict):
    """The paired test of one figure, or None when either version lacks per-item results."""
    if "repeats" in a and "repeats" in b:
        return paired_t(a["repeats"], b["repeats"])
    if "items" not in a or "items" not in b:
        return None
    where = {i: k for k, i in enumerate(b["ids"])}
    both = [(k, where[i]) for k, i in enumerate(a["ids"]) if i in where]
    if len(both) < 2:
        return None
    xs, ys = [a["items"][k] for k, _ in both], [b["items"][k] for _, k in both]
    return paired_ratio(xs, ys) if isinstance(xs[0], list) else paired_mean(xs, ys)


def _tests(
    first: dict, other: dict, remeasured: dict[str, dict], notes: list[str], spread: dict | None = None
) -> list[dict]:
    """Each figure of `other` tested against `first`'s on paired differences (eval figures widened
    by `spread` where it has them), Holm-corrected over all of them: moved only where the interval
    excludes 0 and Holm keeps it."""
    sd, retrains = (spread["sd"], len(spread["versions"])) if spread else ({}, 0)
    mine = {**other["figures"], **remeasured.get(other["version"], {})}
    theirs = {**first["figures"], **remeasured.get(first["version"], {})}
    found = []
    for name, b in mine.items():
        a = theirs.get(name)
        if a is None or not name.startswith(("eval.", "remeasured.")):
            continue
        result = _paired(name, a, b)
        if result is None:
            if name.startswith("eval.") and "items" in a and "items" in b:
                short = name.removeprefix("eval.")
                notes.append(f"{short}: fewer than 2 items shared by both versions, shown, not tested")
            elif name.startswith("eval."):
                notes.append(
                    f"eval figures without per-item results in version {first['version']} or {other['version']} "
                    "(evaluated before they were kept) are shown, not tested"
                )
            continue
        if name in sd:
            result = with_seed_spread(result, sd[name], retrains)
        found.append((name, a, b, result))
    moved, adjusted = holm([r.p for *_, r in found])
    tests = []
    for (name, _, b, r), keep, p_holm in zip(found, moved, adjusted, strict=True):
        excludes_zero = r.low > 0 or r.high < 0
        tests.append({
            "figure": name, "from_version": first["version"], "version": other["version"], **r.as_dict(),
            "p_holm": p_holm, "moved": bool(keep and excludes_zero),
            "direction": "better" if (r.delta > 0) == (b["better"] == "higher") else "worse",
        })  # fmt: skip
    return tests


def _link(uri: str, versions: list[dict]) -> str:
    """MLflow's own comparison page of the versions' runs."""
    c = client(uri)
    runs = [v["run_id"] for v in versions if v["run_id"]]
    experiments = sorted(
        {registry._call(uri, "reading runs", lambda r=r: c.get_run(r).info.experiment_id) for r in runs}
    )
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{ui}/#/compare-runs?runs={quote(json.dumps(runs))}&experiments={quote(json.dumps(experiments))}"


def table(result: dict) -> str:
    """A text table: one row per figure, one column per version; later versions show their change
    from the first and, where it was tested, its 95% interval, marked * when it moved (the
    interval excludes 0 after Holm's correction over the figures tested)."""
    versions = result["versions"]
    heads = [f"v{v['version']}" + (f" ({','.join(v['aliases'])})" if v["aliases"] else "") for v in versions]
    tested = {(t["figure"], t["version"]): t for t in result.get("tests", [])}
    remeasured = result.get("remeasured", {})
    figures = [
        {**v["figures"], **{n: {"value": x} for n, x in remeasured.get(v["version"], {}).items()}} for v in versions
    ]
    names = list(dict.fromkeys(n for f in figures for n in f))
    rows = [["figure", "n", *heads]]
    for n in names:
        count = next((f[n].get("n") for f in figures if n in f and f[n].get("n") is not None), None)
        cells = [n, "-" if count is None else str(count)]
        for i, v in enumerate(versions):
            ref = figures[0].get(n) if i else None
            cells.append(_cell(figures[i].get(n), ref, tested.get((n, v["version"]))))
        rows.append(cells)
    rows.append(["gate", "", *[v["gate"][:60] or "-" for v in versions]])
    for name in sorted({p for v in versions for p in v["presets"]}):
        rows.append([f"preset {name}", "", *[_preset(v["presets"].get(name)) for v in versions]])
    rows.append(["code preset tuned", "", *[v["tuned"].get("code.objective", "-") for v in versions]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [
        "(change from the first version [95% interval]); * moved: the interval excludes 0 after Holm's correction "
        f"over the {len(tested)} figures tested (paired over the same items)",
        *result.get("notes", []),
        f"MLflow: {result['mlflow']}",
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], "", *notes])


def _cell(f: dict | None, ref: dict | None, test: dict | None) -> str:
    if f is None:
        return "-"
    text = f"{f['value']:.4g}" + (f" ±{f['stderr']:.2g}" if f.get("stderr") else "")
    if test is not None:
        star = "*" if test["moved"] else ""
        text += f" ({test['delta']:+.3g}{star} [{test['low']:+.2g}, {test['high']:+.2g}])"
    elif ref is not None and ref["value"] != f["value"]:
        text += f" ({f['value'] - ref['value']:+.3g})"
    return text


def _preset(values: dict | None) -> str:
    if not values:
        return "-"
    short = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repeat_penalty": "repeat", "max_tokens": "max"}  # fmt: skip
    return " ".join(f"{name}={values[k]:.3g}" for k, name in short.items() if k in values)
