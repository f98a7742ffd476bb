"""Serving under load: kiln serve against llama-server alone and llama-cpp-python's server, and faults.

    python benchmarks/serve_load.py [--gguf FILE] [--seconds 15] [--concurrency 1 4 16 64] [--json out.json]
                                    [--servers kiln pool-direct] [--skip-faults]

All in one run, on one GGUF (the tiny profile's Q4_K_M after `make run`, else a stand-in of the
tiny profile's shape with random weights: speed, not sense), every server on loopback:

  kiln         kiln serve --replicas 2 (the gateway, least-busy routing over two llama-servers)
  pool-direct  the same two llama-servers, the client alternating between them (no gateway)
  llama-server one llama-server, with as many threads as one of kiln's replicas and all the slots
               (more threads than that only make ggml's spinning threads fight over 2 busy cores)
  llama-cpp-py llama-cpp-python's own OpenAI server (one request at a time: the naive anchor)
  kiln-remote  kiln serve --replicas 0 over two `kiln replica` processes on 127.0.0.2 and 127.0.0.3 (the
               same two llama-servers as "remote" hosts; a registry of the GGUF made in a temp folder)
  kiln-untraced  kiln with KILN_TRACE_SAMPLE=0: what writing every answer as an MLflow trace costs
  relay        benchmarks/relay.py over two llama-servers niced as kiln's replicas are: the least a
               Python gateway does (least-busy choice, the stream written back chunk by chunk), the
               floor for kiln's own cost

The load is a bounded async client: N workers, each sending streamed `/v1/completions` (64 new
tokens, EOS banned so every answer has the same length) back to back for a fixed time. Printed:
requests/s, generated tokens/s, P50/P95/P99 latency and time to first token, 429s and other
errors. Then the faults, against kiln: overload (only 429s, no 5xx), a hot swap after a
promotion under load (no failed request), a replica killed with SIGKILL under load (only its
in-flight requests may fail; the time until the pool is whole again), the fault table of
benchmarks/serve_faults.py (clients leaving at three moments, a SIGSTOPped replica, a replica
crash-looping on start, a canary that cannot start), and the prompt cache (TTFT of a prompt
sharing a prefix of half the model's context with the previous one against one that does not).
Where kiln's time to first token goes: its own /metrics split it into the admission wait and the
upstream's first token; the rest (client-measured minus gateway-measured) is HTTP and event loop.
Goals: kiln >= 0.95 x pool-direct tokens/s at 16 clients; kiln >= 3 x llama-cpp-py at 16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import serve_faults  # noqa: E402  (benchmarks/serve_faults.py)
from serve_procs import (  # noqa: E402  (benchmarks/serve_procs.py; gateway_cpu and serve_faults take them from here)
    REPLICA_NICE,
    Proc,
    eos_id,
    kiln,
    llama_cpp_python,
    llama_server,
    relay,
    stand_in_gguf,
)

from pipeline.io import free_port  # noqa: E402
from pipeline.serve import engine  # noqa: E402

MAX_TOKENS = 64
SWAP_WAIT_S = 120.0  # how long the hot-swap step waits for the new version to serve
# every sampler value spelled out, so no server (nor kiln's default preset) samples differently
SAMPLER = {"temperature": 0.0, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.0}
WORDS = [
    "the",
    "model",
    "reads",
    "tokens",
    "and",
    "predicts",
    "the",
    "next",
    "one",
    "while",
    "data",
    "flows",
    "through",
    "the",
    "pipeline",
]


async def one_request(session, url: str, prompt: str, ban: dict, stats: dict) -> None:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True, "logit_bias": ban, **SAMPLER}
    start = time.monotonic()
    ttft, tokens = None, 0
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                stats["429" if r.status == 429 else "errors"] += 1
                stats["statuses"][r.status] = stats["statuses"].get(r.status, 0) + 1
                if r.status == 429:
                    await asyncio.sleep(0.05)
                return
            async for line in r.content:
                if line.startswith(b"data: {"):
                    if b'"error"' in line:
                        stats["errors"] += 1
                        return
                    if ttft is None:  # the first event is the first token (its text may be a partial character)
                        ttft = time.monotonic() - start
                    if b'"finish_reason":null' in line or b'"finish_reason": null' in line:
                        tokens += 1
    except aiohttp.ClientError as exc:
        stats["errors"] += 1
        kind = f"{type(exc).__name__}: {str(exc)[:80]}"
        stats["statuses"][kind] = stats["statuses"].get(kind, 0) + 1
        return
    stats["latency"].append(time.monotonic() - start)
    stats["ttft"].append(ttft if ttft is not None else time.monotonic() - start)
    stats["tokens"] += tokens
    stats["ok"] += 1


async def load(urls: list[str], clients: int, seconds: float, ban: dict) -> dict:
    """`clients` workers back to back for `seconds`; with several urls the workers alternate between them."""
    stats = {"ok": 0, "429": 0, "errors": 0, "tokens": 0, "latency": [], "ttft": [], "statuses": {}}
    end = time.monotonic() + seconds
    # one connection per request for every server alike: llama-server closes idle keep-alive connections
    # on its own schedule, and a request written to one of them fails
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def worker(i: int) -> None:
            n = 0
            while time.monotonic() < end:
                prompt = f"{random.choice(WORDS)} {i} {n} " + " ".join(random.choice(WORDS) for _ in range(12))
                await one_request(session, urls[(i + n) % len(urls)], prompt, ban, stats)
                n += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    return summarize(stats, elapsed)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1)


def summarize(stats: dict, elapsed: float) -> dict:
    return {
        "requests_per_s": round(stats["ok"] / elapsed, 2), "tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "p50_ms": _pct(stats["latency"], 0.5), "p95_ms": _pct(stats["latency"], 0.95),
        "p99_ms": _pct(stats["latency"], 0.99), "ttft_p50_ms": _pct(stats["ttft"], 0.5),
        "ttft_p95_ms": _pct(stats["ttft"], 0.95), "ttft_p99_ms": _pct(stats["ttft"], 0.99),
        "ok": stats["ok"], "429": stats["429"], "errors": stats["errors"], "statuses": stats["statuses"],
    }  # fmt: skip


def table(results: dict) -> str:
    cols = ["requests_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms"]
    lines = ["| server | clients | " + " | ".join(cols) + " | 429 | errors |", "|" + "---|" * (len(cols) + 4)]
    for name, by_c in results.items():
        for c, r in by_c.items():
            lines.append(
                f"| {name} | {c} | " + " | ".join(str(r[k]) for k in cols) + f" | {r['429']} | {r['errors']} |"
            )
    return "\n".join(lines)


async def throughput(args, binary: Path, gguf: Path, ban: dict, tmp: Path) -> dict:
    threads = os.cpu_count() or 2
    results: dict[str, dict] = {}
    setups = {
        "kiln": lambda: [kiln(gguf, 2, args.slots)],
        "pool-direct": lambda: [llama_server(binary, gguf, args.slots, 1) for _ in range(2)],
        "llama-server": lambda: [llama_server(binary, gguf, 2 * args.slots, max(1, threads // 2))],
        "llama-cpp-py": lambda: [llama_cpp_python(gguf, threads)],
        "kiln-remote": lambda: kiln_remote(gguf, args.slots, tmp),
        "kiln-untraced": lambda: [kiln(gguf, 2, args.slots, {"KILN_TRACE_SAMPLE": "0"})],
        "relay": lambda: relay([llama_server(binary, gguf, args.slots, 1, REPLICA_NICE) for _ in range(2)]),
    }
    setups = {name: make for name, make in setups.items() if name in args.servers}
    for name, make in setups.items():
        procs = make()
        if asyncio.iscoroutine(procs):
            procs = await procs
        try:
            for p in procs:
                await p.ready()
            gateway_first = name.startswith("kiln") or name == "relay"
            urls = [procs[0].url] if gateway_first else [p.url for p in procs]
            await load(urls, 2, 2, ban)  # warm-up
            results[name] = {}
            for c in args.concurrency:
                gateway = _cpu_seconds(procs[0].proc.pid) if gateway_first else None
                results[name][c] = await load(urls, c, args.seconds, ban)
                if gateway is not None:  # the gateway's own CPU per 1000 relayed tokens (its replicas excluded)
                    tokens = results[name][c]["tokens_per_s"] * args.seconds
                    used = _cpu_seconds(procs[0].proc.pid) - gateway
                    results[name][c]["gateway_cpu_ms_per_1k_tokens"] = round(1e6 * used / max(tokens, 1), 1)
                    if name != "relay":  # the relay keeps no histograms
                        results[name][c]["ttft_split_ms"] = await ttft_split(procs[0].url, results[name][c])
                print(f"{name:>13} c={c:<3} {json.dumps(results[name][c])}", flush=True)
        finally:
            for p in procs:
                p.stop()
    return results


async def overload(gguf: Path, ban: dict, seconds: float) -> dict:
    p = kiln(gguf, 2, 2, {"MAX_CONCURRENT_INFERENCE": "4", "KILN_MAX_QUEUE": "4"})
    try:
        await p.ready()
        return await load([p.url], 64, seconds, ban)
    finally:
        p.stop()


def _histogram_means(text: str, name: str, route: str) -> float | None:
    """The mean of a Prometheus histogram's series for `route`, summed over its other labels."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_sum{{") and f'route="{route}"' in line:
            total += float(line.split()[-1])
        elif line.startswith(f"{name}_count{{") and f'route="{route}"' in line:
            count += float(line.split()[-1])
    return total / count if count else None


async def ttft_split(url: str, result: dict) -> dict:
    """Mean time to first token as kiln's /metrics splits it (over the whole run, warm-up included):
    admission wait, upstream (gateway-measured TTFT minus the wait), and what is left of the client's
    median for HTTP parsing, the event loop and relaying."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    queue = _histogram_means(text, "kiln_queue_wait_seconds", "/v1/completions") or 0.0
    gateway = _histogram_means(text, "kiln_time_to_first_token_seconds", "/v1/completions") or 0.0
    return {
        "admission_mean_ms": round(1000 * queue, 1), "upstream_first_token_mean_ms": round(1000 * (gateway - queue), 1),
        "gateway_ttft_mean_ms": round(1000 * gateway, 1), "client_ttft_p50_ms": result["ttft_p50_ms"],
    }  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def replica_pids(gateway_pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(gateway_pid).children() if "llama-server" in c.name()]


async def kill_one_replica(gguf: Path, ban: dict, seconds: float) -> dict:
    p = kiln(gguf, 2, 4)
    try:
        await p.ready()
        run = asyncio.create_task(load([p.url], 16, seconds, ban))
        await asyncio.sleep(seconds / 3)
        victim = replica_pids(p.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        recovered = None
        async with aiohttp.ClientSession() as s:
            while recovered is None and time.monotonic() - killed < seconds:
                await asyncio.sleep(0.05)
                async with s.get(p.url + "/") as r:
                    info = await r.json()
                if info["replicas"]["ready"] == 2 and victim not in replica_pids(p.proc.pid):
                    recovered = time.monotonic() - killed
        result = await run
        result["recovery_s"] = None if recovered is None else round(recovered, 2)
        return result
    finally:
        p.stop()


def bench_registry(gguf: Path, tmp: Path) -> tuple[str, Path]:
    """A sqlite registry of kiln-bench in `tmp` (once): versions 1 and 2 both `gguf`, production -> 1.
    Returns the tracking URI and the profile file."""
    from pipeline.release import registry
    from pipeline.tracking import pipeline_run

    uri, profile = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "bench.yaml"
    if profile.exists():
        registry.promote(uri, "bench", "1")
        return uri, profile
    for n in (1, 2):
        bundle = tmp / f"bundle{n}" / "gguf"
        bundle.mkdir(parents=True)
        (bundle / "kiln-bench-Q4_K_M.gguf").write_bytes(gguf.read_bytes())
        registry.register(uri, "bench", pipeline_run(uri, "bench", f"run-{n}"), bundle.parent, {}, gate_passed=True)
    registry.promote(uri, "bench", "1")
    profile.write_text("base: tiny\n")
    return uri, profile


REMOTE_KEY = "bench-replica-key"


async def kiln_remote(gguf: Path, slots: int, tmp: Path) -> list[Proc]:
    """kiln serve with no local replica over two `kiln replica` processes on 127.0.0.2 and 127.0.0.3
    (the gateway first in the list: its CPU is measured)."""
    uri, profile = bench_registry(gguf, tmp)
    registry_args = ["--profile", str(profile), "--tracking-uri", uri]
    env = {
        "KILN_CACHE_DIR": str(tmp / "cache"), "KILN_LLAMA_SERVER": str(engine.locate()), "KILN_REPLICA_KEY": REMOTE_KEY,
        "KILN_SLOTS": str(slots), "KILN_THREADS": "1", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    replicas = []
    for host in ("127.0.0.2", "127.0.0.3"):
        port = free_port(host, pair=True)
        cmd = [sys.executable, "-m", "pipeline.cli", "replica", *registry_args, "--host", host, "--port", str(port)]
        replicas.append(Proc(f"kiln-replica-{port}", cmd, port, env, host=host))
    for r in replicas:
        await r.ready()
    gateway = kiln(None, 0, slots, {**env, "KILN_REPLICA_URLS": ",".join(r.url for r in replicas)}, registry_args)
    return [gateway, *replicas]


async def hot_swap(gguf: Path, ban: dict, seconds: float, tmp: Path) -> dict:
    from pipeline.release import registry

    uri, profile = bench_registry(gguf, tmp)
    env = {"KILN_POLL_SEC": "0.5", "KILN_CACHE_DIR": str(tmp / "cache"), "KILN_LLAMA_SERVER": str(engine.locate())}
    p = kiln(None, 2, 4, env, ["--profile", str(profile), "--tracking-uri", uri])
    try:
        await p.ready()
        run = asyncio.create_task(load([p.url], 16, seconds, ban))
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(registry.promote, uri, "bench", "2")
        promoted = time.monotonic()
        swapped = None
        async with aiohttp.ClientSession() as s:
            # the new version's replicas load and warm up on cores the load keeps busy: on a loaded
            # 2-core machine that can outlast the load itself, so the wait is its own
            while swapped is None and time.monotonic() - promoted < SWAP_WAIT_S:
                await asyncio.sleep(0.05)
                async with s.get(p.url + "/") as r:
                    if (await r.json())["version"] == "2":
                        swapped = time.monotonic() - promoted
        result = await run
        result["swap_s"] = None if swapped is None else round(swapped, 2)
        result["swapped_under_load"] = swapped is not None and swapped < seconds * 2 / 3
        return result
    finally:
        p.stop()


def prefix_words(context: int) -> int:
    """How many of WORDS make a shared prefix of about half the model's context (a word is one to two
    tokens of kiln's BPE): the prefix, the question and the answer then fit in one slot."""
    return max(8, context // 4)


async def prompt_cache(gguf: Path, rounds: int = 8) -> dict:
    from pipeline.gguf import declared_context

    context = min(2048, declared_context(gguf))  # a slot's context: kiln caps the presets' at the GGUF's
    words = prefix_words(context)
    p = kiln(gguf, 1, 1)
    shared = " ".join(random.Random(1).choice(WORDS) for _ in range(words))
    try:
        await p.ready()
        same, other, prompt_tokens = [], [], []
        async with aiohttp.ClientSession() as s:

            async def ttft(prompt: str) -> float:
                start = time.monotonic()
                body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
                async with s.post(p.url + "/v1/completions", json=body) as r:
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            if b'"error"' in line:
                                raise RuntimeError(f"prompt of {words} words in a {context}-token context: {line!r}")
                            return time.monotonic() - start
                raise RuntimeError(f"no token (HTTP {r.status}) for a prompt of {words} words")

            async with s.post(p.url + "/v1/completions", json={"prompt": shared, "max_tokens": 1}) as r:
                prompt_tokens.append((await r.json())["usage"]["prompt_tokens"])
            for i in range(rounds):
                await ttft(shared + f" question {i}")
                same.append(await ttft(shared + f" another question {i}"))  # shares the long prefix
                fresh = " ".join(random.Random(100 + i).choice(WORDS) for _ in range(words))
                other.append(await ttft(fresh + f" question {i}"))  # same length, nothing cached
        return {
            "context": context, "prefix_tokens": prompt_tokens[0],
            "shared_prefix_ttft_ms": round(1000 * statistics.median(same), 1),
            "fresh_prompt_ttft_ms": round(1000 * statistics.median(other), 1),
        }  # fmt: skip
    finally:
        p.stop()


async def tracing(args, gguf: Path, ban: dict, tmp: Path) -> dict:
    """`--tracing`: kiln with every answer traced (a fresh sqlite store) against kiln with tracing off
    (KILN_TRACE_SAMPLE=0), both up at once and loaded in turn (off, on, off, on, ... `--rounds` times
    each) so drift of the shared machine falls on both alike. Goal: on >= 0.95 x off tokens/s at 16
    clients, no failed request; traces the writer had to drop are counted (kiln_traces_dropped_total)."""
    uri = f"sqlite:///{tmp / 'traces.db'}"
    on = kiln(gguf, 2, args.slots, {"KILN_TRACE_SAMPLE": "1"}, ["--tracking-uri", uri])
    off = kiln(gguf, 2, args.slots, {"KILN_TRACE_SAMPLE": "0"}, ["--tracking-uri", uri])
    report: dict = {}
    try:
        for p in (on, off):
            await p.ready()
            await load([p.url], 2, 2, ban)  # warm-up (and the serving experiment created)
        for c in args.concurrency:
            runs: dict[str, list[dict]] = {"off": [], "on": []}
            for _ in range(args.rounds):
                for name, p in (("off", off), ("on", on)):
                    runs[name].append(await load([p.url], c, args.seconds, ban))
            report[c] = {name: _combined(r) for name, r in runs.items()}
            ratio = report[c]["on"]["tokens_per_s"] / max(report[c]["off"]["tokens_per_s"], 1e-9)
            report[c]["on_over_off"] = round(ratio, 3)
            print(f"tracing c={c:<3} {json.dumps(report[c])}", flush=True)
        async with aiohttp.ClientSession() as s, s.get(on.url + "/metrics") as r:
            text = await r.text()
        report["trace_counters"] = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines() if line.startswith(("kiln_traces_written_total", "kiln_traces_dropped_total"))
        }  # fmt: skip
    finally:
        on.stop()
        off.stop()
    return report


def _combined(runs: list[dict]) -> dict:
    """Rounds of one server as one figure: rates averaged, counts summed."""
    out = {k: round(statistics.mean(r[k] for r in runs), 2) for k in ("requests_per_s", "tokens_per_s")}
    out.update({k: sum(r[k] for r in runs) for k in ("ok", "429", "errors")})
    out["p50_ms"] = round(statistics.median(r["p50_ms"] for r in runs if r["p50_ms"] is not None), 1)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=ROOT / "data/work/tiny/gguf_model/kiln-tiny-Q4_K_M.gguf")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--slots", type=int, default=8, help="parallel sequences per kiln replica")
    parser.add_argument("--skip-faults", action="store_true")
    parser.add_argument("--servers", nargs="+", default=["kiln", "pool-direct", "llama-server", "llama-cpp-py"],
                        choices=["kiln", "pool-direct", "llama-server", "llama-cpp-py", "kiln-remote",
                                 "kiln-untraced", "relay"])  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tracing", action="store_true", help="only kiln with tracing on against off (see tracing)")
    parser.add_argument("--rounds", type=int, default=3, help="--tracing: turns of load on each server")
    args = parser.parse_args()
    binary = engine.build()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf if args.gguf.exists() else stand_in_gguf(Path(tmp))
        print(f"GGUF {gguf} ({gguf.stat().st_size / 2**20:.1f} MB); llama-server {binary}", flush=True)
        ban = {str(eos_id(gguf)): -100}
        report = {"gguf": str(gguf), "seconds": args.seconds, "max_tokens": MAX_TOKENS}
        if args.tracing:  # tracing's cost alone
            report["tracing"] = await tracing(args, gguf, ban, Path(tmp))
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
            return
        report["load"] = await throughput(args, binary, gguf, ban, Path(tmp))
        if not args.skip_faults:
            report["overload"] = await overload(gguf, ban, args.seconds)
            print("overload", json.dumps(report["overload"]), flush=True)
            report["hot_swap"] = await hot_swap(gguf, ban, args.seconds * 2, Path(tmp))
            print("hot swap", json.dumps(report["hot_swap"]), flush=True)
            report["replica_killed"] = await kill_one_replica(gguf, ban, args.seconds * 2)
            print("replica killed", json.dumps(report["replica_killed"]), flush=True)
            report["prompt_cache"] = await prompt_cache(gguf)
            print("prompt cache", json.dumps(report["prompt_cache"]), flush=True)
            report["faults"] = await serve_faults.run_all(gguf, ban, kiln)
            print(serve_faults.table(report["faults"]), flush=True)
    print()
    print(table(report["load"]))
    load_ = report["load"]
    if 16 in args.concurrency and {"kiln", "pool-direct"} <= set(load_):
        k, d = load_["kiln"][16], load_["pool-direct"][16]
        print(
            f"\nat 16 clients: kiln / pool-direct {k['tokens_per_s'] / d['tokens_per_s']:.3f} (goal >= 0.95); "
            f"TTFT P50 {k['ttft_p50_ms']} vs {d['ttft_p50_ms']} ms ({k['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x, "
            f"goal <= 1.5x), P95 {k['ttft_p95_ms']} vs {d['ttft_p95_ms']} ms; kiln's split: {k['ttft_split_ms']}"
        )
        if "kiln-remote" in load_:
            r = load_["kiln-remote"][16]
            print(f"kiln over 2 remote replicas / kiln over 2 local: {r['tokens_per_s'] / k['tokens_per_s']:.3f} "
                  f"tokens/s, TTFT P50 {r['ttft_p50_ms']} vs {k['ttft_p50_ms']} ms")  # fmt: skip
        if "kiln-untraced" in load_:
            u = load_["kiln-untraced"][16]
            print(f"kiln untraced / pool-direct {u['tokens_per_s'] / d['tokens_per_s']:.3f} tokens/s, TTFT P50 "
                  f"{u['ttft_p50_ms']} vs {d['ttft_p50_ms']} ms ({u['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x); "
                  f"traced / untraced {k['tokens_per_s'] / u['tokens_per_s']:.3f}")  # fmt: skip
        if "relay" in load_:
            r = load_["relay"][16]
            print(f"bare Python relay / pool-direct {r['tokens_per_s'] / d['tokens_per_s']:.3f} tokens/s, TTFT P50 "
                  f"{r['ttft_p50_ms']} vs {d['ttft_p50_ms']} ms ({r['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x); "
                  f"kiln / relay {k['tokens_per_s'] / r['tokens_per_s']:.3f}")  # fmt: skip
        for other in ("llama-server", "llama-cpp-py"):
            if other in load_:
                print(f"kiln / {other} {k['tokens_per_s'] / max(load_[other][16]['tokens_per_s'], 1e-9):.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
