"""sft_data and dpo_data: instruction and preference sets, from the clean corpus or the user's files.

By default both are mined from real code: each Python function with a docstring becomes a
request (its signature and docstring) and an answer (the function). Training rows come from the
clean *train* split; held-out rows from the *validation* split's Python files that
`held_for_post_training` reserves (about half of them; kiln's lm-eval tasks use the others), less
any function also found in the train split, so the base model never saw a held-out answer in
pretraining and "held-out" measures what it learned, not what it memorised. A preference pair's
`chosen` is that real function; its `rejected` is the same function with one fault put in
(pipeline/data/negatives.py: a flipped comparison, an integer off by one, a value not returned,
...), never text of another function.
Without a validation split to draw from (and for user files) the held-out rows are drawn by
source document: no file feeds both train.jsonl and eval.jsonl, and a document falls on the same
side in sft_data and dpo_data (at equal eval_share), so the SFT model has not trained on the
functions of the held-out preference pairs; stats.json says where the held-out rows came from.

User files in TRL's standard formats are read too: conversational `messages` JSONL for SFT and
`prompt`/`chosen`/`rejected` JSONL for DPO. A row that does not fit is rejected with its file,
line and reason (written to rejected.jsonl and counted), never skipped silently.

A preference pair teaches only where its two answers differ within the tokens DPO trains on
(dpo.max_length, or the trained context). Pairs are tokenized as TRL's DPOTrainer does (the chat
template over the prompt, then over prompt and answer) and dropped, with their reason counted,
when the prompt alone fills that length or the two answers are the same token for token inside
it (mined and user pairs alike).

Records are written in TRL's conversational prompt-completion form, so that SFTTrainer masks
the prompt out of the loss and DPOTrainer applies the tokenizer's chat template:
    SFT: {"prompt": [user message], "completion": [assistant message]}
    DPO: {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.negatives import corruptions
from pipeline.errors import KilnError
from pipeline.io import atomic_path, write_json, write_jsonl
from pipeline.sources import origin_file

ROLES = ("system", "user", "assistant")


@dataclass
class MinedFunction:
    request: str  # what the user asks for
    answer: str  # the whole function, as written
    signature: str
    body: str  # the function's statements after the docstring
    source: str = ""  # the file it was found in (source_file of its document's id)


@dataclass
class DataStats:
    train: int = 0
    eval: int = 0
    sources: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)  # reason -> rows (malformed, or dropped by the length check)
    corruption_kinds: dict = field(default_factory=dict)  # mined DPO pairs: corruption kind -> pairs
    held_out_from: str = ""  # where the mined held-out rows come from


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


POST_TRAINING_SHARE = 0.5  # of the validation split's Python files: the held-out SFT/DPO rows


def held_for_post_training(doc_id: str) -> bool:
    """Whether a validation document's file holds held-out SFT and DPO rows (about half of the
    Python files, by a hash of the file it was made from); kiln's lm-eval tasks use the others, so
    no function is both a held-out preference pair and a multiple-choice question."""
    return _is_eval(f"validation:{origin_file(doc_id)}", POST_TRAINING_SHARE)


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def source_file(doc_id: str) -> str:
    """The file a document came from: ingest cuts a long file into `id#1`, `id#2`, ... and marks a
    repeated id `id~hash`; every part of one file must fall on the same side of the split."""
    return re.split(r"[#~]", doc_id, maxsplit=1)[0]


def mine_from_corpus(records: Iterable[dict], max_pairs: int | None, seed: int = 0) -> list[MinedFunction]:
    """Up to `max_pairs` (None: all) functions from the Python documents of `records`, in a seeded
    order, each with the file it came from."""
    found = []
    seen: set[str] = set()
    for rec in records:
        if rec.get("lang") != "python":
            continue
        for fn in mine_functions(rec["text"]):
            if fn.answer not in seen:  # the same helper in two files is one example (the first file's)
                seen.add(fn.answer)
                fn.source = source_file(str(rec.get("id", "")))
                found.append(fn)
    random.Random(seed).shuffle(found)
    return found[:max_pairs]


def sft_records(functions: list[MinedFunction]) -> Iterator[dict]:
    for fn in functions:
        yield {"prompt": _user(fn.request), "completion": _assistant(fn.answer)}


PairCheck = Callable[[dict], "str | None"]  # a DPO row -> why it cannot teach (None: it can)


def dpo_records(
    functions: Iterable[MinedFunction], seed: int = 0, check: PairCheck | None = None
) -> Iterator[tuple[MinedFunction, dict | str, str]]:
    """(function, pair or the reason it has none, corruption kind) for each function. chosen: the
    real function; rejected: one of its corruptions, drawn in a seeded order among those that
    pass `check` (the pair differs within the trained length)."""
    rng = random.Random(seed)
    for fn in functions:
        candidates = corruptions(fn.answer)
        rng.shuffle(candidates)
        problem = "no_corruption_applies"
        for wrong in candidates:
            row = {"prompt": _user(fn.request), "chosen": _assistant(fn.answer), "rejected": _assistant(wrong.text)}
            problem = check(row) if check else None
            if problem is None:
                yield fn, row, wrong.kind
                break
            if problem == PROMPT_FILLS:  # no other rejected answer can help
                break
        if problem is not None:
            yield fn, problem, ""


PROMPT_FILLS = "prompt_fills_max_length"
SAME_WITHIN = "identical_within_max_length"


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, row: dict, chat_ids=_chat_ids) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of a conversational DPO row as TRL's DPOTrainer makes
    them: the chat template over the prompt with the assistant's turn opened, and over prompt plus
    answer; each answer starts where the two renderings part."""
    prompt = chat_ids(tokenizer, row["prompt"], True)
    chosen = chat_ids(tokenizer, row["prompt"] + row["chosen"], False)
    rejected = chat_ids(tokenizer, row["prompt"] + row["rejected"], False)
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


def pair_check(tokenizer, max_length: int) -> PairCheck:
    """Why a DPO row cannot teach within `max_length` tokens (DPOTrainer keeps the start of prompt
    plus answer): the prompt fills them, or both answers are the same inside them; None if it can."""

    @functools.lru_cache(maxsize=8)  # a function's prompt and chosen answer, for each candidate rejected
    def cached(text: str, generation_prompt: bool) -> tuple[int, ...]:
        return tuple(_chat_ids(tokenizer, json.loads(text), generation_prompt))

    def chat_ids(_, messages, generation_prompt):
        return list(cached(json.dumps(messages), generation_prompt))

    def check(row: dict) -> str | None:
        prompt, chosen, rejected = encode_pair(tokenizer, row, chat_ids)
        room = max_length - len(prompt)
        if room <= 0:
            return PROMPT_FILLS
        if chosen[:room] == rejected[:room]:
            return SAME_WITHIN
        return None

    return check


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


def read_user_rows(path: Path, kind: str, rejected: list[dict]) -> Iterator[tuple[str, dict]]:
    """(file:line, row) of a user's SFT (`messages`) or DPO (`prompt`/`chosen`/`rejected`) JSONL,
    each row in our form."""
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
                    yield where, {"prompt": msgs[:-1], "completion": msgs[-1:]}
                    continue
            else:
                problem = _dpo_problem(row)
                if problem is None:
                    prompt = row["prompt"] if isinstance(row["prompt"], list) else _user(row["prompt"])
                    yield where, {"prompt": prompt, **{k: _as_answer(row[k]) for k in ("chosen", "rejected")}}
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


def _mined_dpo(functions, max_pairs, seed, check, rejected, kinds) -> list[tuple[str, dict]]:
    """Up to `max_pairs` pairs, trying functions in order until that many pass `check`."""
    rows = []
    for fn, pair, kind in dpo_records(functions, seed, check):
        if isinstance(pair, str):
            rejected.append({"where": f"{fn.source}: {fn.signature.strip()}", "reason": pair})
            continue
        rows.append((fn.source, pair))
        kinds[kind] += 1
        if len(rows) == max_pairs:
            break
    return rows


def _mined_rows(kind, functions, max_pairs, seed, check, rejected, kinds) -> list[tuple[str, dict]]:
    if kind == "sft":
        functions = functions[:max_pairs]
        return [(fn.source, r) for fn, r in zip(functions, sft_records(functions), strict=True)]
    return _mined_dpo(functions, max_pairs, seed, check, rejected, kinds)


def _held_out_rows(kind, train_functions, validation, sizes, seed, check, rejected, kinds):
    """Rows from the validation files reserved for post-training, whose function the train split
    does not hold too (pretraining saw every train document); as many as eval_share of all rows."""
    seen = {fn.answer for fn in train_functions}
    reserved = (r for r in validation if held_for_post_training(str(r.get("id", ""))))
    functions = [fn for fn in mine_from_corpus(reserved, None, seed) if fn.answer not in seen]
    max_pairs, eval_share = sizes
    wanted = max(1, round(max_pairs * eval_share / (1 - eval_share)))
    return _mined_rows(kind, functions, wanted, seed, check, rejected, kinds)


def split_by_source(rows: list[tuple[str, dict]], share: float) -> tuple[list[dict], list[dict], list[str]]:
    """(train, held-out, held-out sources): every row of a source on the same side, about
    `share` of the sources held out; a set with no held-out source still gets its last one."""
    held_keys = {key for key, _ in rows if _is_eval(key, share)}
    if not held_keys and len({key for key, _ in rows}) > 1:
        held_keys = {rows[-1][0]}
    train = [r for key, r in rows if key not in held_keys]
    held = [r for key, r in rows if key in held_keys]
    return train, held, sorted(held_keys)


FEEDBACK_EVAL = "eval_feedback.jsonl"  # dpo_data's held-out pairs from users' judgements (also in eval.jsonl)


def _feedback_rows(
    pairs: list[dict], share: float, max_pairs: int, check: PairCheck | None, rejected: list[dict]
) -> list[tuple[str, dict]]:
    """(prompt key, row) of the newest feedback pairs that pass `check`, at most share x max_pairs."""
    from pipeline.data.feedback import prompt_source

    cap = int(round(share * max_pairs))
    out: list[tuple[str, dict]] = []
    for pair in reversed(pairs):
        if len(out) >= cap:
            break
        row = {k: pair[k] for k in ("prompt", "chosen", "rejected")}
        problem = check(row) if check else None
        if problem is None:
            out.append((prompt_source(row), row))
        else:
            rejected.append({"where": f"feedback {','.join(pair.get('trace_ids', []))}", "reason": problem})
    return out[::-1]


def build_post_data(
    kind: str,
    clean_train: Iterable[dict],
    user_files: list[str],
    out_dir: Path,
    max_pairs: int,
    eval_share: float,
    seed: int = 0,
    check: PairCheck | None = None,
    clean_validation: Iterable[dict] | None = None,
    feedback: list[dict] | None = None,
    feedback_share: float = 0.0,
) -> DataStats:
    """Write `out_dir/{train,eval}.jsonl` (and rejected.jsonl, stats.json, split.json) for kind
    'sft' or 'dpo'. `check` (DPO): pairs it finds a reason against are dropped and counted. With
    `clean_validation`, mined held-out rows come from its files that `held_for_post_training`
    reserves, about eval_share of all rows. `feedback` (DPO): pairs from users' judgements
    (pipeline/data/feedback.py), newest last; up to `feedback_share` x `max_pairs` of them take the
    place of mined pairs, held out by prompt, the held-out ones also written to eval_feedback.jsonl
    (their figures are reported apart)."""
    rows: list[tuple[str, dict]] = []  # (source: the document or the user file's line, row)
    rejected: list[dict] = []
    stats = DataStats()
    kinds: Counter = Counter()
    users = _feedback_rows(feedback or [], feedback_share, max_pairs, check, rejected) if kind == "dpo" else []
    if users:
        stats.sources["feedback_pairs"] = len(users)
        max_pairs -= len(users)
    for f in user_files:
        user = []
        for where, row in read_user_rows(Path(f), kind, rejected):
            problem = check(row) if check else None
            if problem is None:
                user.append((where, row))
            else:
                rejected.append({"where": where, "reason": problem})
        rows += user
        stats.sources[str(f)] = len(user)
    held_mined: list[tuple[str, dict]] = []
    if not user_files:
        functions = mine_from_corpus(clean_train, None, seed)
        mined = _mined_rows(kind, functions, max_pairs, seed, check, rejected, kinds) if max_pairs > 0 else []
        rows += mined
        stats.sources["mined from clean_corpus train split"] = len(mined)
        if clean_validation is not None:
            sizes = (max_pairs, eval_share)
            held_mined = _held_out_rows(kind, functions, clean_validation, sizes, seed, check, rejected, kinds)
            stats.sources["held out, mined from clean_corpus validation split"] = len(held_mined)
    stats.rejected = dict(Counter(r["reason"].split(" (")[0] for r in rejected))
    stats.corruption_kinds = dict(kinds)
    if not rows and not users:
        raise KilnError(f"no usable {kind} rows (rejected: {stats.rejected or 'none'}; sources: {stats.sources})")
    if held_mined:
        train, held = [r for _, r in rows], [r for _, r in held_mined]
        held_sources = sorted({key for key, _ in held_mined})
        stats.held_out_from = "validation split (files reserved for post-training, unseen in pretraining)"
    else:  # a user file's rows: one source per line
        train, held, held_sources = split_by_source(rows, eval_share)
        stats.held_out_from = "files" if user_files else "train split, held out by file (no validation functions)"
    user_train, user_held, user_held_sources = split_by_source(users, eval_share)  # apart: some are held out
    train, held, held_sources = train + user_train, held + user_held, held_sources + user_held_sources
    rows += users
    stats.train, stats.eval = len(train), len(held)
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir()
        for name, part in (("train", train), ("eval", held), ("rejected", rejected)):
            write_jsonl(tmp / f"{name}.jsonl", part)
        if users:
            write_jsonl(tmp / FEEDBACK_EVAL, user_held)
        write_json(tmp / "stats.json", stats.__dict__)
        train_sources = sorted({key for key, _ in rows} - set(held_sources))
        write_json(tmp / "split.json", {"train_sources": train_sources, "eval_sources": held_sources})
    return stats
