"""gguf_benchmark: parity, speed and memory of GGUF files under llama.cpp (llama-cpp-python).

- parity: the GGUF tokenizes texts to exactly the HF tokenizer's ids; perplexity on held-out
  text matches the HF model's (F16 within 1%, Q8_0 within 3%, Q4_K_M reported);
- speed, like llama-bench: pp512 (prompt processing of 512 tokens) and tg128 (128 generated
  tokens, one at a time), repeated, median and spread; time to first token; latency P50/P95/P99
  over repeated short requests. llama.cpp's eval returns when the work is done, so each timing
  is synchronous;
- memory: file size and the peak resident memory of a fresh process that only loads the model
  and runs it, at context 512, 1024 and 2048;
- the generation speed as a fraction of the machine's memory-bandwidth bound (each generated
  token reads every weight once: bytes x tokens/s / measured bandwidth), and the cost per
  million generated tokens at an hourly machine price.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.errors import KilnError

PARITY_LIMITS = {"F16": 0.01, "Q8_0": 0.03}  # relative perplexity difference allowed; others reported
GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """A clear error for a missing, truncated or foreign file before llama.cpp sees it."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise KilnError(f"{path}: not a GGUF file (starts with {head!r}, not {GGUF_MAGIC!r})")


def load(path: Path, n_ctx: int = 1024, logits_all: bool = False):
    import llama_cpp

    from pipeline.release.gguf_export import quiet_native

    check_gguf(path)
    try:
        with quiet_native():
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=logits_all,
                n_threads=os.cpu_count(), verbose=False,
            )  # fmt: skip
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python's words for "could not load"
        raise KilnError(f"{path}: llama.cpp cannot load it ({exc}); the file may be truncated or corrupt") from None


def _nll_windows(logits_fn, ids: list[int], window: int) -> tuple[float, int]:
    """Sum of next-token NLL over consecutive windows of `ids`, and the number of predictions."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = logits_fn(chunk[:-1]).astype(np.float64)  # (T, V)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    return total, count


def hf_perplexity(checkpoint: Path, ids: list[int], window: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def logits(chunk):
        with torch.no_grad():
            return model(input_ids=torch.tensor([chunk])).logits[0].numpy()

    total, count = _nll_windows(logits, ids, window)
    return math.exp(total / count)


def gguf_perplexity(llm, ids: list[int], window: int) -> float:
    def logits(chunk):
        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[: len(chunk)])

    total, count = _nll_windows(logits, ids, window)
    return math.exp(total / count)


def tokenization_mismatches(llm, tokenizer, texts: list[str]) -> list[str]:
    bad = []
    for text in texts:
        # special=True: like HF's encode, "<|end|>" written in the text is the special token
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours != tokenizer.encode(text, add_special_tokens=False):
            bad.append(text[:60])
    return bad


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure_speed(llm, prompt_ids: list[int], repeats: int = 3, requests: int = 20) -> dict:
    """pp512, tg128, time to first token and request latency percentiles."""
    pp_ids = (prompt_ids * (512 // max(len(prompt_ids), 1) + 1))[:512]
    pp, tg = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(pp_ids)
        pp.append(512 / (time.perf_counter() - t))
        llm.reset()
        llm.eval(pp_ids[:16])
        token, t = pp_ids[16], time.perf_counter()
        for _ in range(128):  # one token at a time, as generation runs
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tg.append(128 / (time.perf_counter() - t))
    short = pp_ids[:32]
    ttft, latency = [], []
    for _ in range(requests):
        llm.reset()
        t = time.perf_counter()
        llm.eval(short)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ttft.append(time.perf_counter() - t)
        for _ in range(15):  # a short answer: 16 tokens in all
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        latency.append(time.perf_counter() - t)
    pct = np.percentile(latency, [50, 95, 99])
    return {
        "pp512_tokens_per_s": _spread(pp),
        "tg128_tokens_per_s": _spread(tg),
        "time_to_first_token_s": statistics.median(ttft),
        "latency_s": {"p50": float(pct[0]), "p95": float(pct[1]), "p99": float(pct[2]), "requests": requests},
    }


_MEMORY_PROBE = """
import json, sys
import llama_cpp

def status(key):  # kB figures from the kernel's view of this process
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

imported = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: the import's peak is not the model's
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=512, verbose=False)
llm.eval(llm.tokenize(b"def main():\\n    return 0\\n" * 8, add_bos=False))
print(json.dumps({"imported_mb": imported, "peak_mb": status("VmHWM")}))
llm.close()
"""


def peak_memory(path: Path, contexts=(512, 1024, 2048)) -> dict:
    """Peak resident memory (MB) of a fresh process that loads the model and runs a short prompt,
    per context size; `model` is that peak less the process's size before loading."""
    out = {"peak": {}, "model": {}}
    for n_ctx in contexts:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(path), str(n_ctx)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise KilnError(f"{path}: the memory probe failed at n_ctx={n_ctx}: {proc.stderr.strip()[-200:]}")
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        out["peak"][str(n_ctx)] = probe["peak_mb"]
        out["model"][str(n_ctx)] = probe["peak_mb"] - probe["imported_mb"]
    return out


def memory_bandwidth(mb: int = 256, repeats: int = 3) -> float:
    """Bytes/s this machine moves in a large copy (read + write), best of a few."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t))
    return best


def benchmark_file(
    path: Path, prompt_ids: list[int], bandwidth: float, price_per_hour: float, quick: bool = False
) -> dict:
    """Speed and memory of one GGUF file (no HF model needed)."""
    llm = load(path, n_ctx=1024)
    try:
        speed = measure_speed(llm, prompt_ids, repeats=1 if quick else 3, requests=5 if quick else 20)
    finally:
        llm.close()
    size = Path(path).stat().st_size
    tg = speed["tg128_tokens_per_s"]["median"]
    return {
        "file": str(path),
        "size_bytes": size,
        **speed,
        "peak_rss_mb": peak_memory(path, (512,) if quick else (512, 1024, 2048)),
        "bandwidth_bound_fraction": size * tg / bandwidth,
        "cost_per_million_tokens": price_per_hour / (tg * 3600) * 1e6,
    }


def parity(path: Path, tokenizer, texts: list[str], eval_ids: list[int], window: int, hf_ppl: float) -> dict:
    llm = load(path, n_ctx=max(window + 8, 512), logits_all=True)
    try:
        mismatches = tokenization_mismatches(llm, tokenizer, texts)
        ppl = gguf_perplexity(llm, eval_ids, window)
    finally:
        llm.close()
    return {"tokenization_mismatches": mismatches, "perplexity": ppl, "hf_perplexity": hf_ppl,
            "perplexity_rel_diff": abs(ppl - hf_ppl) / hf_ppl}  # fmt: skip


def parity_passed(kind: str, p: dict) -> bool:
    limit = PARITY_LIMITS.get(kind)
    return not p["tokenization_mismatches"] and (limit is None or p["perplexity_rel_diff"] <= limit)


def markdown_table(results: dict) -> str:
    head = (
        "| file | size MB | pp512 tok/s | tg128 tok/s | TTFT ms | P50/P95/P99 ms "
        "| model RSS MB (512/1024/2048) | ppl (HF) | BW bound | $/M tok |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---|---|---|---:|---:|"]
    for kind, r in results.items():
        lat = r["latency_s"]
        rss = "/".join(f"{v:.0f}" for v in r["peak_rss_mb"]["model"].values())
        p = r.get("parity", {})
        ppl = f"{p['perplexity']:.2f} ({p['hf_perplexity']:.2f})" if p else "-"
        lines.append(
            f"| {kind} | {r['size_bytes'] / 2**20:.1f} | {r['pp512_tokens_per_s']['median']:.0f} | "
            f"{r['tg128_tokens_per_s']['median']:.0f} | {r['time_to_first_token_s'] * 1000:.1f} | "
            f"{lat['p50'] * 1000:.0f}/{lat['p95'] * 1000:.0f}/{lat['p99'] * 1000:.0f} | {rss} | {ppl} | "
            f"{r['bandwidth_bound_fraction']:.0%} | {r['cost_per_million_tokens']:.3f} |"
        )
    return "\n".join(lines)


def benchmark_all(files: dict, checkpoint: Path, validation_texts: list[str], settings) -> dict:
    """Parity against `checkpoint` and speed/memory for each GGUF in `files` (kind -> path)."""
    from transformers import AutoTokenizer

    from pipeline.train.tokenizer import ROUND_TRIP_SAMPLES

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids: list[int] = []
    for text in validation_texts:
        ids += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        if len(ids) >= settings.eval_tokens:
            break
    ids = ids[: settings.eval_tokens]
    if len(ids) < 2:
        raise KilnError("no validation text to measure perplexity on")
    hf_ppl = hf_perplexity(checkpoint, ids, settings.window)
    bandwidth = memory_bandwidth()
    texts = validation_texts[:50] + ROUND_TRIP_SAMPLES
    results = {}
    for kind, path in files.items():
        r = benchmark_file(path, ids[:512], bandwidth, settings.price_per_hour, quick=settings.quick)
        r["parity"] = parity(path, tok, texts, ids, settings.window, hf_ppl)
        r["parity"]["passed"] = parity_passed(kind, r["parity"])
        results[kind] = r
    return {"machine_bandwidth_gb_s": bandwidth / 1e9, "threads": os.cpu_count(), "files": results}
