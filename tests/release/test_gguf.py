"""GGUF export and llama.cpp: conversion, tokenizer parity, logits parity, quantized files, errors."""

import json
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import GGUFSettings, ProfileError
from pipeline.errors import KilnError
from pipeline.release.gguf_bench import (
    THREADS,
    bandwidth_bound_fraction,
    benchmark_file,
    copy_together,
    cost_per_million_tokens,
    gguf_perplexity,
    greedy_decode,
    hf_perplexity,
    latency_percentiles,
    load,
    markdown_table,
    measure_speed,
    memory_bandwidth,
    overlapped,
    tokenization_mismatches,
)
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


def test_benchmark_generation_is_greedy(ggufs, tiny_base):
    """tg128 and the latency requests choose each token as the argmax of the last position's
    logits: the same tokens as a decode that reads every position's logits (logits_all)."""
    prompt = AutoTokenizer.from_pretrained(str(tiny_base)).encode(TEXTS[0], add_special_tokens=False)[:12]
    llm = load(ggufs["Q8_0"])
    try:
        tokens, times = greedy_decode(llm, prompt, 24)
    finally:
        llm.close()
    ref = load(ggufs["Q8_0"], logits_all=True)
    try:
        ref.eval(prompt)
        expected = []
        for _ in range(24):
            expected.append(int(np.argmax(ref.scores[ref.n_tokens - 1])))
            ref.eval([expected[-1]])
    finally:
        ref.close()
    assert tokens == expected
    assert len(times) == 24
    assert all(a < b for a, b in zip(times, times[1:], strict=False))


def test_latency_percentiles_by_hand():
    rng = np.random.default_rng(0)
    lat = latency_percentiles(list(rng.permutation(np.arange(1, 101) / 1000)))  # 1..100 ms in any order
    assert lat == pytest.approx({"p50": 0.0505, "p95": 0.09505, "p99": 0.09901, "requests": 100})


@pytest.mark.slow  # 100 requests through llama.cpp: about 10 s on 2 busy cores
def test_latency_takes_100_requests_unless_quick(ggufs):
    llm = load(ggufs["Q4_K_M"])
    try:
        r = measure_speed(llm, list(range(20, 120)), repeats=1)
    finally:
        llm.close()
    assert r["latency_s"]["requests"] == 100
    assert r["time_to_first_token_s"] < r["latency_s"]["p50"]  # the first of the answer's tokens comes before its last
    with pytest.raises(ProfileError, match="gguf.latency_requests must be at least 100, not 20"):
        GGUFSettings(latency_requests=20)


def test_bandwidth_fraction_only_for_a_file_beyond_the_cache():
    mb = 2**20
    assert bandwidth_bound_fraction(100 * mb, 50.0, 10e9, 32 * mb) == pytest.approx(100 * mb * 50 / 10e9)
    assert bandwidth_bound_fraction(20 * mb, 50.0, 10e9, 32 * mb) is None  # cache-resident
    assert bandwidth_bound_fraction(100 * mb, 50.0, 10e9, None) is None  # cache unknown: no claim


def test_bandwidth_is_measured_on_llama_cpp_threads(monkeypatch, ggufs):
    """Each part is copied on a thread of its own, all started together: inside the copy the two
    threads meet at a barrier, which only threads copying at the same time can pass (one thread
    running both parts in turn would wait there alone and break it), so every round overlapped
    whatever the scheduler did, and nothing here depends on which thread ran first."""
    llm = load(ggufs["Q4_K_M"])
    try:
        assert llm.context_params.n_threads == THREADS
    finally:
        llm.close()
    meet, seen, copy = threading.Barrier(2, timeout=120), [], np.copyto

    def copy_meeting(dst, src):
        seen.append((threading.get_ident(), dst.size))
        meet.wait()  # both parts in flight at once, or BrokenBarrierError
        copy(dst, src)

    monkeypatch.setattr(np, "copyto", copy_meeting)
    src = np.ones(1 << 16)
    dst = np.empty_like(src)
    parts = [(dst[: 1 << 15], src[: 1 << 15]), (dst[1 << 15 :], src[1 << 15 :])]
    rounds = copy_together(parts, 3)
    assert len(rounds) == 3
    assert all(overlapped(spans) for spans in rounds)
    assert np.array_equal(dst, src)
    assert sorted(size for _, size in seen) == [1 << 15] * 6
    assert memory_bandwidth(threads=2, mb=8, repeats=2) > 0  # its rounds meet at the barrier too
    assert not overlapped([(0.0, 1.0), (1.5, 2.0)])
    assert overlapped([(0.0, 1.0), (0.5, 2.0)])


def test_cost_per_million_tokens_by_hand():
    assert cost_per_million_tokens(3.60, 1000.0) == pytest.approx(1.0)  # 3.6 M tokens an hour for $3.60
    assert cost_per_million_tokens(0.10, 10.0) == pytest.approx(0.10 / 0.036)


def test_benchmark_table_states_its_assumptions(ggufs):
    size = ggufs["Q4_K_M"].stat().st_size
    args = (ggufs["Q4_K_M"], list(range(20, 120)), 10e9, 3.60)
    small_cache = benchmark_file(*args, quick=True, cache_bytes=size // 2)
    assert small_cache["latency_s"]["requests"] == 20
    assert small_cache["quick"]
    tg = small_cache["tg_tokens_per_s"]["median"]
    assert small_cache["bandwidth_bound_fraction"] == pytest.approx(size * tg / 10e9)
    assert small_cache["cost_per_million_tokens"] == pytest.approx(1e6 / (tg * 1000))
    table = markdown_table({"Q4_K_M": small_cache})
    assert "(quick: 20 requests)" in table
    assert "quick mode: too few requests" in table
    assert "one batch-1 stream" in table
    assert "$3.60/hour" in table
    assert f"on {THREADS} threads" in table
    # the 256-token model is measured within its context, and the table says so
    assert "| pp256 tok/s | tg128 tok/s |" in table
    assert "model RSS MB (256)" in table
    assert "pp256/tg128 in place of llama-bench's pp512/tg128: the model was trained on 256 positions" in table
    resident = dict(small_cache, bandwidth_bound_fraction=None, assumptions={**small_cache["assumptions"],
                    "last_level_cache_bytes": 2 * size})  # fmt: skip
    assert "| cache-resident |" in markdown_table({"Q4_K_M": resident})


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
    with pytest.raises(KilnError, match="unsupported architecture bert"):
        convert_to_gguf(other, tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny_base / f).read_bytes())
    with pytest.raises(KilnError, match="no tokenizer.json"):
        convert_to_gguf(no_tok, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()
