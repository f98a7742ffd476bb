"""Users' feedback on served answers: how it is stored on MLflow traces, and how it becomes preference pairs.

`kiln serve` records every answer as an MLflow trace in the experiment `kiln-<profile>-serving`
(pipeline/serve/tracing.py); its root span's inputs are the masked request (`{"messages": [...]}`
or `{"prompt": "..."}`) and its outputs `{"text": answer}`. A judgement is stored on the trace as
MLflow assessments, as `mlflow.log_feedback` and `mlflow.log_expectation` store them, but on the
gateway's own tracking store rather than the process-wide one:

    rating            Feedback  "up" | "down" | 1..5, the comment as its rationale
    pairwise          Feedback  "chosen" | "rejected", metadata other_trace_id: a side-by-side pick,
                                stored on both traces
    preferred_answer  Expectation  the answer the user wanted instead

Each judgement also sets the trace tag `kiln_feedback_ms` (when it was given), so the traces with
feedback are found with one search.

`feedback_pairs` turns them into preference pairs (chosen, rejected), each with the trace ids it
came from: a pairwise pick gives (chosen trace's answer, rejected trace's answer); a down-rated
answer with a preferred answer gives (preferred, given); an up-rated and a down-rated answer to the
same masked prompt pair up. Comments, preferred answers and everything else a user typed are
masked before they are stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.pii import mask_pii
from pipeline.data.pii_scan import pii_left
from pipeline.errors import KilnError
from pipeline.io import read_jsonl, write_json, write_jsonl

RATING, PAIRWISE, PREFERRED = "rating", "pairwise", "preferred_answer"
CHOSEN, REJECTED = "chosen", "rejected"
FEEDBACK_TAG = "kiln_feedback_ms"
ROUTE_KEY = "kiln.route"  # trace metadata every served trace carries: how a trace is known to be kiln's


def serving_experiment(model_name: str) -> str:
    """The experiment of a registered model's served traces: `kiln-<profile>-serving`."""
    return f"{model_name}-serving"


class TraceNotFound(KilnError):
    """No served trace with this id in the tracking store."""


def polarity(rating) -> int:
    """+1 for "up" or 4-5, -1 for "down" or 1-2, 0 otherwise (3, or no rating)."""
    if rating in ("up", "down"):
        return 1 if rating == "up" else -1
    if isinstance(rating, int | float) and not isinstance(rating, bool):
        return 1 if rating >= 4 else -1 if rating <= 2 else 0
    return 0


def _masked(text: str | None) -> str | None:
    return None if text is None else mask_pii(text)[0]


def tracing_client(uri: str):
    import logging

    from mlflow.tracing.client import TracingClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return TracingClient(uri)


def served_trace(client, trace_id: str):
    """The TraceInfo of a trace kiln served; TraceNotFound otherwise."""
    try:
        info = client.get_trace_info(trace_id)
    except Exception as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
            raise TraceNotFound(f"no served trace {trace_id}") from None
        raise
    if ROUTE_KEY not in info.trace_metadata:
        raise TraceNotFound(f"trace {trace_id} is not an answer kiln served")
    return info


def log_judgement(
    uri: str, trace_id: str, source_id: str, rating=None, comment: str | None = None,
    preferred_answer: str | None = None, better_than: str | None = None,
) -> list[str]:  # fmt: skip
    """Store one user's judgement of a served trace (and, for a pairwise pick, of the other trace
    too) as assessments. Returns the assessment ids. TraceNotFound names an unknown trace."""
    from mlflow.entities import AssessmentSource, AssessmentSourceType, Expectation, Feedback

    client = tracing_client(uri)
    served_trace(client, trace_id)
    if better_than is not None:
        served_trace(client, better_than)
    source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=source_id)
    comment = _masked(comment)
    logged = []
    if rating is not None:
        logged.append((trace_id, Feedback(name=RATING, value=rating, source=source, rationale=comment)))
    if preferred_answer is not None:
        logged.append((trace_id, Expectation(name=PREFERRED, value=_masked(preferred_answer), source=source)))
    if better_than is not None:
        for tid, value, other in ((trace_id, CHOSEN, better_than), (better_than, REJECTED, trace_id)):
            meta = {"other_trace_id": other}
            logged.append((tid, Feedback(name=PAIRWISE, value=value, source=source, rationale=comment, metadata=meta)))
    ids = [client.log_assessment(tid, assessment).assessment_id for tid, assessment in logged]
    now = str(int(time.time() * 1000))
    for tid in {tid for tid, _ in logged}:
        client.set_trace_tag(tid, FEEDBACK_TAG, now)
    return ids


@dataclass
class Judged:
    """A served answer with the judgements it received."""

    trace_id: str
    prompt: list[dict]  # the masked conversation up to the answer
    answer: str
    judgements: list = field(default_factory=list)  # mlflow Assessment entities

    @property
    def prompt_key(self) -> str:
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


def _prompt_messages(inputs) -> list[dict] | None:
    if isinstance(inputs, dict) and isinstance(inputs.get("messages"), list):
        return [{"role": m.get("role", "user"), "content": m.get("content")} for m in inputs["messages"]]
    if isinstance(inputs, dict) and isinstance(inputs.get("prompt"), str):
        return [{"role": "user", "content": inputs["prompt"]}]
    return None


def judged_traces(uri: str, model_name: str) -> Iterator[Judged]:
    """Every served trace of `model_name` that has feedback, with its prompt, answer and judgements."""
    client = tracing_client(uri)
    exp = _experiment(uri, serving_experiment(model_name))
    if exp is None:
        return
    token = None
    while True:
        page = client.search_traces(
            locations=[exp], filter_string=f"tags.{FEEDBACK_TAG} IS NOT NULL", max_results=200, page_token=token
        )
        for trace in page:
            root = next((s for s in trace.data.spans if s.parent_id is None), None)
            prompt = _prompt_messages(root.inputs) if root else None
            answer = (root.outputs or {}).get("text") if root and isinstance(root.outputs, dict) else None
            if prompt is None or not isinstance(answer, str):
                continue
            yield Judged(trace.info.trace_id, prompt, answer, list(trace.info.assessments))
        token = page.token
        if not token:
            return


def _experiment(uri: str, name: str) -> str | None:
    from pipeline.tracking import client

    exp = client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


def count_new_judgements(uri: str, model_name: str, since_ms: int) -> tuple[int, int]:
    """(judgements given after `since_ms`, the newest one's time in ms) on the served traces."""
    n, newest = 0, since_ms
    for judged in judged_traces(uri, model_name):
        for a in judged.judgements:
            counted = a.name in (RATING, PREFERRED) or (a.name == PAIRWISE and _value(a) == CHOSEN)  # a pick once
            if counted and a.create_time_ms > since_ms:
                n += 1
                newest = max(newest, a.create_time_ms)
    return n, newest


def _value(assessment):
    return assessment.value if hasattr(assessment, "value") else None


@dataclass
class PairSet:
    """Preference pairs in dpo_data's row form, each with `trace_ids` and `reason`."""

    rows: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # reason -> pairs kept
    dropped: Counter = field(default_factory=Counter)  # reason -> pairs dropped
    known: int = 0  # pairs an earlier run kept already


def _row(prompt: list[dict], chosen: str, rejected: str, trace_ids: list[str], reason: str) -> dict:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "trace_ids": trace_ids,
        "reason": reason,
    }


def candidate_pairs(judged: list[Judged]) -> Iterator[dict]:
    """Every pair the judgements support (before the checks), by reason: pairwise, preferred, rated."""
    by_id = {j.trace_id: j for j in judged}
    rated: dict[str, dict[int, list[Judged]]] = {}
    for j in judged:
        for a in j.judgements:
            if a.name == PAIRWISE and _value(a) == CHOSEN:
                other = by_id.get((a.metadata or {}).get("other_trace_id"))
                if other is not None:
                    yield _row(j.prompt, j.answer, other.answer, [j.trace_id, other.trace_id], "pairwise")
        ratings = [_value(a) for a in j.judgements if a.name == RATING]
        if not ratings:
            continue
        sign = polarity(ratings[-1])  # the latest rating of an answer counts
        preferred = [_value(a) for a in j.judgements if a.name == PREFERRED]
        if sign < 0 and preferred and isinstance(preferred[-1], str) and preferred[-1].strip():
            yield _row(j.prompt, preferred[-1], j.answer, [j.trace_id], "preferred_answer")
        if sign:
            rated.setdefault(j.prompt_key, {}).setdefault(sign, []).append(j)
    for by_sign in rated.values():
        for up in by_sign.get(1, []):
            for down in by_sign.get(-1, []):
                yield _row(up.prompt, up.answer, down.answer, [up.trace_id, down.trace_id], "rated_same_prompt")


def row_key(row: dict) -> str:
    """An exact duplicate has the same prompt and answers (whatever traces it came from)."""
    text = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _pii_found(row: dict) -> bool:
    texts = [m["content"] for part in ("prompt", "chosen", "rejected") for m in row[part]]
    return any(pii_left(t) for t in texts if isinstance(t, str))


def feedback_pairs(judged: list[Judged], known: set[str]) -> PairSet:
    """The new pairs among `judged` (those whose key is not in `known`): answers that are the same
    text give no pair, any personal data the second detector still finds drops a pair."""
    out = PairSet()
    seen: set[str] = set()
    for row in candidate_pairs(judged):
        key = row_key(row)
        if key in known:
            out.known += 1
            continue
        if key in seen:
            out.dropped["duplicate"] += 1
            continue
        seen.add(key)
        if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
            out.dropped["same_answer"] += 1
        elif _pii_found(row):
            out.dropped["pii_left"] += 1
        else:
            out.rows.append(row)
            out.counts[row["reason"]] += 1
    return out


PAIRS_FILE = "pairs.jsonl"


def update_pairs(uri: str, model_name: str, folder: Path) -> dict:
    """feedback_pairs: the pairs of `folder/pairs.jsonl` (kept from earlier runs) and, after them,
    the new ones the judgements on `model_name`'s served traces give now. Returns the counts
    (also written to stats.json)."""
    path = folder / PAIRS_FILE
    old = list(read_jsonl(path)) if path.is_file() else []
    judged = list(judged_traces(uri, model_name))
    new = feedback_pairs(judged, {row_key(r) for r in old})
    write_jsonl(path, old + new.rows)
    stats = {
        "experiment": serving_experiment(model_name),
        "traces_with_feedback": len(judged),
        "judgements": sum(len(j.judgements) for j in judged),
        "new_pairs": len(new.rows),
        "pairs": len(old) + len(new.rows),
        "new_by_reason": dict(new.counts),
        "dropped": dict(new.dropped),
        "kept_before": new.known,
    }
    write_json(folder / "stats.json", stats)
    return stats


def read_pairs(folder: Path) -> list[dict]:
    path = folder / PAIRS_FILE
    return list(read_jsonl(path)) if path.is_file() else []


def prompt_source(row: dict) -> str:
    """The split key of a feedback pair: its prompt, so one prompt's pairs stay on one side."""
    return "feedback:" + hashlib.sha1(json.dumps(row["prompt"], sort_keys=True).encode()).hexdigest()[:16]
