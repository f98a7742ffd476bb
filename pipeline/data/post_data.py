"""sft_data and dpo_data: instruction and preference sets, from the clean corpus or the user's files.

By default both are mined from real code in the clean *train* split (validation documents never
feed them): each Python function with a docstring becomes a request (its signature and
docstring) and an answer (the function). A preference pair's `chosen` is that real function;
its `rejected` is a plausible wrong one: the body of another function under this signature,
or the function cut off halfway.

User files in TRL's standard formats are read too: conversational `messages` JSONL for SFT and
`prompt`/`chosen`/`rejected` JSONL for DPO. A row that does not fit is rejected with its file,
line and reason (written to rejected.jsonl and counted), never skipped silently.

Records are written in TRL's conversational prompt-completion form, so that SFTTrainer masks
the prompt out of the loss and DPOTrainer applies the tokenizer's chat template:
    SFT: {"prompt": [user message], "completion": [assistant message]}
    DPO: {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.io import atomic_path, write_json, write_jsonl

ROLES = ("system", "user", "assistant")


@dataclass
class MinedFunction:
    request: str  # what the user asks for
    answer: str  # the whole function, as written
    signature: str
    body: str  # the function's statements after the docstring


@dataclass
class DataStats:
    train: int = 0
    eval: int = 0
    sources: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)  # reason -> rows


def mine_functions(code: str, min_body_lines: int = 2, max_chars: int = 1500) -> Iterator[MinedFunction]:
    """Functions with a docstring and a real body, from one Python source text."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return
    lines = code.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or node.end_lineno is None:
            continue
        source = textwrap.dedent("\n".join(lines[node.lineno - 1 - len(node.decorator_list) : node.end_lineno]))
        body_start = node.body[1].lineno - node.lineno  # the first statement after the docstring
        body_lines = source.splitlines()[body_start + len(node.decorator_list) :]
        if len(body_lines) < min_body_lines or len(source) > max_chars:
            continue
        header = source.splitlines()[: node.body[0].lineno - node.lineno + len(node.decorator_list)]
        signature = "\n".join(
            ln for ln in header if ln.lstrip().startswith(("def ", "async def ", "@")) or ln.endswith(":")
        )
        request = f"Write a Python function `{signature.strip()}`.\n\n{doc.strip()}"
        yield MinedFunction(request, source.rstrip() + "\n", signature, "\n".join(body_lines))


def _is_eval(key: str, share: float) -> bool:
    return int(hashlib.sha1(f"post:{key}".encode()).hexdigest()[:8], 16) / 2**32 < share


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def mine_from_corpus(records: Iterable[dict], max_pairs: int, seed: int = 0) -> list[MinedFunction]:
    """Up to `max_pairs` functions from the Python documents of `records`, in a seeded order."""
    found = []
    seen: set[str] = set()
    for rec in records:
        if rec.get("lang") != "python":
            continue
        for fn in mine_functions(rec["text"]):
            if fn.answer not in seen:  # the same helper in two files is one example
                seen.add(fn.answer)
                found.append(fn)
    random.Random(seed).shuffle(found)
    return found[:max_pairs]


def sft_records(functions: list[MinedFunction]) -> Iterator[dict]:
    for fn in functions:
        yield {"prompt": _user(fn.request), "completion": _assistant(fn.answer)}


def dpo_records(functions: list[MinedFunction], seed: int = 0) -> Iterator[dict]:
    """chosen: the real function; rejected: another function's body under this signature, or
    the real one cut off halfway (alternating, so both kinds of wrong answer appear)."""
    rng = random.Random(seed)
    for i, fn in enumerate(functions):
        if i % 2 == 0 and len(functions) > 1:
            other = functions[(i + rng.randrange(1, len(functions))) % len(functions)]
            wrong = f"{fn.answer[: fn.answer.index(fn.body)]}{other.body}\n" if fn.body in fn.answer else other.answer
        else:
            lines = fn.answer.splitlines()
            wrong = "\n".join(lines[: max(1, len(lines) // 2)]) + "\n"
        if wrong.strip() != fn.answer.strip():
            yield {"prompt": _user(fn.request), "chosen": _assistant(fn.answer), "rejected": _assistant(wrong)}


def _check_messages(messages, where: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "a message lacks a role or a string content (roles: system, user, assistant)"
    if messages[-1]["role"] != "assistant":
        return "the last message is not the assistant's"
    if not messages[-1]["content"].strip():
        return "the assistant's answer is empty"
    return None


def read_user_rows(path: Path, kind: str, rejected: list[dict]) -> Iterator[dict]:
    """Rows of a user's SFT (`messages`) or DPO (`prompt`/`chosen`/`rejected`) JSONL, in our form."""
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                rejected.append({"where": where, "reason": f"malformed_json ({exc.msg})"})
                continue
            if kind == "sft":
                problem = _check_messages(row.get("messages") if isinstance(row, dict) else None, where)
                if problem is None:
                    msgs = row["messages"]
                    yield {"prompt": msgs[:-1], "completion": msgs[-1:]}
                    continue
            else:
                problem = _dpo_problem(row)
                if problem is None:
                    prompt = row["prompt"] if isinstance(row["prompt"], list) else _user(row["prompt"])
                    yield {"prompt": prompt, **{k: _as_answer(row[k]) for k in ("chosen", "rejected")}}
                    continue
            rejected.append({"where": where, "reason": problem})


def _as_answer(value) -> list[dict]:
    return value if isinstance(value, list) else _assistant(value)


def _dpo_problem(row) -> str | None:
    if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
        return "missing prompt, chosen or rejected"
    for key in ("chosen", "rejected"):
        value = row[key]
        text = value[-1].get("content") if isinstance(value, list) and value and isinstance(value[-1], dict) else value
        if not isinstance(text, str) or not text.strip():
            return f"empty {key}"
    if not (isinstance(row["prompt"], str) and row["prompt"].strip()) and not isinstance(row["prompt"], list):
        return "empty prompt"
    return None


def build_post_data(
    kind: str,
    clean_train: Iterable[dict],
    user_files: list[str],
    out_dir: Path,
    max_pairs: int,
    eval_share: float,
    seed: int = 0,
) -> DataStats:
    """Write `out_dir/{train,eval}.jsonl` (and rejected.jsonl, stats.json) for kind 'sft' or 'dpo'."""
    rows: list[tuple[str, dict]] = []
    rejected: list[dict] = []
    stats = DataStats()
    for f in user_files:
        user = list(read_user_rows(Path(f), kind, rejected))
        rows += [(f"{f}:{i}", r) for i, r in enumerate(user)]
        stats.sources[str(f)] = len(user)
    if not user_files:
        functions = mine_from_corpus(clean_train, max_pairs, seed)
        mined = list(sft_records(functions) if kind == "sft" else dpo_records(functions, seed))
        rows += [(json.dumps(r["prompt"]), r) for r in mined]
        stats.sources["mined from clean_corpus train split"] = len(mined)
    stats.rejected = dict(Counter(r["reason"].split(" (")[0] for r in rejected))
    if not rows:
        raise KilnError(f"no usable {kind} rows (rejected: {stats.rejected or 'none'}; sources: {stats.sources})")
    train = [r for key, r in rows if not _is_eval(key, eval_share)]
    held = [r for key, r in rows if _is_eval(key, eval_share)]
    if not held and len(train) > 1:  # a tiny set still gets one held-out row to measure on
        held = [train.pop()]
    stats.train, stats.eval = len(train), len(held)
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir()
        for name, part in (("train", train), ("eval", held), ("rejected", rejected)):
            write_jsonl(tmp / f"{name}.jsonl", part)
        write_json(tmp / "stats.json", stats.__dict__)
    return stats
