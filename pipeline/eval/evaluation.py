"""eval_report: base, SFT and DPO (and the shipped GGUF) measured on the same tasks, side by side.

Three kinds of measurement:
- bits per byte on the held-out validation split: total negative log-likelihood in bits over
  the UTF-8 bytes of the text, so models with different tokenizers compare;
- lm-evaluation-harness (`simple_evaluate`, HF backend) on kiln's own tasks, derived from the
  validation split and written as lm-eval task YAML over local JSONL (see `lm_tasks`), plus any
  standard task the profile names whose data can be loaded (offline, most cannot: the report
  says so per task);
- HumanEval pass@k, completions executed in the sandbox.

Metric keys are flat (`kiln_body_choice.acc`, `humaneval.pass_at_1`), the same in the report,
in MLflow and in the registry's tags.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.config import EvalSettings
from pipeline.data.ingest import is_code
from pipeline.data.post_data import held_for_post_training
from pipeline.eval.humaneval import fitting_task_ids, generate, per_task_pass_at_k, score
from pipeline.eval.lm_tasks import CHOICES, KILN_TASKS, write_kiln_tasks
from pipeline.eval.sandbox import check_available
from pipeline.io import atomic_path, model_context, write_json, write_jsonl
from pipeline.train.scoring import bits_per_byte, ratio_stderr
from pipeline.train.tokenizer import texts_of

LOWER_IS_BETTER = {"bits_per_byte", "bits_per_byte.code", "bits_per_byte.en", "bits_per_byte.ko"}
Say = Callable[[str], None]  # where progress lines go (print, or a Dagster log)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _answer_fits(checkpoint: Path, context: int):
    """Whether a choice fits the trained `context` with room for some of its question: lm-eval
    left-truncates the question, but refuses an answer longer than the whole context."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) < context - 1


def task_manager(task_dir: Path, standard: list[str], folders: set[Path] | None = None):
    """lm-eval's task index over kiln's task folder, plus lm-eval's own task `folders` when given,
    else all of them when the profile names `standard` tasks (~14,000 YAML files: 20 s on 2 cores)."""
    from lm_eval.tasks import TaskManager

    if folders:
        return TaskManager(include_path=[*map(str, sorted(folders)), str(task_dir)], include_defaults=False)
    return TaskManager(include_path=str(task_dir), include_defaults=bool(standard))


def _folders_naming(names: list[str]) -> set[Path] | None:
    """The top-level lm-eval task folders with a YAML line naming each of `names` as a task, group
    or tag (or in a list of them); None when some name is in no YAML file."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    lines = {n: re.compile(rf"^\s*(?:-\s*|(?:task|group|tag):\s*)['\"]?{re.escape(n)}['\"]?\s*$", re.M) for n in names}
    found: dict[str, set[Path]] = {n: set() for n in names}
    for yaml_file in root.rglob("*.yaml"):
        text = yaml_file.read_text(encoding="utf-8", errors="replace")
        for name, line in lines.items():
            if name in text and line.search(text):
                found[name].add(root / yaml_file.relative_to(root).parts[0])
    return set().union(*found.values()) if all(found.values()) else None


def loadable(tm, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split standard task names into those whose data loads and those that cannot run here, with why."""
    ok, unavailable = [], {}
    for name in names:
        try:
            tm.load([name])
            ok.append(name)
        except Exception as exc:  # unknown name, no network, missing dataset: each is a reason, not a crash
            unavailable[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return ok, unavailable


def standard_tasks(task_dir: Path, names: list[str]) -> tuple[object, list[str], dict[str, str]]:
    """The task index for kiln's tasks and the standard `names`, the names whose data loads, and
    why the others cannot run. Only the lm-eval folders whose YAML names them are indexed (a text
    search: about a second instead of twenty); every folder when a name is in none of them, or is
    unknown to the narrow index (a group whose tasks live elsewhere), so lm-eval's own verdict stands."""
    folders = _folders_naming(names) if names else None
    tm = task_manager(task_dir, names, folders)
    ok, unavailable = loadable(tm, names)
    if folders is None or not any(why.startswith("KeyError") for why in unavailable.values()):
        return tm, ok, unavailable
    tm = task_manager(task_dir, names)
    return tm, *loadable(tm, names)


def lm_eval_scores(checkpoint: Path, tm, tasks: list[str], limit: int | None, batch_size: int) -> dict:
    """{task: {"scores": {metric: value}, "stderr": {metric: value}, "higher_is_better": {...}, "n": docs}}."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        # max_length: lm-eval left-truncates every request to the trained context, never past it
        model_args={
            "pretrained": str(checkpoint),
            "dtype": "float32",
            "device": _device(),
            "max_length": model_context(checkpoint),
        },
        tasks=tasks,
        task_manager=tm,
        limit=limit,
        batch_size=batch_size,
        log_samples=True,  # each document's result: what a paired comparison of two versions needs
        bootstrap_iters=1000,
    )
    found = {}
    for task, row in out["results"].items():
        scores = {k.split(",")[0]: v for k, v in row.items() if "," in k and "_stderr" not in k}
        stderr = {
            k.split(",")[0].removesuffix("_stderr"): v
            for k, v in row.items()
            if "_stderr," in k and isinstance(v, int | float)
        }
        samples = sorted(out.get("samples", {}).get(task, []), key=lambda d: d["doc_id"])
        found[task] = {
            "scores": scores,
            "stderr": stderr,
            "higher_is_better": out["higher_is_better"].get(task, {}),
            "n": out["n-samples"].get(task, {}).get("effective"),
            "ids": [str(d["doc_id"]) for d in samples],
            "items": {m: [float(d[m]) for d in samples] for m in scores if samples and all(m in d for d in samples)},
        }
    return found


class Report:
    """The report being built: metric values per model, their stderr and direction, times."""

    def __init__(self, models: list[str], settings: EvalSettings):
        self.data: dict = {
            "models": {m: {} for m in models},
            "stderr": {m: {} for m in models},
            "n": {},  # metric -> the items it averages (documents, problems)
            "items": {m: {} for m in models},  # model -> metric -> per-item results, for paired comparisons
            "item_ids": {},  # metric -> the ids of those items, in the same order for every model
            "higher_is_better": {},
            "tasks": {},
            "unavailable": {},
            "seconds": {},
            "settings": dataclasses.asdict(settings),
        }

    def put(
        self, model: str, metric: str, value: float, stderr: float | None = None, higher_is_better=True,
        n: int | None = None,
    ):  # fmt: skip
        self.data["models"][model][metric] = value
        if stderr is not None:
            self.data["stderr"][model][metric] = stderr
        if n is not None:
            self.data["n"][metric] = n
        self.data["higher_is_better"][metric] = higher_is_better

    def items(self, model: str, metric: str, ids: list[str], values: list) -> None:
        """Per-item results of one figure (`values[i]` for item `ids[i]`)."""
        self.data["items"][model][metric] = values
        self.data["item_ids"][metric] = ids

    @contextmanager
    def timed(self, part: str):
        start = time.perf_counter()
        yield
        self.data["seconds"][part] = round(self.data["seconds"].get(part, 0) + time.perf_counter() - start, 2)


def evaluate_all(
    models: dict[str, Path],
    validation: list[dict],
    out: Path,
    s: EvalSettings,
    gguf: tuple[str, Path] | None = None,
    context: int = 512,
    say: Say = print,
) -> dict:
    """Evaluate each HF checkpoint in `models` (name -> folder) and, on HumanEval, the `gguf`
    (name, file); write report.json, report.md, lm-eval task files and HumanEval samples into `out`.
    `context` is the sequence length the models were trained at: bits per byte scores windows of
    it. lm-eval and HumanEval stay within each model's declared (trained) context: lm-eval
    left-truncates longer requests, HumanEval keeps the end of a longer prompt, and the report
    counts the problems whose prompt was cut."""
    out = Path(out)
    report = Report(list(models) + ([gguf[0]] if gguf else []), s)
    report.data["quantized"] = gguf[0] if gguf else None
    report.data["context"] = {name: model_context(path) for name, path in models.items()}
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # per-request chatter; results come back here
    with report.timed("bits_per_byte"):
        _score_bits_per_byte(report, models, validation, s, context, say)
    with report.timed("lm_eval"):
        _score_lm_eval(report, models, validation, out / "lm_eval_tasks", s, say)
    with report.timed("humaneval"):
        if not s.unsafe_sandbox:
            check_available()  # refuse before generating anything it could not score
        runs = {**models, **({gguf[0]: gguf[1]} if gguf else {})}
        room = min(report.data["context"].values(), default=context) - s.max_new_tokens
        ids = _humaneval_ids(next(iter(models.values())), s.humaneval_problems, room) if models and room > 0 else []
        if ids:
            _score_humaneval(report, runs, ids, out / "humaneval", s, say)
        else:
            report.data["humaneval_problems"] = report.data["humaneval_n_scored"] = 0
            report.data["unavailable"]["humaneval"] = (
                f"no problem's prompt fits the trained context with room for {s.max_new_tokens} new tokens"
            )
    write_json(out / "report.json", report.data)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown_table(report.data))
    return report.data


def language_group(lang: str | None) -> str:
    """code, en, ko or other: the languages bits per byte is reported for."""
    if lang and is_code(lang):
        return "code"
    return lang if lang in ("en", "ko") else "other"


def _score_bits_per_byte(
    report: Report, models: dict[str, Path], validation: list[dict], s: EvalSettings, context: int, say: Say
) -> None:
    """Each model's bits per byte on the held-out texts, in windows of the training `context`: over
    all of them and per language (code, English, Korean), each with its standard error over
    documents and its document count; each document's own bits and bytes are kept."""
    texts = list(texts_of(validation, s.bpb_max_bytes))
    records = validation[: len(texts)]
    ids = [str(r.get("id", i)) for i, r in enumerate(records)]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(language_group(r.get("lang")), []).append(i)
    for name, path in models.items():
        r = bits_per_byte(path, texts, s.batch_size, context)
        docs = r["documents"]
        counted = [i for i, (_, n) in enumerate(docs) if n > 0]
        se = ratio_stderr([docs[i][0] for i in counted], [docs[i][1] for i in counted])
        report.put(name, "bits_per_byte", r["bits_per_byte"], se, higher_is_better=False, n=len(counted))
        report.items(name, "bits_per_byte", ids, docs)
        for lang in ("code", "en", "ko"):
            scored = [i for i in groups.get(lang, []) if docs[i][1] > 0]
            if scored:
                bits, n_bytes = [docs[i][0] for i in scored], [docs[i][1] for i in scored]
                value = sum(bits) / sum(n_bytes)
                report.put(name, f"bits_per_byte.{lang}", value, ratio_stderr(bits, n_bytes), False, len(scored))
                report.items(name, f"bits_per_byte.{lang}", [ids[i] for i in scored], [docs[i] for i in scored])
        say(f"{name}: {r['bits_per_byte']:.4f} bits/byte over {r['bytes']:,} held-out bytes")
    report.data["bpb_bytes"] = r["bytes"] if models else 0


def _score_lm_eval(
    report: Report, models: dict[str, Path], validation: list[dict], task_dir: Path, s: EvalSettings, say: Say
) -> None:
    """kiln's tasks written from held-out code into `task_dir`, plus the profile's standard tasks
    whose data loads (the others listed as unavailable), run on each model through lm-eval."""
    data = report.data
    fits = _answer_fits(next(iter(models.values())), min(data["context"].values())) if models else None
    # The validation files that hold the held-out SFT/DPO rows are not questions here too.
    validation = [r for r in validation if not (r.get("lang") == "python" and held_for_post_training(str(r["id"])))]
    written, skipped, left_out = write_kiln_tasks(validation, task_dir, s.lm_eval_limit, fits)
    data["unavailable"].update(skipped)
    data["lm_eval_left_out"] = {t: n for t, n in left_out.items() if n}
    tm, standard, unavailable = standard_tasks(task_dir, s.lm_eval_tasks)
    data["unavailable"].update(unavailable)
    for task, why in unavailable.items():
        say(f"lm-eval task {task} unavailable: {why}")
    tasks = [t for t in KILN_TASKS if t in written] + standard
    data["chance"] = {f"{t}.{m}": 1 / CHOICES for t in written for m in ("acc", "acc_norm")}
    for name, path in models.items():
        scores = lm_eval_scores(path, tm, tasks, s.lm_eval_limit, s.batch_size) if tasks else {}
        for task, r in scores.items():
            data["tasks"][task] = r["n"]
            for metric, value in r["scores"].items():
                better = r["higher_is_better"].get(metric, True)
                report.put(name, f"{task}.{metric}", value, r["stderr"].get(metric), better, r["n"])
                if metric in r["items"]:
                    report.items(name, f"{task}.{metric}", [f"{task}:{i}" for i in r["ids"]], r["items"][metric])
        say(f"{name}: lm-eval {', '.join(tasks)} done")


def _humaneval_ids(checkpoint: Path, limit: int | None, room: int) -> list[str]:
    from transformers import AutoTokenizer

    return fitting_task_ids(AutoTokenizer.from_pretrained(str(checkpoint)), limit, room)


def _score_humaneval(
    report: Report, runs: dict[str, Path], ids: list[str], samples_dir: Path, s: EvalSettings, say: Say
) -> None:
    """HumanEval pass@k of each HF checkpoint or GGUF file in `runs` on the problems `ids` (those
    whose prompt fits), with the standard error over problems; the completions and their results
    go to `samples_dir` as <name>.jsonl and <name>_results.jsonl."""
    report.data["humaneval_problems"] = report.data["humaneval_n_scored"] = len(ids)
    report.data["humaneval_prompts_cut"] = {}
    scored = {}
    # One model's completions run in the sandbox while the next model generates: a sample mostly
    # waits on its sandbox process (start-up, a loop until the timeout), not on the cores.
    with ThreadPoolExecutor(max_workers=1) as scorer:
        for name, path in runs.items():
            samples = generate(
                path, ids, s.humaneval_samples, s.temperature, s.max_new_tokens, batch_size=s.batch_size,
                progress=False,
            )  # fmt: skip
            scored[name] = samples, scorer.submit(score, samples, s.pass_k, s.timeout, unsafe=s.unsafe_sandbox)
    for name, (samples, outcome) in scored.items():
        result, per_sample = outcome.result()
        report.data["humaneval_prompts_cut"][name] = len({r["task_id"] for r in samples if r["prompt_tokens_cut"]})
        write_jsonl(samples_dir / f"{name}.jsonl", samples)
        write_jsonl(samples_dir / f"{name}_results.jsonl", per_sample)
        for k in s.pass_k:
            per_task = per_task_pass_at_k(per_sample, k)
            if f"pass@{k}" in result and per_task:
                values = [per_task[t] for t in ids if t in per_task]
                metric = f"humaneval.pass_at_{k}"
                report.put(name, metric, result[f"pass@{k}"], mean_stderr(values), n=len(values))
                report.items(name, metric, [t for t in ids if t in per_task], values)
        say(f"{name}: HumanEval {result}")


def mean_stderr(values: list[float]) -> float | None:
    """The standard error of a mean over items (sample standard deviation / sqrt n); None under two.
    For 0/1 outcomes (an accuracy, a greedy pass@1) it is sqrt(p(1-p)/(n-1))."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def metric_table(report: dict) -> dict[str, dict[str, float]]:
    """metric -> model -> value, in first-seen order."""
    table: dict[str, dict[str, float]] = {}
    for model, values in report["models"].items():
        for metric, value in values.items():
            table.setdefault(metric, {})[model] = value
    return table


def figure_rows(report: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the report as people read it: each metric with its direction and n, and
    per model its value ± standard error rounded to the standard error's second digit."""
    models = list(report["models"])
    rows = []
    for metric, values in metric_table(report).items():
        arrow = "↓" if not report["higher_is_better"].get(metric, True) else "↑"
        cells = [format_figure(values[m], report["stderr"][m].get(metric)) if m in values else None for m in models]
        rows.append([f"{metric} {arrow}", report.get("n", {}).get(metric), *cells])
    return ["metric", "n", *models], rows


def rounded_metrics(report: dict, models: list[str]) -> dict[str, float]:
    """flat_metrics rounded to their meaningful digits (the standard error's second significant
    digit; 4 decimals without one): what the Dagster UI shows."""
    out = {}
    for key, value in flat_metrics(report, models).items():
        model, metric = key.split(".", 1)
        err = report["stderr"].get(model, {}).get(metric)
        out[key] = float(format_figure(value, err).split(" ")[0]) if isinstance(value, float) else value
    return out


def markdown_table(report: dict) -> str:
    models = list(report["models"])
    lines = ["| metric | n | " + " | ".join(models) + " |", "|---|---:|" + "---:|" * len(models)]
    for metric, values in metric_table(report).items():
        arrow = "↓" if not report["higher_is_better"].get(metric, True) else "↑"
        cells = []
        for m in models:
            if m not in values:
                cells.append("—")
                continue
            cells.append(format_figure(values[m], report["stderr"][m].get(metric)))
        n = report.get("n", {}).get(metric)
        lines.append(f"| {metric} {arrow} | {n if n is not None else '—'} | " + " | ".join(cells) + " |")
    s = report["settings"]
    notes = [
        f"bits per byte over {report.get('bpb_bytes', 0):,} held-out bytes; lm-eval documents per task: "
        + ", ".join(f"{t} {n}" for t, n in report["tasks"].items())
        + f"; kiln tasks have {CHOICES} choices (chance {1 / CHOICES:.2f}), ± is the standard error "
        "(over documents for bits per byte), n the documents or problems it averages",
        f"HumanEval: {report.get('humaneval_problems')} of 164 problems scored (those whose prompt fits the trained "
        f"context with room for the answer), {s['humaneval_samples']} sample(s) each "
        + ("(greedy)" if s["humaneval_samples"] == 1 else f"at temperature {s['temperature']}")
        + f", at most {s['max_new_tokens']} new tokens",
        *_context_notes(report),
        *[f"unavailable: {t} ({why})" for t, why in report["unavailable"].items()],
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _context_notes(report: dict) -> list[str]:
    """What the trained context did to the figures: lm-eval's truncation, HumanEval's cut prompts."""
    contexts = sorted(set(report.get("context", {}).values()))
    if not contexts:
        return []
    cut = report.get("humaneval_prompts_cut", {})
    n = report.get("humaneval_problems")
    words = ", ".join(f"{m} {c} of {n}" for m, c in cut.items())
    left_out = "".join(
        f"; {task}: {k} documents left out, an answer alone longer than the context"
        for task, k in report.get("lm_eval_left_out", {}).items()
    )
    return [
        f"every model is scored within its trained context of {'/'.join(map(str, contexts))} tokens: lm-eval "
        "left-truncates longer requests; HumanEval keeps the end of a prompt that leaves no room for "
        f"max_new_tokens (prompts cut: {words or 'none'}){left_out}"
    ]


def format_figure(value: float, stderr: float | None) -> str:
    """A figure to its meaningful digits: the standard error to two significant digits and the
    value to the same decimal place (4 decimals when there is no standard error)."""
    if not stderr:
        return f"{value:.4f}"
    places = max(0, 1 - math.floor(math.log10(abs(stderr))))
    return f"{value:.{places}f} ± {stderr:.{places}f}"


def flat_metrics(report: dict, models: list[str]) -> dict[str, float]:
    """`model.metric` -> value for the given models: what MLflow and the registry tags carry, with
    `humaneval.n_scored` (the problems pass@k is over) beside each model's pass@k."""
    out = {}
    for m in models:
        for k, v in report["models"].get(m, {}).items():
            out[f"{m}.{k}"] = v
            if k.startswith("humaneval.") and "humaneval_n_scored" in report:
                out[f"{m}.humaneval.n_scored"] = report["humaneval_n_scored"]
    return out


def gate(
    report: dict, shipped: str, production: dict[str, float] | None, max_regression: float, max_score_drop: float,
    quantized: str | None = None,
) -> tuple[bool, list[str]]:  # fmt: skip
    """The eval gate before `candidate`. Against production (its `shipped` metrics): bits per byte
    may worsen by `max_regression` (relative), a score may drop by `max_score_drop` (absolute).
    Within this run: the `quantized` GGUF's scores may trail the HF model's by `max_score_drop`."""
    ours, better = report["models"][shipped], report["higher_is_better"]
    failures, passes = [], []

    def compare(who: str, metric: str, value: float, ref: float, against: str) -> None:
        if not better.get(metric, True):
            ok, limit = value <= ref * (1 + max_regression), f"+{max_regression:.0%}"
        else:
            ok, limit = value >= ref - max_score_drop, f"-{max_score_drop:g}"
        line = f"{who} {metric} {value:.4f} vs {against} {ref:.4f} (allowed {limit})"
        (passes if ok else failures).append(line)

    for metric, value in ours.items():
        # per-language bits per byte are parts of the overall figure, over far fewer documents (a
        # few Korean ones): the overall one gates, the parts are reported
        if production and f"{shipped}.{metric}" in production and not metric.startswith("bits_per_byte."):
            compare(shipped, metric, value, production[f"{shipped}.{metric}"], "production")
    if quantized:
        for metric, value in report["models"].get(quantized, {}).items():
            if metric in ours:
                compare(quantized, metric, value, ours[metric], shipped)
    if production is None:
        passes.append("no production version to compare with")
    elif not any(f"{shipped}.{m}" in production for m in ours):
        passes.append("production has no comparable eval figures")
    return not failures, failures or passes
