"""HumanEval scoring and the sandbox that runs generated code."""

import json

import pytest

from pipeline.cli import main
from pipeline.errors import KilnError
from pipeline.eval.humaneval import pass_at_k, problems, score


def test_pass_at_k_by_hand():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 1, 10) == 1.0  # any 10 of 10 include the correct one
    assert pass_at_k(4, 0, 2) == 0.0


@pytest.fixture(scope="module")
def some_tasks():
    table = problems()
    return [table[t] for t in list(table)[:12]]


def test_canonical_solutions_pass_and_broken_ones_fail(some_tasks, tmp_path, capsys):
    good = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in some_tasks]
    broken = [{"task_id": p["task_id"], "completion": "    return None\n"} for p in some_tasks]
    report, results = score(good, [1])
    assert report["pass@1"] == 1.0, [r["result"] for r in results if not r["passed"]]
    report, results = score(broken, [1])
    assert report["pass@1"] == 0.0 and all(r["result"].startswith("failed") for r in results)

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in good[:2] + broken[:2]))
    assert main(["humaneval", "score", str(samples), "--k", "1,2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pass@1"] == 0.5 and out["pass@2"] == 1.0  # each task: one of its two samples passes
    assert len((tmp_path / "samples_results.jsonl").read_text().splitlines()) == 4


def test_bad_samples_are_clear(tmp_path):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(KilnError, match="s.jsonl:1: a sample needs string fields"):
        score_file(bad)
    bad.write_text('{"task_id": "Nope/1", "completion": ""}\n')
    with pytest.raises(KilnError, match="unknown task_id Nope/1"):
        score_file(bad)


def score_file(path):
    from pipeline.eval.humaneval import read_samples

    return score(read_samples(path), [1])
