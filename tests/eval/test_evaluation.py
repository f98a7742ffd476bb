"""eval_report's parts on a test-sized model: bits per byte, kiln's lm-eval tasks run through
lm-eval's own harness, HumanEval generation from HF and GGUF, and the gate before `candidate`."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main
from pipeline.config import RegistrySettings
from pipeline.data.clean import read_split
from pipeline.eval.evaluation import (
    _folders_naming,
    bits_per_byte,
    gate,
    lm_eval_scores,
    loadable,
    markdown_table,
    standard_tasks,
    task_manager,
)
from pipeline.eval.humaneval import STOP_SEQUENCES, generate, task_ids
from pipeline.eval.lm_tasks import body_choice_rows, next_line_rows, write_kiln_tasks
from pipeline.release import registry
from pipeline.tracking import pipeline_run
from pipeline.train.pretrain import PackedTokens, evaluate, tokenize_to_file
from pipeline.train.tokenizer import token_byte_lengths


@pytest.fixture(scope="module")
def validation(small_corpus):
    return list(read_split(small_corpus, "validation"))


def _model(checkpoint):
    return AutoTokenizer.from_pretrained(str(checkpoint)), AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()


@torch.no_grad()
def _logprob(tok, model, context: str, continuation: str) -> float:
    """log p(continuation | context), scored the plain way: encode both, sum the target log-probs."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    return sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))


def test_bits_per_byte_equals_a_direct_count(tiny_base):
    texts = ["def f(x):\n    return x + 1\n", "모델 은 다음 토큰 을 예측 합니다"]  # Korean: bytes are not characters
    tok, model = _model(tiny_base)
    ids = []
    for text in texts:  # as pretraining packs a document
        ids += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(ids) <= 64  # one window: the direct count below sees the same context
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    separators = (tok.eos_token_id, tok.bos_token_id)
    nll = -sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)) if ids[i] not in separators)
    expected = nll / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)
    got = bits_per_byte(tiny_base, texts, batch_size=2, window=64)
    assert got["bytes"] == sum(len(t.encode("utf-8")) for t in texts) > sum(len(t) for t in texts)
    assert got["bits_per_byte"] == pytest.approx(expected, rel=1e-4)


def test_bits_per_byte_is_one_figure_for_training_and_eval_report(tiny_base, tmp_path):
    """base_model's val_bpb and eval_report's bits per byte, on the same model and tokens, agree."""
    texts = ["def f(x):\n    return x + 1\n", "모델 은 다음 토큰 을 예측 합니다", "x = [i * i for i in range(9)]\n"]
    tok, model = _model(tiny_base)
    n = tokenize_to_file(texts, tok, tmp_path / "val.bin")  # <|bos|> text <|eos|>, the layout eval_report scores
    window = n - 1  # one window, so both see the same context
    token_bytes = torch.tensor(token_byte_lengths(tok), dtype=torch.float64)
    _, val_bpb = evaluate(
        model, PackedTokens(tmp_path / "val.bin", window), token_bytes, 1, 1, torch.device("cpu"), None
    )
    report = bits_per_byte(tiny_base, texts, batch_size=1, window=window)
    assert report["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert val_bpb == pytest.approx(report["bits_per_byte"], rel=1e-5)


def test_kiln_tasks_are_built_from_held_out_code(validation):
    rows = body_choice_rows(validation, limit=None)
    assert len(rows) == 15  # one documented function per held-out code file
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        real = next(rec["text"] for rec in validation if rec["text"].startswith(r["query"]))
        assert real.startswith(r["query"] + r["choices"][r["gold"]].rstrip("\n"))
    lines = next_line_rows(validation, limit=10)
    assert len(lines) == 10
    for r in lines:
        source = next(rec["text"] for rec in validation if r["query"] + r["choices"][r["gold"]] in rec["text"])
        assert source and len(set(r["choices"])) == 4
    assert body_choice_rows(validation[:4], limit=None) == []  # too few functions for four choices


def test_lm_eval_runs_kiln_tasks_and_agrees_with_a_direct_score(tiny_base, validation, tmp_path):
    written, skipped, _ = write_kiln_tasks(validation, tmp_path / "tasks", limit=6)
    assert written == {"kiln_body_choice": 6, "kiln_next_line": 6} and skipped == {}
    tm = task_manager(tmp_path / "tasks", [])
    result = lm_eval_scores(tiny_base, tm, list(written), limit=None, batch_size=4)
    tok, model = _model(tiny_base)
    for task in written:
        rows = [json.loads(x) for x in (tmp_path / "tasks" / f"{task}.jsonl").read_text().splitlines()]
        hits = 0
        for r in rows:
            scores = [_logprob(tok, model, r["query"], c) for c in r["choices"]]
            hits += max(range(len(scores)), key=scores.__getitem__) == r["gold"]
        assert result[task]["n"] == len(rows)
        assert result[task]["scores"]["acc"] == pytest.approx(hits / len(rows)), task
        assert 0 <= result[task]["scores"]["acc_norm"] <= 1 and result[task]["higher_is_better"]["acc"] is True


def test_standard_tasks_without_data_are_reported_not_fatal(tmp_path):
    (tmp_path / "empty").mkdir()
    ok, unavailable = loadable(task_manager(tmp_path / "empty", ["arc_easy"]), ["arc_easy", "no_such_task"])
    assert ok == [] and set(unavailable) == {"arc_easy", "no_such_task"}
    assert "Offline" in unavailable["arc_easy"] or "reach" in unavailable["arc_easy"]
    assert "no_such_task" in unavailable["no_such_task"]


def test_standard_tasks_index_only_the_lm_eval_folders_that_name_them(tmp_path):
    (tmp_path / "empty").mkdir()
    tm, ok, unavailable = standard_tasks(tmp_path / "empty", ["arc_easy"])
    assert ok == [] and ("Offline" in unavailable["arc_easy"] or "reach" in unavailable["arc_easy"])
    assert "arc_challenge" in tm.all_tasks and "hellaswag" not in tm.all_tasks  # arc/ alone was indexed
    assert _folders_naming(["arc_easy", "no_such_task"]) is None  # then every folder, and lm-eval's own verdict


def test_humaneval_generation_from_hf_and_gguf(tiny_base, ggufs, tmp_path, capsys):
    ids = task_ids(3)
    greedy = generate(tiny_base, ids, max_new_tokens=24, progress=False)
    assert [r["task_id"] for r in greedy] == ids
    one_by_one = generate(tiny_base, ids, max_new_tokens=24, batch_size=1, progress=False)
    assert greedy == one_by_one  # left-padded batches change nothing
    assert all(not any(s in r["completion"] for s in STOP_SEQUENCES) for r in greedy)
    sampled = generate(tiny_base, ids[:2], samples=3, temperature=1.0, max_new_tokens=8, progress=False)
    assert [r["task_id"] for r in sampled] == [ids[0]] * 3 + [ids[1]] * 3
    from_gguf = generate(ggufs["Q4_K_M"], ids, max_new_tokens=24, progress=False)
    assert [r["task_id"] for r in from_gguf] == ids

    out = tmp_path / "samples.jsonl"
    argv = ["humaneval", "generate", "--model", str(ggufs["F16"]), "--problems", "2", "--max-new-tokens", "8"]
    assert main([*argv, "-o", str(out)]) == 0
    assert main(["humaneval", "score", str(out), "--k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == 2
    assert main(["humaneval", "generate", "--model", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def _report(bpb: float, acc: float, gguf_pass: float | None = None, dpo_pass: float = 0.5) -> dict:
    models = {"dpo": {"bits_per_byte": bpb, "kiln_body_choice.acc": acc, "humaneval.pass_at_1": dpo_pass}}
    if gguf_pass is not None:
        models["dpo_Q4_K_M"] = {"humaneval.pass_at_1": gguf_pass}
    return {
        "models": models,
        "stderr": {m: {} for m in models},
        "higher_is_better": {"bits_per_byte": False, "kiln_body_choice.acc": True, "humaneval.pass_at_1": True},
        "quantized": "dpo_Q4_K_M" if gguf_pass is not None else None,
        "tasks": {}, "unavailable": {}, "settings": {"humaneval_samples": 1, "max_new_tokens": 8},
    }  # fmt: skip


def test_gate_rules():
    prod = {"dpo.bits_per_byte": 2.0, "dpo.kiln_body_choice.acc": 0.5, "dpo.humaneval.pass_at_1": 0.5}
    assert gate(_report(2.05, 0.5), "dpo", prod, 0.05, 0.05)[0]  # 2.5% worse: within 5%
    passed, why = gate(_report(2.2, 0.5), "dpo", prod, 0.05, 0.05)
    assert not passed and why == ["dpo bits_per_byte 2.2000 vs production 2.0000 (allowed +5%)"]
    assert not gate(_report(1.9, 0.4), "dpo", prod, 0.05, 0.05)[0]  # accuracy dropped 0.1
    assert gate(_report(1.9, 0.46), "dpo", prod, 0.05, 0.05)[0]
    assert gate(_report(9.0, 0.0), "dpo", None, 0.05, 0.05) == (True, ["no production version to compare with"])
    # the quantized GGUF may not lose what the HF model solves
    assert not gate(_report(2.0, 0.5, gguf_pass=0.3), "dpo", None, 0.05, 0.05, "dpo_Q4_K_M")[0]
    assert gate(_report(2.0, 0.5, gguf_pass=0.5), "dpo", None, 0.05, 0.05, "dpo_Q4_K_M")[0]
    assert "bits_per_byte ↓" in markdown_table({**_report(2.0, 0.5), "settings": {
        "humaneval_samples": 1, "max_new_tokens": 8, "temperature": 0.8}})  # fmt: skip


def test_registry_gate_compares_with_the_production_version(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "b" / "gguf").mkdir(parents=True)
    (tmp_path / "b" / "gguf" / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    tags = {"eval.dpo.bits_per_byte": "2.0", "eval.dpo.kiln_body_choice.acc": "0.5"}
    assert registry.production_metrics(uri, "test") is None
    v = registry.register(uri, "test", pipeline_run(uri, "test", "r1"), tmp_path / "b", tags, gate_passed=True)
    registry.promote(uri, "test", v)
    assert registry.production_metrics(uri, "test") == {"dpo.bits_per_byte": 2.0, "dpo.kiln_body_choice.acc": 0.5}
    settings = RegistrySettings(max_regression=0.05, max_score_drop=0.05)
    assert registry.quality_gate(uri, "test", True, _report(2.0, 0.5), settings)[0]
    passed, why = registry.quality_gate(uri, "test", True, _report(2.5, 0.5), settings)
    assert not passed and "bits_per_byte 2.5000 vs production 2.0000" in why
    assert registry.quality_gate(uri, "test", False, _report(2.0, 0.5), settings) == (False, "GGUF parity failed")
