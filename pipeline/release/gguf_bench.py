"""gguf_benchmark: parity, speed and memory of GGUF files under llama.cpp (llama-cpp-python).

- parity: the GGUF tokenizes texts to exactly the HF tokenizer's ids; perplexity on held-out
  text matches the HF model's (F16 within 1%, Q8_0 within 3%, Q4_K_M reported);
- speed, like llama-bench: pp512 (prompt processing of 512 tokens) and tg128 (128 generated
  tokens, one at a time), repeated, median and spread; a model trained on a shorter context is
  measured within it (pp128 for a 128-token one, and tg of what is left after a 16-token prompt),
  and the figures are named by the lengths they were taken at; time to first token; latency P50/P95/P99
  over LATENCY_REQUESTS short requests (fewer only in quick mode, which the table says).
  Generation is greedy: each token is the argmax of the logits llama.cpp returns for the last
  position (`next_token`). llama.cpp's eval returns when the work is done, so each timing is
  synchronous;
- memory: file size and the peak resident memory of a fresh process that only loads the model
  and runs it, at context 512, 1024 and 2048 (those within the trained context, and the
  trained context itself);
- the generation speed as a fraction of the machine's memory-bandwidth bound (each generated
  token reads every weight once: bytes x tokens/s / bandwidth measured on as many threads as
  llama.cpp runs on), only for a file larger than the last-level cache: a smaller one is
  "cache-resident" and the bound does not apply;
- the cost per million generated tokens of one batch-1 stream at the profile's hourly price.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.errors import KilnError
from pipeline.gguf import THREADS, declared_context, load, usable_context
from pipeline.io import within_context

PARITY_LIMITS = {"F16": 0.01, "Q8_0": 0.03}  # relative perplexity difference allowed; others reported
LATENCY_REQUESTS = 100  # P99 of fewer requests is one or two samples' noise
QUICK_REQUESTS = 20
PROMPT_TOKENS, ANSWER_TOKENS = 32, 8  # one latency request: short, so that 100 of them stay cheap


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
    """The median, range and every repeat (what a paired comparison needs)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "repeats": list(xs)}


def next_token(llm) -> int:
    """The greedy choice after the last evaluated token, from the logits llama.cpp keeps for it
    (llama_get_logits_ith). `llm.scores` is no source: without logits_all llama-cpp-python leaves
    it unwritten, and its argmax is whatever that memory held."""
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def greedy_decode(llm, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """From an empty context, evaluate `prompt_ids`, then choose `n` tokens greedily, feeding each
    back one at a time as generation runs. Returns the tokens and, for each, the seconds from the
    start until it was chosen: the first is the time to first token."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    tokens, times = [], []
    for i in range(n):
        if i:
            llm.eval([tokens[-1]])
        tokens.append(next_token(llm))
        times.append(time.perf_counter() - start)
    return tokens, times


def latency_percentiles(latencies: list[float]) -> dict:
    """P50/P95/P99 (numpy's linear interpolation between order statistics) and the request count."""
    p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "requests": len(latencies)}


def speed_lengths(context: int) -> tuple[int, int]:
    """llama-bench's pp512 and tg128, within a trained `context`: the prompt of pp is at most the
    context; tg starts after a 16-token prompt and its first choice, so it gets the rest."""
    return min(512, context), min(128, context - 17)


def measure_speed(llm, prompt_ids: list[int], repeats: int = 3, requests: int = LATENCY_REQUESTS) -> dict:
    """pp512, tg128 (shorter within a shorter trained context: `speed_lengths`), time to first
    token and request latency percentiles."""
    n_pp, n_tg = speed_lengths(usable_context(llm))
    pp_ids = (prompt_ids * (n_pp // max(len(prompt_ids), 1) + 1))[:n_pp]
    pp, tg = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(pp_ids)
        pp.append(n_pp / (time.perf_counter() - t))
        _, times = greedy_decode(llm, pp_ids[:16], n_tg + 1)  # n_tg evaluations of one token after the first choice
        tg.append(n_tg / (times[-1] - times[0]))
    ttft, latency = [], []
    for _ in range(requests):
        _, times = greedy_decode(llm, pp_ids[:PROMPT_TOKENS], ANSWER_TOKENS)
        ttft.append(times[0])
        latency.append(times[-1])
    return {
        "pp_tokens": n_pp,
        "tg_tokens": n_tg,
        "pp_tokens_per_s": _spread(pp),
        "tg_tokens_per_s": _spread(tg),
        "time_to_first_token_s": statistics.median(ttft),
        "latency_s": latency_percentiles(latency),
    }


SPEED_TEXT = 'def mean(values):\n    """The arithmetic mean."""\n    return sum(values) / len(values)\n'


def interleaved_speed(paths: dict[str, Path], repeats: int = 5, text: str = SPEED_TEXT) -> dict[str, dict]:
    """pp and tg tokens/s of each GGUF in `paths`, measured in turns (A, B, A, B, ...) in this one
    process, so that every repeat of one met the machine load the other's did beside it: the
    differences pair up by repeat. One length for all (`speed_lengths` of the shortest context);
    returns name -> {"pp": [tokens/s per repeat], "tg": [...], "pp_tokens", "tg_tokens"}."""
    llms = {name: load(Path(p)) for name, p in paths.items()}
    try:
        n_pp, n_tg = speed_lengths(min(usable_context(llm) for llm in llms.values()))
        ids = {}
        for name, llm in llms.items():
            own = llm.tokenize(text.encode(), add_bos=False, special=False)
            ids[name] = (own * (n_pp // max(len(own), 1) + 1))[:n_pp]
        out = {name: {"pp": [], "tg": [], "pp_tokens": n_pp, "tg_tokens": n_tg} for name in llms}
        for _ in range(repeats):
            for name, llm in llms.items():
                llm.reset()
                t = time.perf_counter()
                llm.eval(ids[name])
                out[name]["pp"].append(n_pp / (time.perf_counter() - t))
                _, times = greedy_decode(llm, ids[name][:16], n_tg + 1)
                out[name]["tg"].append(n_tg / (times[-1] - times[0]))
        return out
    finally:
        for llm in llms.values():
            llm.close()


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
llm.eval(llm.tokenize(b"def main():\\n    return 0\\n" * 8, add_bos=False)[: int(sys.argv[2])])  # within the context
print(json.dumps({"imported_mb": imported, "peak_mb": status("VmHWM")}))
llm.close()
"""


def memory_contexts(trained: int, quick: bool) -> list[int]:
    """The context sizes memory is measured at: 512, 1024 and 2048 (512 alone when quick), those
    within the `trained` context, and the trained context when a size is past it."""
    asked = (512,) if quick else (512, 1024, 2048)
    return sorted({min(n, trained) for n in asked})


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


def last_level_cache_bytes() -> int | None:
    """Size of the largest data cache of CPU 0 (Linux sysfs), or None where it cannot be read."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes[level] = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return sizes[max(sizes)] if sizes else None


def copy_together(parts: list[tuple[np.ndarray, np.ndarray]], rounds: int) -> list[list[tuple[float, float]]]:
    """Copy each (dst, src) part on a thread of its own, all released together by a barrier, for
    `rounds` rounds; each round's (start, end) per part. A pool could run two parts one after the
    other on one thread under load, and a "2-thread" figure would then be one thread's."""
    n, errors = len(parts), []
    start, done = threading.Barrier(n + 1), threading.Barrier(n + 1)
    spans: list[list[tuple[float, float]]] = [[(0.0, 0.0)] * n for _ in range(rounds)]

    def work(i: int) -> None:
        try:
            for r in range(rounds):
                start.wait()
                t0 = time.perf_counter()
                np.copyto(*parts[i])
                spans[r][i] = (t0, time.perf_counter())
                done.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            start.abort()
            done.abort()

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for w in workers:
        w.start()
    try:
        for _ in range(rounds):
            start.wait()
            done.wait()
    except threading.BrokenBarrierError:
        pass
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return spans


def overlapped(spans: list[tuple[float, float]]) -> bool:
    """Whether every part was copying at one same moment (the last to start began before the first ended)."""
    return max(a for a, _ in spans) < min(b for _, b in spans)


def memory_bandwidth(threads: int = THREADS, mb: int = 256, repeats: int = 3) -> float:
    """Bytes/s (read + write) this machine moves in a large copy split over `threads` threads, as
    llama.cpp splits its work over THREADS: best of `repeats` rounds in which all threads' copies
    overlapped (a round where one thread finished before another began is not a `threads`-thread
    figure; up to 4x `repeats` rounds are tried). numpy releases the GIL while it copies. The
    buffer (at least 4x the last-level cache) keeps the copy out of the cache."""
    size = max(mb * 2**20, 4 * (last_level_cache_bytes() or 0)) // 8 * 8
    src = np.ones(size // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    copy_together(parts, 1)  # first touch of dst's pages, outside the timing
    best, counted, fallback = 0.0, 0, 0.0
    for _ in range(4 * repeats):
        (spans,) = copy_together(parts, 1)
        rate = 2 * src.nbytes / (max(b for _, b in spans) - min(a for a, _ in spans))
        fallback = max(fallback, rate)
        if overlapped(spans):
            best, counted = max(best, rate), counted + 1
            if counted == repeats:
                break
    return best or fallback


def bandwidth_bound_fraction(size_bytes: int, tokens_per_s: float, bandwidth: float, cache_bytes: int | None):
    """Generation speed over the bandwidth bound (every weight read once per token), or None for a
    file that fits the last-level cache (or a cache of unknown size): its weights need not come
    from memory at all, so the memory bound says nothing about it."""
    if cache_bytes is None or size_bytes <= cache_bytes:
        return None
    return size_bytes * tokens_per_s / bandwidth


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per million tokens of one batch-1 stream that keeps the machine busy all hour."""
    return price_per_hour / (tokens_per_s * 3600) * 1e6


def benchmark_file(
    path: Path, prompt_ids: list[int], bandwidth: float, price_per_hour: float, quick: bool = False,
    requests: int = LATENCY_REQUESTS, cache_bytes: int | None = None,
) -> dict:  # fmt: skip
    """Speed and memory of one GGUF file (no HF model needed). `bandwidth` was measured on THREADS
    threads; `cache_bytes` is the last-level cache (None: unknown, no bandwidth fraction)."""
    requests = min(requests, QUICK_REQUESTS) if quick else requests
    context = declared_context(path)
    llm = load(path, n_ctx=512)  # pp512 at most; a model declaring less runs within it
    try:
        speed = measure_speed(llm, prompt_ids, repeats=1 if quick else 3, requests=requests)
    finally:
        llm.close()
    size = Path(path).stat().st_size
    tg = speed["tg_tokens_per_s"]["median"]
    return {
        "file": str(path),
        "size_bytes": size,
        "context_length": context,
        **speed,
        "quick": quick,
        "peak_rss_mb": peak_memory(path, memory_contexts(context, quick)),
        "bandwidth_bound_fraction": bandwidth_bound_fraction(size, tg, bandwidth, cache_bytes),
        "cost_per_million_tokens": cost_per_million_tokens(price_per_hour, tg),
        "assumptions": {
            "threads": THREADS,
            "bandwidth_gb_s": bandwidth / 1e9,
            "last_level_cache_bytes": cache_bytes,
            "price_per_hour": price_per_hour,
            "streams": 1,
            "batch_size": 1,
        },  # fmt: skip
    }


def parity(path: Path, tokenizer, texts: list[str], eval_ids: list[int], window: int, hf_ppl: float) -> dict:
    llm = load(path, n_ctx=window, logits_all=True)  # windows are at most the trained context
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


def _latency_cell(r: dict) -> str:
    lat = r["latency_s"]
    ms = "/".join(f"{lat[p] * 1000:.1f}" for p in ("p50", "p95", "p99"))
    return f"{ms} ({'quick: ' if r.get('quick') else ''}{lat['requests']} requests)"


def _bandwidth_cell(r: dict) -> str:
    if r["bandwidth_bound_fraction"] is not None:
        return f"{r['bandwidth_bound_fraction']:.0%}"
    return "cache-resident" if r["assumptions"]["last_level_cache_bytes"] else "cache size unknown"


def markdown_table(results: dict) -> str:
    """The results of `benchmark_file` (kind -> result) as a Markdown table, with the assumptions
    behind the latency, bandwidth and cost columns under it."""
    first = next(iter(results.values()), None)
    pp, tg = (first["pp_tokens"], first["tg_tokens"]) if first else (512, 128)
    contexts = "/".join(first["peak_rss_mb"]["model"]) if first else "512/1024/2048"
    head = (
        f"| file | size MB | pp{pp} tok/s | tg{tg} tok/s | TTFT ms | P50/P95/P99 ms "
        f"| model RSS MB ({contexts}) | ppl (HF) | BW bound | $/M tok |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---|---|---|---:|---:|"]
    for kind, r in results.items():
        rss = "/".join(f"{v:.0f}" for v in r["peak_rss_mb"]["model"].values())
        p = r.get("parity", {})
        ppl = f"{p['perplexity']:.2f} ({p['hf_perplexity']:.2f})" if p else "-"
        lines.append(
            f"| {kind} | {r['size_bytes'] / 2**20:.1f} | {r['pp_tokens_per_s']['median']:.0f} | "
            f"{r['tg_tokens_per_s']['median']:.0f} | {r['time_to_first_token_s'] * 1000:.1f} | "
            f"{_latency_cell(r)} | {rss} | {ppl} | {_bandwidth_cell(r)} | {r['cost_per_million_tokens']:.3f} |"
        )
    if not results:
        return "\n".join(lines)
    a = next(iter(results.values()))["assumptions"]
    cache = a["last_level_cache_bytes"]
    cache_words = f"the {cache / 2**20:.0f} MB last-level cache" if cache else "the last-level cache (size unknown)"
    quick = (
        "; quick mode: too few requests for P95/P99 to mean much" if any(r["quick"] for r in results.values()) else ""
    )
    trained = "" if (pp, tg) == (512, 128) else (
        f"pp{pp}/tg{tg} in place of llama-bench's pp512/tg128: the model was trained on "
        f"{first['context_length']} positions and is measured within them. "
    )  # fmt: skip
    lines += [
        "",
        f"{trained}tg{tg} and latency decode greedily on {a['threads']} threads. Latency: per request, a "
        f"{PROMPT_TOKENS}-token prompt, then {ANSWER_TOKENS} generated tokens{quick}.",
        f"BW bound: tg{tg} x file size / {a['bandwidth_gb_s']:.1f} GB/s (a copy on {a['threads']} threads); "
        f"not given for a file that fits {cache_words}: its weights need not come from memory.",
        f"$/M tok: one batch-1 stream at the tg{tg} rate, busy all hour, on a machine at "
        f"${a['price_per_hour']:.2f}/hour "
        "(gguf.price_per_hour, or bench --price-per-hour); prompt processing not counted.",
    ]
    return "\n".join(lines)


def benchmark_all(files: dict, checkpoint: Path, validation_texts: list[str], settings) -> dict:
    """Parity against `checkpoint` and speed/memory for each GGUF in `files` (kind -> path)."""
    from transformers import AutoTokenizer

    from pipeline.train.tokenizer import ROUND_TRIP_SAMPLES, document_stream

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    encoded = (tok.encode(text, add_special_tokens=False) for text in validation_texts)  # only as many as needed
    ids = list(itertools.islice(document_stream(tok, encoded), settings.eval_tokens))
    if len(ids) < 2:
        raise KilnError("no validation text to measure perplexity on")
    window = within_context(settings.window, checkpoint, "gguf.window")
    hf_ppl = hf_perplexity(checkpoint, ids, window)
    bandwidth, cache = memory_bandwidth(THREADS), last_level_cache_bytes()
    texts = validation_texts[:50] + ROUND_TRIP_SAMPLES
    results = {}
    for kind, path in files.items():
        r = benchmark_file(
            path, ids[:512], bandwidth, settings.price_per_hour, quick=settings.quick,
            requests=settings.latency_requests, cache_bytes=cache,
        )  # fmt: skip
        r["parity"] = parity(path, tok, texts, ids, window, hf_ppl)
        r["parity"]["passed"] = parity_passed(kind, r["parity"])
        results[kind] = r
    return {"machine_bandwidth_gb_s": bandwidth / 1e9, "threads": THREADS, "last_level_cache_bytes": cache,
            "files": results}  # fmt: skip
