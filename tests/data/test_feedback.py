"""Users' judgements as preference pairs, and their share of dpo_data, on literal traces."""

from __future__ import annotations

import json

from mlflow.entities import AssessmentSource, Expectation, Feedback

from pipeline.data.feedback import Judged, candidate_pairs, feedback_pairs, polarity, row_key
from pipeline.data.post_data import FEEDBACK_EVAL, build_post_data
from pipeline.io import read_jsonl

HUMAN = AssessmentSource(source_type="HUMAN", source_id="u1")


def _judged(trace_id: str, prompt: str, answer: str, *judgements) -> Judged:
    return Judged(trace_id, [{"role": "user", "content": prompt}], answer, list(judgements))


def _rating(value) -> Feedback:
    return Feedback(name="rating", value=value, source=HUMAN)


def _pick(value: str, other: str) -> Feedback:
    return Feedback(name="pairwise", value=value, source=HUMAN, metadata={"other_trace_id": other})


def test_polarity_of_ratings():
    assert [polarity(v) for v in ("up", "down", 5, 4, 3, 2, 1, None, True)] == [1, -1, 1, 1, 0, -1, -1, 0, 0]


def test_each_kind_of_judgement_gives_its_pair():
    judged = [
        _judged("t1", "p1", "good", _rating("up")),
        _judged("t2", "p1", "bad", _rating("down")),
        _judged("t3", "p1", "fine", _rating(3)),  # neutral: pairs with nothing
        _judged("t4", "p2", "left", _pick("chosen", "t5")),
        _judged("t5", "p2", "right", _pick("rejected", "t4")),
        _judged("t6", "p3", "wrong", _rating(1), Expectation(name="preferred_answer", value="right", source=HUMAN)),
        _judged("t7", "p4", "meh", _rating("down")),  # down without a preferred answer or an up partner
    ]
    pairs = {p["reason"]: p for p in candidate_pairs(judged)}
    assert set(pairs) == {"rated_same_prompt", "pairwise", "preferred_answer"}
    rated = pairs["rated_same_prompt"]
    assert (rated["chosen"][0]["content"], rated["rejected"][0]["content"]) == ("good", "bad")
    assert pairs["pairwise"]["trace_ids"] == ["t4", "t5"]
    assert pairs["pairwise"]["chosen"][0]["content"] == "left"
    assert pairs["preferred_answer"]["trace_ids"] == ["t6"]
    assert pairs["preferred_answer"]["chosen"][0]["content"] == "right"
    assert pairs["preferred_answer"]["prompt"] == [{"role": "user", "content": "p3"}]


def test_duplicates_same_answers_and_personal_data_are_dropped_and_counted():
    judged = [
        _judged("a", "p", "x = 1", _pick("chosen", "b"), _pick("chosen", "b")),  # the same pick twice
        _judged("b", "p", "x = 2", _pick("rejected", "a"), _pick("rejected", "a")),
        _judged("c", "q", "same", _pick("chosen", "d")),
        _judged("d", "q", "same", _pick("rejected", "c")),
        _judged("e", "r", "call 010-1234-5678", _pick("chosen", "f")),  # the second detector finds a phone
        _judged("f", "r", "no", _pick("rejected", "e")),
    ]
    out = feedback_pairs(judged, known=set())
    assert len(out.rows) == 1
    assert out.counts == {"pairwise": 1}
    assert out.dropped == {"duplicate": 1, "same_answer": 1, "pii_left": 1}
    again = feedback_pairs(judged, known={row_key(out.rows[0])})  # an earlier run kept it
    assert again.rows == []
    assert again.known == 2


def _pairs(n: int) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"prompt {i}"}],
         "chosen": [{"role": "assistant", "content": f"yes {i}"}],
         "rejected": [{"role": "assistant", "content": f"no {i}"}], "trace_ids": [f"t{i}"], "reason": "pairwise"}
        for i in range(n)
    ]  # fmt: skip


def test_dpo_data_mixes_feedback_pairs_in_and_holds_some_out_by_prompt(tmp_path):
    user = tmp_path / "user.jsonl"
    user.write_text("".join(json.dumps({"prompt": f"u{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(20)))
    out = tmp_path / "dpo"
    stats = build_post_data(
        "dpo", [], [str(user)], out, max_pairs=10, eval_share=0.1, feedback=_pairs(8), feedback_share=0.5
    )
    assert stats.sources["feedback_pairs"] == 5  # at most 0.5 x max_pairs, the newest
    rows = [*read_jsonl(out / "train.jsonl"), *read_jsonl(out / "eval.jsonl")]
    users = [r for r in rows if r["prompt"][0]["content"].startswith("prompt")]
    assert sorted(r["prompt"][0]["content"] for r in users) == [f"prompt {i}" for i in range(3, 8)]
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in users)  # no trace ids in the training rows
    held = list(read_jsonl(out / FEEDBACK_EVAL))
    assert held
    assert all(r in list(read_jsonl(out / "eval.jsonl")) for r in held)
    train_prompts = {r["prompt"][0]["content"] for r in read_jsonl(out / "train.jsonl")}
    assert not train_prompts & {r["prompt"][0]["content"] for r in held}  # held out by prompt
    none = build_post_data("dpo", [], [str(user)], tmp_path / "none", 10, 0.1, feedback=_pairs(8), feedback_share=0)
    assert "feedback_pairs" not in none.sources
    assert not (tmp_path / "none" / FEEDBACK_EVAL).exists()
