"""kiln's own lm-evaluation-harness tasks, derived from the held-out validation split.

Written as lm-eval task YAML over local JSONL, so `TaskManager(include_path=...)` runs them with
no download:
- kiln_body_choice (multiple choice): a Python function's signature and docstring; which of
  four bodies is its own? The three others are bodies of other held-out functions. acc and
  acc_norm (length-normalized), chance 0.25.
- kiln_next_line (multiple choice): up to 12 lines of held-out code; which of four lines of the
  same file comes next? acc and acc_norm, chance 0.25.
- kiln_next_sentence_ko (multiple choice): up to 3 sentences of held-out Korean prose; which of
  four sentences of the same document comes next? acc and acc_norm, chance 0.25.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.data.ingest import is_code
from pipeline.data.post_data import mine_functions
from pipeline.io import atomic_path, write_jsonl

KILN_TASKS = ("kiln_body_choice", "kiln_next_line", "kiln_next_sentence_ko")
CHOICES = 4
CONTEXT_LINES = 12
CONTEXT_SENTENCES = 3
# A sentence ends at a full stop (Korean prose ends one with "다." and the like) or a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")
MIN_SENTENCE_CHARS = 8


def body_choice_rows(
    records: list[dict], limit: int | None, seed: int = 0, fits: Callable[[str], bool] | None = None
) -> list[dict]:
    """One row per held-out Python function: its own body among bodies of others. With `fits`,
    only functions whose body fits are used, as the answer and as distractors alike (a long body
    drawn as a distractor would otherwise cost every row it lands in)."""
    functions, seen = [], set()
    for r in records:
        if r.get("lang") == "python":
            for fn in mine_functions(r["text"]):
                if fn.body in fn.answer and fn.body not in seen and (fits is None or fits("\n" + fn.body)):
                    seen.add(fn.body)
                    functions.append(fn)
    if len(functions) < CHOICES:
        return []
    rng = random.Random(seed)
    rows = []
    for i, fn in enumerate(functions):
        others = rng.sample([f.body for j, f in enumerate(functions) if j != i], CHOICES - 1)
        choices = [fn.body, *others]
        rng.shuffle(choices)
        query = fn.answer[: fn.answer.index(fn.body)].rstrip("\n")
        rows.append({"query": query, "choices": ["\n" + c for c in choices], "gold": choices.index(fn.body)})
    rng.shuffle(rows)
    return rows[:limit]


def next_line_rows(records: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """Lines of held-out code with up to CONTEXT_LINES lines before them; the distractors are
    other lines of the same file, so only the context tells them apart."""
    candidates = []
    for d, r in enumerate(records):
        if not is_code(r.get("lang", "")):
            continue
        lines = r["text"].splitlines()
        for i in range(1, len(lines)):
            if _substantive(lines[i]):
                candidates.append((d, i))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    rows = []
    for d, i in candidates:
        lines = records[d]["text"].splitlines()
        pool = sorted({ln for ln in lines if _substantive(ln) and ln.strip() != lines[i].strip()})
        if len(pool) < CHOICES - 1:
            continue
        choices = [lines[i], *rng.sample(pool, CHOICES - 1)]
        rng.shuffle(choices)
        context = "\n".join(lines[max(0, i - CONTEXT_LINES) : i])
        rows.append({"query": context, "choices": ["\n" + c for c in choices], "gold": choices.index(lines[i])})
        if limit is not None and len(rows) == limit:
            break
    return rows


def sentences(text: str) -> list[str]:
    return [x.strip() for x in _SENTENCE_END.split(text) if len(x.strip()) >= MIN_SENTENCE_CHARS]


def next_sentence_rows(records: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """Sentences of held-out Korean documents with up to CONTEXT_SENTENCES sentences before them;
    the distractors are other sentences of the same document, so only the context tells them apart."""
    candidates = []
    for r in records:
        if r.get("lang") == "ko":
            found = sentences(r["text"])
            candidates += [(found, i) for i in range(1, len(found))]
    rng = random.Random(seed)
    rng.shuffle(candidates)
    rows = []
    for found, i in candidates:
        pool = sorted(set(found) - {found[i]})
        if len(pool) < CHOICES - 1:
            continue
        choices = [found[i], *rng.sample(pool, CHOICES - 1)]
        rng.shuffle(choices)
        context = " ".join(found[max(0, i - CONTEXT_SENTENCES) : i])
        rows.append({"query": context, "choices": [" " + c for c in choices], "gold": choices.index(found[i])})
        if limit is not None and len(rows) == limit:
            break
    return rows


def _substantive(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 4 and not stripped.startswith("#")


def _task_yaml(name: str, data: Path, cache: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        # The newline opens each choice, not the query: the byte-level BPE merges a newline with
        # the next line's indentation, so a query ending in "\n" would split a token the model
        # never saw split. With no delimiter the two join exactly as in the source.
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def write_kiln_tasks(
    records: list[dict], out: Path, limit: int | None, answer_fits: Callable[[str], bool] | None = None
) -> tuple[dict[str, int], dict[str, str], dict[str, int]]:
    """Write each task's JSONL and YAML into `out` (replaced whole). A document with a choice that
    `answer_fits` refuses (longer than the model's trained context: lm-eval cannot score it) is
    left out before `limit` is applied. Returns (task -> rows written, task -> why it was skipped,
    task -> documents left out)."""
    out = Path(out)
    every = {
        "kiln_body_choice": body_choice_rows(records, None),
        "kiln_next_line": next_line_rows(records, None),
        "kiln_next_sentence_ko": next_sentence_rows(records, None),
    }
    rows = {**every, "kiln_body_choice": body_choice_rows(records, None, fits=answer_fits)}
    left_out = {}
    for name, task_rows in rows.items():
        kept = [r for r in task_rows if answer_fits is None or all(answer_fits(c) for c in r["choices"])]
        left_out[name] = len(every[name]) - len(kept)
        rows[name] = kept[:limit]
    written, skipped = {}, {}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for name, task_rows in rows.items():
            if not task_rows:
                skipped[name] = "too few held-out Python functions, code lines or Korean sentences to build it"
                continue
            write_jsonl(tmp / f"{name}.jsonl", task_rows)
            spec = _task_yaml(name, out / f"{name}.jsonl", out / "cache")
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            written[name] = len(task_rows)
    return written, skipped, left_out
