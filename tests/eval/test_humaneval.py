"""HumanEval scoring and the sandbox that runs generated code."""

import json

import pytest

from pipeline.cli import main
from pipeline.errors import KilnError
from pipeline.eval.humaneval import (
    _prompt_ids,
    generate,
    gguf_prompt_ids,
    pass_at_k,
    problems,
    score,
    splice,
    task_ids,
    truncate,
)


def test_pass_at_k_by_hand():
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0
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
    assert report["pass@1"] == 0.0
    assert all(r["result"].startswith("failed") for r in results)

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in good[:2] + broken[:2]))
    assert main(["humaneval", "score", str(samples), "--k", "1,2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pass@1"] == 0.5
    assert out["pass@2"] == 1.0
    assert len((tmp_path / "samples_results.jsonl").read_text().splitlines()) == 4


def test_bad_samples_are_clear(tmp_path):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(KilnError, match="s.jsonl:1: a sample needs string fields"):
        score_file(bad)
    bad.write_text('{"task_id": "Nope/1", "completion": ""}\n')
    with pytest.raises(KilnError, match="unknown task_id Nope/1"):
        score_file(bad)


def test_splice_puts_the_generated_text_back_onto_the_original_prompt():
    table = problems()
    assert all(p["prompt"].endswith('"""\n') or p["prompt"].endswith("'''\n") for p in table.values())
    for p in table.values():  # a model that writes the canonical body after the stripped prompt gets it exactly
        assert splice(p["prompt"], "\n" + p["canonical_solution"]) == p["canonical_solution"]
    prompt = table["HumanEval/0"]["prompt"]
    assert splice(prompt, "\n\n    return True\n") == "\n    return True\n"
    assert splice(prompt, " return True") == " return True"  # not a continuation of the newline: kept whole
    assert splice(prompt, "") == ""


def test_the_model_is_sent_the_prompt_without_its_trailing_newline(tiny_base, ggufs):
    from transformers import AutoTokenizer

    from pipeline.release.gguf_bench import load

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    prompts = [problems()[t]["prompt"] for t in task_ids(5)]
    for prompt in prompts:
        ids = _prompt_ids(tok, prompt)
        assert ids[0] == tok.bos_token_id != tok.eos_token_id
        assert tok.decode(ids[1:]) == prompt.rstrip()
    llm = load(ggufs["F16"])
    try:
        for prompt in prompts:
            ids = gguf_prompt_ids(llm, prompt)
            assert ids[0] == llm.token_bos() == tok.bos_token_id
            assert llm.detokenize(ids[1:]).decode() == prompt.rstrip()
    finally:
        llm.close()


def test_hf_generation_continues_the_stripped_prompt(tiny_base):
    """The completions equal a plain greedy decode of <|bos|> + the prompt without its trailing
    newline, cut at the first stop sequence and spliced onto the prompt by hand. Problems whose
    prompt fits the trained context with the new tokens: a longer one is cut (tested apart)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    room = model.config.max_position_embeddings - 12
    ids = [t for t in task_ids(40) if 1 + len(tok(problems()[t]["prompt"][:-1])["input_ids"]) <= room][:3]
    assert len(ids) == 3
    rows = generate(tiny_base, ids, max_new_tokens=12, progress=False)
    assert all(row["prompt_tokens_cut"] == 0 for row in rows)
    for row, task_id in zip(rows, ids, strict=True):
        prompt = problems()[task_id]["prompt"]
        x = torch.tensor([[tok.bos_token_id, *tok(prompt[:-1], add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        text = truncate(tok.decode(out[0, x.shape[1] :], skip_special_tokens=True))
        expected = text[1:] if text.startswith("\n") else text  # the prompt's own "\n" is not repeated
        assert row["completion"] == expected


def score_file(path):
    from pipeline.eval.humaneval import read_samples

    return score(read_samples(path), [1])
