"""`kiln compare A B [C...]`: registered versions side by side.

For each version (a number or an alias): its eval figures (the `eval.*` tags, with their standard
errors from the version's eval_report.json), GGUF speed and memory (its benchmark.json), file
sizes, presets, the gate's verdict and aliases. Each later version is compared with the first,
and a figure moved when the difference is larger than the two standard errors combined
(sqrt(se_a² + se_b²)). The standard error of an accuracy is lm-eval's; of a pass@1 the
binomial one over the problems; of a tokens/s the half range of the benchmark's repeats. The
reports are read from the version's stored files and checked against their sha256 tags first.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from urllib.parse import quote

from pipeline.errors import KilnError
from pipeline.release import registry
from pipeline.tracking import client

LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` over a local sqlite store
SPEED = {"tg": 128, "pp": 512}  # named by the lengths measured (shorter within a shorter trained context)


def compare(uri: str, profile: str, which: list[str]) -> dict:
    """The versions `which` names, their figures, and what moved beyond its standard error."""
    if len(which) < 2:
        raise KilnError("compare needs at least two versions (numbers or aliases)")
    versions = [_version(uri, profile, w) for w in which]
    first = versions[0]
    moved = [m for v in versions[1:] for m in _moves(first, v)]
    return {"model": registry.model_name(profile), "versions": versions, "moved": moved, "mlflow": _link(uri, versions)}


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
    }


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
        if se is None and metric.startswith("humaneval.pass_at_1") and problems:
            se = math.sqrt(v * (1 - v) / problems)
        better = "higher" if report.get("higher_is_better", {}).get(metric, "bits_per_byte" not in metric) else "lower"
        out[f"eval.{model}.{metric}"] = {"value": v, "stderr": se, "better": better}
    return out


def _gguf_figures(bench: dict | None) -> dict:
    out = {}
    for quant, r in (bench or {}).get("files", {}).items():
        for test, usual in SPEED.items():
            n = r.get(f"{test}_tokens", usual)  # a version benchmarked before the lengths were recorded: the usual ones
            s, name = r.get(f"{test}_tokens_per_s") or r[f"{test}{n}_tokens_per_s"], f"{test}{n}_tokens_per_s"
            spread = (s["max"] - s["min"]) / 2
            out[f"gguf.{quant}.{name}"] = {"value": s["median"], "stderr": spread, "better": "higher"}
        out[f"gguf.{quant}.time_to_first_token_s"] = {"value": r["time_to_first_token_s"], "better": "lower"}
        for ctx, mb in r.get("peak_rss_mb", {}).get("peak", {}).items():
            out[f"gguf.{quant}.peak_rss_mb_ctx{ctx}"] = {"value": mb, "better": "lower"}
    return out


def _moves(first: dict, other: dict) -> list[dict]:
    """Each figure of `other` that differs from `first`'s by more than their combined standard error."""
    moves = []
    for name, b in other["figures"].items():
        a = first["figures"].get(name)
        if a is None or a.get("stderr") is None or b.get("stderr") is None:
            continue
        delta, se = b["value"] - a["value"], math.hypot(a["stderr"], b["stderr"])
        if abs(delta) > se and delta != 0:
            improved = (delta > 0) == (b["better"] == "higher")
            moves.append({"figure": name, "from_version": first["version"], "version": other["version"],
                          "delta": delta, "stderr": se, "direction": "better" if improved else "worse"})  # fmt: skip
    return moves


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
    from the first, marked * when it is beyond the standard error."""
    versions = result["versions"]
    heads = [f"v{v['version']}" + (f" ({','.join(v['aliases'])})" if v["aliases"] else "") for v in versions]
    moved = {(m["figure"], m["version"]) for m in result["moved"]}
    names = list(dict.fromkeys(n for v in versions for n in v["figures"]))
    rows = [["figure", *heads]]
    for n in names:
        cells = [n]
        for i, v in enumerate(versions):
            f = v["figures"].get(n)
            cells.append(_cell(f, versions[0]["figures"].get(n) if i else None, (n, v["version"]) in moved))
        rows.append(cells)
    rows.append(["gate", *[v["gate"][:60] or "-" for v in versions]])
    for name in sorted({p for v in versions for p in v["presets"]}):
        rows.append([f"preset {name}", *[_preset(v["presets"].get(name)) for v in versions]])
    rows.append(["code preset tuned", *[v["tuned"].get("code.objective", "-") for v in versions]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = ["* moved beyond the combined standard error (against the first version)", f"MLflow: {result['mlflow']}"]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], "", *notes])


def _cell(f: dict | None, ref: dict | None, moved: bool) -> str:
    if f is None:
        return "-"
    text = f"{f['value']:.4g}" + (f" ±{f['stderr']:.2g}" if f.get("stderr") else "")
    if ref is not None and ref["value"] != f["value"]:
        text += f" ({f['value'] - ref['value']:+.3g}{'*' if moved else ''})"
    return text


def _preset(values: dict | None) -> str:
    if not values:
        return "-"
    short = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repeat_penalty": "repeat", "max_tokens": "max"}  # fmt: skip
    return " ".join(f"{name}={values[k]:.3g}" for k, name in short.items() if k in values)
