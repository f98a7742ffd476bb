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
        assert len(r["choices"]) == 4
        assert len(set(r["choices"])) == 4
        real = next(rec["text"] for rec in validation if rec["text"].startswith(r["query"]))
        assert real.startswith(r["query"] + r["choices"][r["gold"]].rstrip("\n"))
    lines = next_line_rows(validation, limit=10)
    assert len(lines) == 10
    for r in lines:
        source = next(rec["text"] for rec in validation if r["query"] + r["choices"][r["gold"]] in rec["text"])
        assert source
        assert len(set(r["choices"])) == 4
    assert body_choice_rows(validation[:4], limit=None) == []  # too few functions for four choices


KOREAN = (
    "제1조 대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "
    "제2조 대한민국의 국민이 되는 요건은 법률로 정한다. "
    "국가는 법률이 정하는 바에 의하여 재외국민을 보호할 의무를 진다. "
    "제3조 대한민국의 영토는 한반도와 그 부속도서로 한다. "
    "제4조 대한민국은 통일을 지향하며, 평화적 통일 정책을 수립하고 이를 추진한다. "
    "제5조 대한민국은 국제평화의 유지에 노력하고 침략적 전쟁을 부인한다. "
    "국군은 국가의 안전보장과 국토방위의 신성한 의무를 수행함을 사명으로 하며, 그 정치적 중립성은 준수된다."
)


def test_the_korean_task_asks_for_the_next_sentence_of_held_out_korean_prose():
    from pipeline.eval.lm_tasks import next_sentence_rows, sentences

    english = {"lang": "en", "text": "Not Korean. At all here."}
    rows = next_sentence_rows([{"lang": "ko", "text": KOREAN}, english], None)
    found = sentences(KOREAN)
    assert len(rows) == len(found) - 1  # every sentence after the first, once
    for r in rows:
        gold = r["choices"][r["gold"]].strip()
        i = found.index(gold)
        assert r["query"] == " ".join(found[max(0, i - 3) : i])
        assert len(set(r["choices"])) == 4
        assert all(c.strip() in found for c in r["choices"])  # distractors: other sentences of the document


def test_lm_eval_runs_kiln_tasks_and_agrees_with_a_direct_score(tiny_base, validation, tmp_path):
    korean = [{"id": "korean_prose:law", "lang": "ko", "text": KOREAN}]
    written, skipped, _ = write_kiln_tasks(validation + korean, tmp_path / "tasks", limit=6)
    assert written == {"kiln_body_choice": 6, "kiln_next_line": 6, "kiln_next_sentence_ko": 6}
    assert skipped == {}
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
        # each document's own result is kept (for paired comparisons), and they average to the score
        assert result[task]["ids"] == [str(i) for i in range(len(rows))]
        assert sum(result[task]["items"]["acc"]) == hits
        assert 0 <= result[task]["scores"]["acc_norm"] <= 1
        assert result[task]["higher_is_better"]["acc"] is True


def test_standard_tasks_without_data_are_reported_not_fatal(tmp_path):
    (tmp_path / "empty").mkdir()
    ok, unavailable = loadable(task_manager(tmp_path / "empty", ["arc_easy"]), ["arc_easy", "no_such_task"])
    assert ok == []
    assert set(unavailable) == {"arc_easy", "no_such_task"}
    assert "Offline" in unavailable["arc_easy"] or "reach" in unavailable["arc_easy"]
    assert "no_such_task" in unavailable["no_such_task"]


def test_standard_tasks_index_only_the_lm_eval_folders_that_name_them(tmp_path):
    (tmp_path / "empty").mkdir()
    tm, ok, unavailable = standard_tasks(tmp_path / "empty", ["arc_easy"])
    assert ok == []
    assert "Offline" in unavailable["arc_easy"] or "reach" in unavailable["arc_easy"]
    assert "arc_challenge" in tm.all_tasks
    assert "hellaswag" not in tm.all_tasks
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
    assert not passed
    assert why == ["dpo bits_per_byte 2.2000 vs production 2.0000 (allowed +5%)"]
    assert not gate(_report(1.9, 0.4), "dpo", prod, 0.05, 0.05)[0]  # accuracy dropped 0.1
    assert gate(_report(1.9, 0.46), "dpo", prod, 0.05, 0.05)[0]
    assert gate(_report(9.0, 0.0), "dpo", None, 0.05, 0.05) == (True, ["no production version to compare with"])
    # the quantized GGUF may not lose what the HF model solves
    assert not gate(_report(2.0, 0.5, gguf_pass=0.3), "dpo", None, 0.05, 0.05, "dpo_Q4_K_M")[0]
    assert gate(_report(2.0, 0.5, gguf_pass=0.5), "dpo", None, 0.05, 0.05, "dpo_Q4_K_M")[0]
    korean = _report(2.0, 0.5)
    korean["models"]["dpo"]["bits_per_byte.ko"] = 9.0  # a part over a few documents: reported, not gated
    assert gate(korean, "dpo", {**prod, "dpo.bits_per_byte.ko": 4.0}, 0.05, 0.05)[0]
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
    assert not passed
    assert "bits_per_byte 2.5000 vs production 2.0000" in why
    assert registry.quality_gate(uri, "test", False, _report(2.0, 0.5), settings) == (False, "GGUF parity failed")


def test_bits_per_byte_keeps_each_documents_bits_and_a_standard_error(tiny_base):
    from pipeline.train.scoring import ratio_stderr

    long = "x = [i * i for i in range(9)]\n" * 30
    texts = ["def f(x):\n    return x + 1\n", "모델 은 다음 토큰 을 예측 합니다", long]
    got = bits_per_byte(tiny_base, texts, batch_size=2, window=64)  # the long text spans several windows
    docs = got["documents"]
    assert [n for _, n in docs] == [len(t.encode("utf-8")) for t in texts]
    total = sum(b for b, _ in docs) / sum(n for _, n in docs)
    assert total == pytest.approx(got["bits_per_byte"], rel=1e-6)  # float32 sums
    alone = bits_per_byte(tiny_base, texts[:1], batch_size=2, window=64)  # the first document's own context
    assert docs[0][0] / docs[0][1] == pytest.approx(alone["bits_per_byte"], rel=1e-5)
    se = ratio_stderr([b for b, _ in docs], [n for _, n in docs])
    assert se is not None
    assert se > 0
    assert ratio_stderr([1.0], [2.0]) is None


def test_humaneval_scores_only_the_problems_whose_prompt_fits(tiny_base):
    """A prompt cut to fit loses its `def` line first: a 0 on it says nothing about the model."""
    from pipeline.eval.humaneval import _prompt_ids, fitting_task_ids, problems

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    table = problems()
    room = 200
    fits = fitting_task_ids(tok, None, room)
    sizes = {t: len(_prompt_ids(tok, p["prompt"])) for t, p in table.items()}
    assert fits == [t for t in table if sizes[t] <= room]  # in HumanEval's order, all that fit
    assert 0 < len(fits) < 164
    assert fitting_task_ids(tok, 3, room) == fits[:3]


def test_figures_are_rounded_to_their_standard_error_with_n_beside_them():
    from pipeline.eval.evaluation import figure_rows, format_figure, mean_stderr, rounded_metrics

    assert format_figure(2.2601508879781123, 0.01234) == "2.260 ± 0.012"
    assert format_figure(0.637, 0.0504) == "0.637 ± 0.050"
    assert format_figure(0.5, None) == "0.5000"
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    report = _report(2.2601508879781123, 0.3)
    report["stderr"]["dpo"]["bits_per_byte"] = 0.01234
    report["n"] = {"bits_per_byte": 120, "kiln_next_line.acc": 200}
    columns, rows = figure_rows(report)
    assert columns[:2] == ["metric", "n"]
    bpb = next(r for r in rows if r[0].startswith("bits_per_byte"))
    assert bpb[1] == 120
    assert "2.260 ± 0.012" in bpb
    assert rounded_metrics(report, ["dpo"])["dpo.bits_per_byte"] == 2.26
    table = markdown_table(report)
    assert "| n |" in table
    assert "2.260 ± 0.012" in table
