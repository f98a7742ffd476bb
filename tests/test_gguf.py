"""GGUF export and llama.cpp: conversion, tokenizer parity, logits parity, quantized files, errors."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import KilnError
from pipeline.release.gguf_bench import benchmark_file, gguf_perplexity, hf_perplexity, load, tokenization_mismatches
from pipeline.release.gguf_export import convert_to_gguf, rotary_permute
from pipeline.train.tokenizer import ROUND_TRIP_SAMPLES

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "The pipeline cleans, trains, converts and measures.",
    "한국어 문장도 똑같이 나뉘어야 합니다.",
    "emoji 🚀🔥👩‍💻 and symbols ∑≠∞",
    *ROUND_TRIP_SAMPLES,
]


def test_conversion_writes_three_loadable_files(ggufs):
    assert set(ggufs) == {"F16", "Q8_0", "Q4_K_M"}
    sizes = {k: p.stat().st_size for k, p in ggufs.items()}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"]
    assert not any(p.name.startswith(".") for p in ggufs["F16"].parent.iterdir())  # no temporary files left


def test_tokenization_matches_hf(ggufs, tiny_base):
    llm = load(ggufs["F16"])
    try:
        assert tokenization_mismatches(llm, AutoTokenizer.from_pretrained(str(tiny_base)), TEXTS) == []
    finally:
        llm.close()


def test_f16_logits_match_hf(ggufs, tiny_base):
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ids = tok.encode(TEXTS[0] + TEXTS[1], add_special_tokens=False)
    llm = load(ggufs["F16"], logits_all=True)
    try:
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_base))(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 0.05  # F16 weights against fp32
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_perplexity_parity_and_quantized_files_generate(ggufs, tiny_base):
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ids = tok.encode(" ".join(TEXTS[:4]) * 3, add_special_tokens=False)
    hf = hf_perplexity(tiny_base, ids, 64)
    for kind, limit in (("F16", 0.01), ("Q8_0", 0.03)):
        llm = load(ggufs[kind], logits_all=True)
        try:
            assert abs(gguf_perplexity(llm, ids, 64) - hf) / hf <= limit, kind
        finally:
            llm.close()
    for kind in ("Q8_0", "Q4_K_M"):
        llm = load(ggufs[kind])
        try:
            out = llm.create_completion("def ", max_tokens=8, temperature=0.0)
            assert out["usage"]["completion_tokens"] >= 1
            chat = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
            assert chat["choices"][0]["message"]["role"] == "assistant"  # the GGUF's chat template worked
        finally:
            llm.close()


def test_permutation_is_invertible_row_reordering():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows
    p = rotary_permute(w, 2)
    assert sorted(map(tuple, p)) == sorted(map(tuple, w))
    assert p[1].tolist() == w[2].tolist()  # row 1 of head 0 comes from the second half


def test_benchmark_reports_speed_and_memory(ggufs):
    r = benchmark_file(ggufs["Q4_K_M"], list(range(20, 120)), bandwidth=10e9, price_per_hour=1.0, quick=True)
    assert r["tg128_tokens_per_s"]["median"] > 0 and r["pp512_tokens_per_s"]["median"] > 0
    assert r["latency_s"]["p50"] <= r["latency_s"]["p99"]
    assert r["peak_rss_mb"]["model"]["512"] > 0
    assert r["cost_per_million_tokens"] == pytest.approx(1e6 / (r["tg128_tokens_per_s"]["median"] * 3600))


def test_bad_inputs_are_clear_errors(tmp_path, tiny_base, ggufs):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(ggufs["Q8_0"].read_bytes()[:4096])  # truncated
    with pytest.raises(KilnError, match="truncated or corrupt"):
        load(corrupt)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04zip")
    with pytest.raises(KilnError, match="not a GGUF file"):
        load(tmp_path / "x.gguf")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(KilnError, match="architecture 'bert' is not supported"):
        convert_to_gguf(other, tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny_base / f).read_bytes())
    with pytest.raises(KilnError, match="no tokenizer.json"):
        convert_to_gguf(no_tok, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()
