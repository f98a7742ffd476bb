"""The fault table of `kiln serve` (run by benchmarks/serve_load.py, or alone):

    python benchmarks/serve_faults.py [--gguf FILE] [--seconds 12]

For each fault, against a real gateway and llama-server replicas on loopback: the requests that
failed (of those that did not cause the fault themselves) and the seconds until the capacity was
back (every place free again, or the pool whole again).

  leave-while-computing   8 clients leave non-streamed requests mid-answer
  leave-while-queued      8 clients leave streams still queued for admission
  leave-before-first      8 clients leave streams waiting for a first token (replica stopped)
  replica-sigstop         one of two replicas SIGSTOPped under load, SIGCONTed later
  replica-crash-loop      one of two replicas crashes at every start for a while, under load
  canary-cannot-start     the canary's GGUF cannot load; production under load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENDLESS = {"prompt": "x", "max_tokens": 100000, "ignore_eos": True}


async def gauges(url: str) -> dict[str, float]:
    """kiln's /metrics as {series: value} (series with their labels)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


async def wait_until(check, timeout: float = 120.0) -> float:
    """Seconds until `await check()` is true (polled every 20 ms); raises after `timeout`."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"not within {timeout} s: {check.__name__}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def raw(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + data)
    return sock


async def leave(kiln, gguf: Path, moment: str, n: int = 8) -> dict:
    from serve_load import replica_pids

    env = {"MAX_CONCURRENT_INFERENCE": str(n), "KILN_MAX_QUEUE": str(2 * n), "KILN_CONTEXT_SHIFT": "true"}
    p = kiln(gguf, 1, 2, env)
    try:
        await p.ready()
        metrics = lambda: gauges(p.url)  # noqa: E731

        async def in_flight(k):
            return (await metrics()).get("kiln_requests_in_flight", -1) == k

        holders, stopped = [], None
        stream = {**ENDLESS, "stream": True}
        if moment == "queued":
            holders = [raw(p.url, "/v1/completions", stream) for _ in range(n)]
            await wait_until(lambda: in_flight(n))
        if moment == "before-first":
            stopped = replica_pids(p.proc.pid)[0]
            os.kill(stopped, signal.SIGSTOP)
        leaving = [raw(p.url, "/v1/completions", ENDLESS if moment == "computing" else stream) for _ in range(n)]

        async def arrived():
            m = await metrics()
            key = "kiln_requests_queued" if moment == "queued" else "kiln_requests_in_flight"
            return m.get(key, -1) == n

        await wait_until(arrived)
        left = time.monotonic()
        for sock in leaving:
            sock.close()

        async def free():
            m = await metrics()
            return m.get("kiln_requests_queued", -1) == 0 and m.get("kiln_requests_in_flight", -1) == len(holders)

        await wait_until(free)
        freed = time.monotonic() - left
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        for sock in holders:
            sock.close()

        async def idle():
            m = await metrics()
            busy = sum(v for k, v in m.items() if k.startswith("kiln_replica_requests{"))
            return m.get("kiln_requests_in_flight", -1) == 0 and busy == 0

        await wait_until(idle)
        return {
            "failed": 0,
            "places_free_s": round(freed, 3),
            "generation_stopped_s": round(time.monotonic() - left, 3),
        }
    finally:
        p.stop()


async def _load_with(kiln, gguf: Path, ban: dict, seconds: float, env: dict, fault) -> dict:
    from serve_load import load

    p = kiln(gguf, 2, 4, env)
    try:
        await p.ready()
        run = asyncio.create_task(load([p.url], 16, seconds, ban))
        await asyncio.sleep(seconds / 4)
        extra = await fault(p)
        result = await run
        return {"failed": result["errors"], "ok": result["ok"], **extra}
    finally:
        p.stop()


async def _ready(url: str, n: int) -> bool:
    async with aiohttp.ClientSession() as s, s.get(url + "/") as r:
        return (await r.json())["replicas"]["ready"] == n


async def sigstop(kiln, gguf: Path, ban: dict, seconds: float) -> dict:
    from serve_load import replica_pids

    async def fault(p):
        victim = replica_pids(p.proc.pid)[0]
        os.kill(victim, signal.SIGSTOP)
        out_s = await wait_until(lambda: _ready(p.url, 1))
        await asyncio.sleep(seconds / 4)
        os.kill(victim, signal.SIGCONT)
        back_s = await wait_until(lambda: _ready(p.url, 2))
        return {"out_of_pool_s": round(out_s, 2), "back_after_sigcont_s": round(back_s, 2)}

    return await _load_with(kiln, gguf, ban, seconds, {"KILN_FIRST_TOKEN_TIMEOUT_SEC": "2"}, fault)


async def crash_loop(kiln, gguf: Path, ban: dict, seconds: float, tmp: Path) -> dict:
    from serve_load import replica_pids

    from pipeline.serve import engine

    flag, wrapper = tmp / "crash", tmp / "llama-server-wrapper"
    wrapper.write_text(f'#!/bin/sh\n[ -e "{flag}" ] && exit 1\nexec "{engine.locate()}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)

    async def fault(p):
        flag.touch()
        os.kill(replica_pids(p.proc.pid)[0], signal.SIGKILL)
        await asyncio.sleep(seconds / 3)
        restarts = sum(v for k, v in (await gauges(p.url)).items() if k.startswith("kiln_replica_restarts_total"))
        flag.unlink()
        back_s = await wait_until(lambda: _ready(p.url, 2))
        return {"restarts_in_crash_loop": int(restarts), "crash_loop_s": round(seconds / 3, 1),
                "back_after_fix_s": round(back_s, 2)}  # fmt: skip

    env = {"KILN_LLAMA_SERVER": str(wrapper), "KILN_RESTART_BACKOFF_MAX_SEC": "4"}
    return await _load_with(kiln, gguf, ban, seconds, env, fault)


def unloadable(gguf: Path) -> bytes:
    """The GGUF with its architecture renamed in the header (same lengths): readable, but llama-server
    exits at start."""
    from gguf import GGUFReader

    data = gguf.read_bytes()
    header = GGUFReader(str(gguf)).data_offset
    return data[:header].replace(b"llama", b"llamb") + data[header:]


async def canary_cannot_start(kiln, gguf: Path, ban: dict, seconds: float, tmp: Path) -> dict:
    from serve_load import load

    from pipeline.release import registry
    from pipeline.serve import engine
    from pipeline.tracking import pipeline_run

    uri = f"sqlite:///{tmp / 'canary.db'}"
    for n in (1, 2):
        bundle = tmp / f"canary{n}" / "gguf"
        bundle.mkdir(parents=True)
        (bundle / "kiln-bench-Q4_K_M.gguf").write_bytes(gguf.read_bytes() if n == 1 else unloadable(gguf))
        registry.register(uri, "bench", pipeline_run(uri, "bench", f"run-{n}"), bundle.parent, {}, gate_passed=True)
    registry.promote(uri, "bench", "1")
    (tmp / "bench.yaml").write_text("base: tiny\n")
    env = {"KILN_CACHE_DIR": str(tmp / "cache"), "KILN_LLAMA_SERVER": str(engine.locate())}
    extra = ["--profile", str(tmp / "bench.yaml"), "--tracking-uri", uri, "--canary", "2", "--canary-share", "0.5"]
    p = kiln(None, 2, 4, env, extra)
    try:
        await p.ready()
        result = await load([p.url], 16, seconds, ban)
        async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
            canary = (await r.json())["canary"]
        return {"failed": result["errors"], "ok": result["ok"], "server_exit_code": p.proc.poll(),
                "canary_error_shown": bool(canary and canary.get("error"))}  # fmt: skip
    finally:
        p.stop()


async def run_all(gguf: Path, ban: dict, kiln, seconds: float = 12) -> dict:
    table_ = {}
    for moment in ("computing", "queued", "before-first"):
        table_[f"leave-while-{moment}" if moment != "before-first" else "leave-before-first"] = await leave(
            kiln, gguf, moment
        )
    table_["replica-sigstop"] = await sigstop(kiln, gguf, ban, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        table_["replica-crash-loop"] = await crash_loop(kiln, gguf, ban, seconds, Path(tmp))
        table_["canary-cannot-start"] = await canary_cannot_start(kiln, gguf, ban, seconds, Path(tmp))
    return table_


def table(faults: dict) -> str:
    lines = ["| fault | requests failed | capacity back | details |", "|---|---|---|---|"]
    for name, r in faults.items():
        keys = ("places_free_s", "back_after_sigcont_s", "back_after_fix_s")
        back = next((f"{r[k]} s ({k})" for k in keys if k in r), "never lost")
        details = {k: v for k, v in r.items() if k not in ("failed",)}
        lines.append(f"| {name} | {r['failed']} | {back} | {json.dumps(details)} |")
    return "\n".join(lines)


async def main() -> None:
    from serve_load import eos_id, kiln, stand_in_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=ROOT / "data/work/tiny/gguf_model/kiln-tiny-Q4_K_M.gguf")
    parser.add_argument("--seconds", type=float, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf if args.gguf.exists() else stand_in_gguf(Path(tmp))
        faults = await run_all(gguf, {str(eos_id(gguf)): -100}, kiln, args.seconds)
    print(table(faults))


if __name__ == "__main__":
    asyncio.run(main())
