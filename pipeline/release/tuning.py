"""sampling_preset and `kiln tune`: sampler values for the shipped GGUF, tuned by an Optuna study.

A trial is one set of llama.cpp sampler values (temperature, top_p, top_k, min_p,
repeat_penalty, max_tokens) used to complete every held-out item: the last `tune.problems`
HumanEval problems, scored in the sandbox like eval_report's (`objective: humaneval`, pass@1),
or lines of held-out code from the validation split, judged by exact match
(`objective: kiln_next_line`) or by the share of the line written right before the first wrong
character (`kiln_next_line_prefix`, a graded score: on a model too small to pass a HumanEval
problem every trial scores 0 on pass@1, and "best" would be the fastest trial plus noise). The
study maximises the score with a TPE sampler and prunes trials that trail the median halfway
through. Greedy decoding is measured first on the same items, in the same study: tokens
generated per second must stay above `tune.min_speed_share` of greedy's (and above
`tune.min_tokens_per_s`), a constraint that TPE learns from; a trial that falls below it halfway
through is pruned.

The best feasible trial is an in-sample maximum over the trials. So it is scored again, beside
greedy, on a fresh slice of items no trial saw (`fresh_items`); unless it beats greedy there by
more than the standard error of their paired difference, `greedy`'s values ship as `code` and the
summary says why (`untuned`; the registered version is tagged `preset_untuned`). The presets are
written with the hand-written `greedy` and `balanced` into the version's presets.json.

The study lives in Optuna's RDB storage (sqlite beside the presets, or `tune.storage`), named
after the GGUF's hash and the settings that change what a trial measures: running again on the
same file resumes it (finished trials are kept, a trial cut off by a kill is run again once),
and several `kiln tune` processes on one storage URL share the work. `optuna-dashboard URL`
shows it live.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.config import TuneSettings
from pipeline.errors import KilnError
from pipeline.io import sha256, write_json

PARAMS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens")
TUNED = "code"  # the name the best trial's preset ships under
HAND_WRITTEN = ("greedy", "balanced")  # presets/*.yaml shipped beside it in presets.json
TUNED_QUANT = "Q4_K_M"  # the file kiln serve serves by default, so the one tuned
N_CTX = 1024

Say = Callable[[str], None]


@dataclass(frozen=True)
class Item:
    """One held-out thing to complete: the text the model continues, where a completion stops,
    and the judge of the generated text."""

    prompt: str
    stop: tuple[str, ...]
    judge: Callable[[str], float]  # 1 (or True) right, 0 wrong; a graded objective in between


def heldout_items(
    objective: str, n: int, validation: list[dict], timeout: float = 5.0, unsafe=False, fresh: bool = False
) -> list[Item]:
    """The items a trial completes for `objective`; `fresh`: the next `n` after them, which no
    trial sees (the chosen preset is checked on them against greedy)."""
    if objective == "humaneval":
        return _humaneval_items(n, timeout, unsafe, fresh)
    if objective in ("kiln_next_line", "kiln_next_line_prefix"):
        return _next_line_items(n, validation, graded=objective == "kiln_next_line_prefix", fresh=fresh)
    raise KilnError(f"tune.objective: unknown objective {objective!r} (known: humaneval, kiln_next_line, ...)")


def _humaneval_items(n: int, timeout: float, unsafe: bool, fresh: bool = False) -> list[Item]:
    """The last `n` problems (fresh: the `n` before them): eval_report scores the first ones, so
    these stay out of its figures unless the profile evaluates (nearly) all 164."""
    from pipeline.eval.humaneval import STOP_SEQUENCES, problems, splice, truncate
    from pipeline.eval.sandbox import check_available, run_tests

    if not unsafe:
        check_available()  # refuse before a single trial generates what it could not score
    table = problems()

    def judge_of(p: dict) -> Callable[[str], bool]:
        def judge(text: str) -> bool:
            completion = splice(p["prompt"], truncate(text))
            return run_tests(p["prompt"], completion, p["test"], p["entry_point"], timeout, unsafe=unsafe).passed

        return judge

    ids = list(table)[-2 * n : -n] if fresh else list(table)[-n:]
    return [Item(table[t]["prompt"], tuple(STOP_SEQUENCES), judge_of(table[t])) for t in ids]


def prefix_share(written: str, gold: str) -> float:
    """The share of `gold` written before the first wrong character (1.0: the whole line)."""
    n = 0
    while n < min(len(written), len(gold)) and written[n] == gold[n]:
        n += 1
    return n / max(len(gold), 1)


def _next_line_items(n: int, validation: list[dict], graded: bool = False, fresh: bool = False) -> list[Item]:
    """kiln_next_line's rows (lm_tasks): up to 12 lines of held-out code; right when the first
    generated line is the file's next line (`graded`: the share of it written right)."""
    from pipeline.eval.lm_tasks import next_line_rows

    rows = next_line_rows(validation, 2 * n)[n:] if fresh else next_line_rows(validation, n)
    if not rows:
        raise KilnError("tune.objective kiln_next_line: the validation split holds no lines of code to complete")

    def first_line(text: str) -> str:
        return (text.lstrip("\n").split("\n") or [""])[0].strip()

    def judge_of(gold: str) -> Callable[[str], float]:
        if graded:
            return lambda text: prefix_share(first_line(text), gold.strip())
        return lambda text: first_line(text) == gold.strip()

    return [Item(r["query"], (), judge_of(r["choices"][r["gold"]])) for r in rows]


def sampler_values(trial, settings: TuneSettings) -> dict:
    """One trial's sampler values: searched ranges from the trial, fixed ones as given, the
    rest at the default preset's."""
    from pipeline.presets import Preset

    values = {k: getattr(Preset(), k) for k in PARAMS}
    for name, r in dataclasses.asdict(settings.space).items():
        if len(r) == 1 or (len(r) == 2 and r[0] == r[1]):
            values[name] = r[0]
        elif len(r) == 2 and name in ("top_k", "max_tokens"):
            values[name] = trial.suggest_int(name, int(r[0]), int(r[1]))
        elif len(r) == 2:
            values[name] = trial.suggest_float(name, float(r[0]), float(r[1]))
    return values


def complete_all(llm, items: list[Item], values: dict, seed: int, step: Callable | None = None) -> dict:
    """Complete every item with the sampler `values`: the share judged right and the tokens
    generated per second (sampling and decoding: each completion's wall time less llama.cpp's
    own count of its prompt time, which depends on the prompt, not on the sampler).
    `step(i, score, tps)` sees the running figures after each item and may raise optuna.TrialPruned."""
    import llama_cpp

    from pipeline.eval.humaneval import fit_prompt, gguf_prompt_ids
    from pipeline.gguf import usable_context

    right, tokens, seconds, scores = 0.0, 0, 0.0, []
    for i, item in enumerate(items):
        # the prompt keeps its end so that it and the answer fit the trained context
        ids, _ = fit_prompt(gguf_prompt_ids(llm, item.prompt), max(usable_context(llm) - values["max_tokens"], 1))
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        out = llm.create_completion(
            ids, max_tokens=values["max_tokens"], temperature=values["temperature"], top_p=values["top_p"],
            top_k=values["top_k"], min_p=values["min_p"], repeat_penalty=values["repeat_penalty"],
            stop=list(item.stop), seed=seed + i,
        )  # fmt: skip
        prompt_s = llama_cpp.llama_perf_context(llm.ctx).t_p_eval_ms / 1000
        seconds += max(time.perf_counter() - start - prompt_s, 1e-6)
        tokens += out["usage"]["completion_tokens"]
        scores.append(float(item.judge(out["choices"][0]["text"])))
        right += scores[-1]
        if step:
            step(i, right / (i + 1), tokens / seconds)
    tps = tokens / seconds if seconds else 0.0
    return {"objective": right / len(items), "tokens_per_s": tps, "tokens": tokens, "scores": scores}


def study_name(gguf: Path, settings: TuneSettings) -> str:
    """The GGUF's hash and every setting that changes what a trial measures: the same file and
    settings resume the same study; anything else starts a new one."""
    measured = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("trials", "timeout", "storage")}
    digest = hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:8]
    return f"{Path(gguf).stem}-{settings.objective}-{sha256(Path(gguf))[:12]}-{digest}"


def shown_url(url: str) -> str:
    """A storage URL with its password hidden, for logs, metadata and the dashboard command."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: optuna names the problem when it opens it
        return url


def open_study(storage: str, name: str, settings: TuneSettings, heartbeat_s: int = 10):
    """The study `name` in `storage`, created or loaded. A trial whose process died stops beating
    and is failed after 2 heartbeats, then run again once with the same values. Each trial's values
    are drawn by a sampler seeded with the seed plus the trial's number (`seeded_sampler`), so a
    resumed run draws new values instead of the first run's again, workers sharing the study draw
    different ones, and the same history always gives the same next values."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # kiln says per trial what it did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are stable enough
    try:
        rdb = _rdb_storage(lambda: RDBStorage(
            storage, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        ))  # fmt: skip
        held = len(optuna.load_study(study_name=name, storage=rdb).trials) if _exists(rdb, name) else 0
    except (ImportError, ValueError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise KilnError(f"tune.storage {shown_url(storage)}: cannot open ({str(exc).splitlines()[0][:200]})") from None
    sampler = seeded_sampler(settings, held)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=max(1, settings.problems // 2))
    study = optuna.create_study(
        storage=rdb, study_name=name, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
    )
    _fail_unstarted(study, rdb, 2 * heartbeat_s)
    return study


def seeded_sampler(settings: TuneSettings, number: int):
    """TPE seeded for trial `number`. Each trial reseeds the study's sampler with its own number, which
    the storage hands out once across every worker: workers that start together on one study draw
    different values, and one worker's study draws the same values each time it runs."""
    import optuna

    return optuna.samplers.TPESampler(seed=settings.seed + number, n_startup_trials=max(2, settings.trials // 3))


def _rdb_storage(open_storage, attempts: int = 3):
    """Optuna's storage, opened by `open_storage`. Workers that open a new database at the same moment
    all create its tables, and all but one lose with a unique-key or "already exists" error; by then
    the tables are there, so the loser opens the storage again."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return open_storage()
        except (IntegrityError, OperationalError, ProgrammingError) as exc:
            lost_the_race = any(w in str(exc).lower() for w in ("unique", "already exists", "duplicate"))
            if not lost_the_race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _fail_unstarted(study, rdb, grace_s: float) -> None:
    """Fail the trials whose process died between creating them and their first heartbeat: Optuna's
    stale check skips a trial that never beat, so it would stay RUNNING for ever. A live trial
    records its values the moment it starts, so one without them past the grace period is dead."""
    import optuna

    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if "values" not in t.user_attrs and (now - t.datetime_start).total_seconds() > grace_s:
            rdb.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def _exists(rdb, name: str) -> bool:
    return any(s.study_name == name for s in rdb.get_all_studies())


def tune(
    gguf: Path, items: list[Item], settings: TuneSettings, storage: str, say: Say = print, heartbeat_s: int = 10,
    progress: bool = True, fresh: list[Item] | None = None,
) -> dict:  # fmt: skip
    """Run (or resume) the study until it holds `settings.trials` finished or pruned trials or
    `settings.timeout` passes; return its summary (`summarize`). With `fresh` items, the best
    trial is checked against greedy on them (`check_on_fresh`)."""
    import optuna
    from tqdm import tqdm

    from pipeline.gguf import check_gguf, load

    check_gguf(Path(gguf))  # a missing or foreign file is one line, before its hash names the study
    if not settings.space.searched():
        raise KilnError("tune.space: nothing to search; give at least one setting a [low, high] range with low < high")
    name = study_name(gguf, settings)
    study = open_study(storage, name, settings, heartbeat_s)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    left = settings.trials - sum(t.state in done for t in study.trials)
    llm = load(Path(gguf), n_ctx=N_CTX, threads=settings.threads)
    try:
        reference = greedy_reference(study, llm, items, settings)
        floor = speed_floor(reference, settings)
        if left > 0:
            greedy = f"greedy {reference['objective']:.3f} at {reference['tokens_per_s']:.0f} tokens/s"
            say(f"study {name}: {left} trial(s) to run on {len(items)} {settings.objective} items; {greedy}, "
                f"floor {floor:.0f}")  # fmt: skip
            with tqdm(total=left, desc="tune", disable=not progress) as bar:

                def after(study, trial) -> None:
                    bar.update(1)
                    say(_trial_line(trial))

                study.optimize(
                    _objective(llm, items, settings, floor), timeout=settings.timeout,
                    callbacks=[optuna.study.MaxTrialsCallback(settings.trials, states=done), after],
                )  # fmt: skip
        summary = summarize(study, storage, settings, len(items))
        if fresh and not summary["untuned"]:
            check_on_fresh(summary, llm, fresh, settings)
    finally:
        llm.close()
    return summary


def greedy_values(settings: TuneSettings) -> dict:
    """The greedy preset's sampler values, at the shortest answer length the study searches."""
    from pipeline.presets import load_presets

    values = {k: load_presets()["greedy"].as_dict()[k] for k in PARAMS}
    if settings.space.max_tokens:
        values["max_tokens"] = int(settings.space.max_tokens[0])
    return values


def greedy_reference(study, llm, items: list[Item], settings: TuneSettings) -> dict:
    """Greedy decoding's score and tokens/s on the study's items, measured once per study (kept
    in it, so a resumed or second worker uses the same reference)."""
    if "greedy" not in study.user_attrs:
        r = complete_all(llm, items, greedy_values(settings), settings.seed)
        study.set_user_attr("greedy", {"objective": r["objective"], "tokens_per_s": r["tokens_per_s"]})
        return study.user_attrs.get("greedy") or {"objective": r["objective"], "tokens_per_s": r["tokens_per_s"]}
    return study.user_attrs["greedy"]


def speed_floor(reference: dict, settings: TuneSettings) -> float:
    """The tokens/s a trial must reach: min_speed_share of greedy's, and min_tokens_per_s."""
    return max(settings.min_tokens_per_s, settings.min_speed_share * reference["tokens_per_s"])


def check_on_fresh(summary: dict, llm, fresh: list[Item], settings: TuneSettings) -> None:
    """Score the best trial's values and greedy's on `fresh` items (none of which chose the
    best); unless the best beats greedy by more than the standard error of their per-item
    differences, ship greedy's values as `code` and say why in `untuned`."""
    import statistics

    best = complete_all(llm, fresh, summary["best"]["values"], settings.seed)
    greedy = complete_all(llm, fresh, greedy_values(settings), settings.seed)
    diffs = [b - g for b, g in zip(best["scores"], greedy["scores"], strict=True)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    summary["fresh"] = {
        "items": len(fresh), "code": best["objective"], "greedy": greedy["objective"], "difference": mean,
        "stderr": se, "code_tokens_per_s": best["tokens_per_s"], "greedy_tokens_per_s": greedy["tokens_per_s"],
    }  # fmt: skip
    if mean > se:
        summary["untuned"] = None
        return
    summary["untuned"] = (
        f"trial {summary['best']['number']} did not beat greedy beyond the standard error on {len(fresh)} fresh "
        f"items ({settings.objective} {best['objective']:.3f} vs {greedy['objective']:.3f}, difference "
        f"{mean:+.3f} ± {se:.3f}): code ships greedy's values"
    )
    summary["presets"][TUNED] = dict(summary["presets"]["greedy"])


def _objective(llm, items: list[Item], settings: TuneSettings, floor: float):
    import optuna

    warmup = max(1, len(items) // 2)

    def objective(trial) -> float:
        trial.study.sampler = seeded_sampler(settings, trial.number)  # before the values are drawn
        values = sampler_values(trial, settings)
        trial.set_user_attr("values", values)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it, in a shared study

        def step(i: int, score: float, tps: float) -> None:
            trial.report(score, i)
            trial.set_user_attr("tokens_per_s", tps)
            if i + 1 >= warmup and tps < floor:
                trial.set_constraint("tokens_per_s", floor - tps)
                raise optuna.TrialPruned(f"{tps:.1f} tokens/s is under the floor {floor:g}")
            if trial.should_prune():
                raise optuna.TrialPruned(f"{score:.3f} after {i + 1} items trails the median")

        result = complete_all(llm, items, values, settings.seed + 1000 * trial.number, step)
        trial.set_user_attr("tokens_per_s", result["tokens_per_s"])
        trial.set_constraint("tokens_per_s", floor - result["tokens_per_s"])  # feasible at <= 0: TPE learns the floor
        return result["objective"]

    return objective


def _trial_line(t) -> str:
    tps = t.user_attrs.get("tokens_per_s", 0.0)
    value = "" if t.value is None else f" {t.value:.3f}"  # a pruned trial's is its score when it stopped
    shown = ", ".join(f"{k}={v:.3g}" for k, v in t.params.items())
    return f"trial {t.number}: {t.state.name.lower()}{value}, {tps:.0f} tokens/s ({shown})"


def summarize(study, storage: str, settings: TuneSettings, items: int) -> dict:
    """Every trial, the best feasible one, the parameter importances, the presets. With no
    feasible trial (none finished, or none met the latency floor) `code` is greedy's values and
    `untuned` says why."""
    import optuna

    from pipeline.presets import Preset, load_presets

    trials = [_trial_row(t) for t in study.trials]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    where = f"study {study.study_name} in {shown_url(storage)}"
    reference = study.user_attrs.get("greedy", {"objective": None, "tokens_per_s": 0.0})
    floor = speed_floor(reference, settings)
    feasible = [t for t in complete if t["tokens_per_s"] >= floor]
    untuned = None
    if feasible:  # ties (common on a small model whose scores are often 0) go to the faster, then the earlier trial
        best = max(feasible, key=lambda t: (t["value"], t["tokens_per_s"], -t["number"]))
    else:  # a busy machine or a short timeout: greedy ships as code, and the version says why
        counts = ", ".join(f"{sum(t['state'] == s for t in trials)} {s.lower()}" for s in ("PRUNED", "FAIL", "RUNNING"))
        fastest = max((t["tokens_per_s"] for t in complete), default=0.0)
        untuned = (
            f"no trial qualified: {len(complete)} completed ({counts}), none at the floor of {floor:.1f} tokens/s "
            f"(fastest {fastest:.1f}; tune.min_tokens_per_s {settings.min_tokens_per_s:g}, tune.min_speed_share "
            f"{settings.min_speed_share:g} of greedy's): code ships greedy's values"
        )
        best = {"number": None, "state": "GREEDY", "value": reference["objective"],
                "tokens_per_s": reference["tokens_per_s"], "values": greedy_values(settings)}  # fmt: skip
    searched = list(settings.space.searched())
    try:
        with warnings.catch_warnings():  # "importances will be equal" when every score is the same: they are
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study, params=searched)
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few finished trials, or nothing varied
        importances = {}
    try:
        code = Preset(**{**Preset().as_dict(), **best["values"]})
    except ValueError as exc:  # e.g. a fixed max_tokens beyond the preset's context size
        raise KilnError(f"{where}: trial {best['number']}'s values make no valid preset ({exc})") from None
    hand = load_presets()
    if untuned:
        code = hand["greedy"]  # as check_on_fresh ships it when greedy is not beaten
    return {
        "study": study.study_name,
        "storage": shown_url(storage),
        "dashboard": f"optuna-dashboard {shown_url(storage)}",
        "objective": settings.objective,
        "items": items,
        "min_tokens_per_s": floor,
        "greedy": reference,
        "seed": settings.seed,
        "searched": searched,
        "trials": trials,
        "best": best,
        "importances": {k: float(v) for k, v in importances.items() if v == v},
        "presets": {TUNED: code.as_dict(), **{n: hand[n].as_dict() for n in HAND_WRITTEN}},
        "untuned": untuned,
    }


def _trial_row(t) -> dict:
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "tokens_per_s": t.user_attrs.get("tokens_per_s", 0.0),
        "values": t.user_attrs.get("values", {}),
        "params": t.params,
        "seconds": seconds,
    }


def build_sampling_preset(layout, profile, say: Say = print) -> dict:
    """The sampling_preset stage: tune the profile's shipped GGUF on its objective (resuming the
    study in `tune.storage` or the work folder), write presets.json and study.json."""
    from pipeline.data.clean import read_split

    s = profile.tune
    validation = list(read_split(layout.clean_splits, "validation")) if s.objective.startswith("kiln_") else []
    args = (s.objective, s.problems, validation, profile.eval.timeout, profile.eval.unsafe_sandbox)
    items, fresh = heldout_items(*args), heldout_items(*args, fresh=True)
    storage = s.storage or layout.study_storage
    summary = tune(layout.gguf(TUNED_QUANT), items, s, storage, say=say, progress=False, fresh=fresh)
    write_outputs(summary, layout.presets_json, layout.study_json)
    return summary


def write_outputs(summary: dict, presets_json: Path, study_json: Path) -> None:
    """presets.json (what the gateway reads) and study.json (the whole study), each atomically."""
    write_json(presets_json, summary["presets"])
    write_json(study_json, summary)


TRIAL_CURVES = ("objective", "tokens_per_s", *PARAMS)


def trial_history(summary: dict) -> list[dict]:
    """Each trial as one step of MLflow curves (`sampling_preset.objective`, ...): score, speed, sampler values."""
    return [
        {"step": t["number"], "objective": t["value"], "tokens_per_s": t["tokens_per_s"], **t["values"]}
        for t in summary["trials"]
    ]


def read_summary(study_json: Path) -> dict:
    """sampling_preset's study.json, which registered_model tags the version from."""
    if not Path(study_json).is_file():
        raise KilnError(f"{study_json}: not there yet; materialize sampling_preset before registered_model")
    return json.loads(Path(study_json).read_text(encoding="utf-8"))


def preset_tags(summary: dict) -> dict[str, str]:
    """A registered version's tags for its presets: their names, each one's values, and what the
    tuned one scored."""
    best = summary["best"]
    return {
        "presets": ",".join(sorted(summary["presets"])),
        **{f"preset.{name}": json.dumps(values, sort_keys=True) for name, values in summary["presets"].items()},
        f"preset.{TUNED}.objective": f"{summary['objective']}={best['value']:.6g}",
        f"preset.{TUNED}.tokens_per_s": f"{best['tokens_per_s']:.6g}",
        f"preset.{TUNED}.study": summary["study"],
        # the chosen trial did not beat greedy on fresh items: code is greedy's values
        **({"preset_untuned": summary["untuned"][:250]} if summary.get("untuned") else {}),
    }


def markdown_table(summary: dict) -> str:
    """Every trial: its values, its score and speed; the best one marked."""
    head = "| trial | state | objective | tokens/s | " + " | ".join(PARAMS) + " |"
    lines = [head, "|---:|---|---:|---:|" + "---:|" * len(PARAMS)]
    for t in summary["trials"]:
        mark = " ★" if t["number"] == summary["best"]["number"] else ""
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        cells = [_cell(t["values"].get(c, "")) for c in PARAMS]
        row = [f"{t['number']}{mark}", t["state"].lower(), value, f"{t['tokens_per_s']:.0f}", *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
