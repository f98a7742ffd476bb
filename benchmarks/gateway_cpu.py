"""Where the gateway's CPU goes: kiln's per-request and per-token cost against the least a Python
relay can do, on the same kind of llama-server, in one command.

    python benchmarks/gateway_cpu.py [--gguf FILE] [--requests 100] [--rounds 2]

Two servers in turn, each in front of its own llama-servers (tiny's Q4_K_M after `make run`, else
serve_load's stand-in of the tiny profile's shape):

  kiln     kiln serve --replicas 2 (the gateway as shipped: auth, limits, masking, routing, tracing
           hand-off, metrics, the quality watch)
  relay    benchmarks/relay.py: a raw ASGI app on the same uvicorn (uvloop, httptools) and aiohttp,
           the request body forwarded, the upstream stream written back chunk by chunk, nothing else

One client sends streamed `/v1/completions` one after another, `--requests` at max_tokens 1 and
then at 64 (EOS banned), `--rounds` times; the server process's own CPU time (user + system, not
its children's) over each batch gives CPU per request at 1 token, and per relayed token from the
difference. One request at a time, so the figures are CPU spent, not time waiting for a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_load import SAMPLER, Proc, _cpu_seconds, eos_id, kiln, llama_server, stand_in_gguf  # noqa: E402

from pipeline.io import free_port  # noqa: E402
from pipeline.serve import engine  # noqa: E402

RELAY = ROOT / "benchmarks" / "relay.py"


async def batch(url: str, n: int, max_tokens: int, ban: dict) -> int:
    """`n` streamed requests one after another; the tokens the client received."""
    tokens = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        for i in range(n):
            body = {"prompt": f"the model {i} reads tokens", "max_tokens": max_tokens, "stream": True,
                    "logit_bias": ban, **SAMPLER}  # fmt: skip
            async with s.post(url + "/v1/completions", json=body) as r:
                data = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}: {data[:200]!r}")
            tokens += data.count(b'"finish_reason":null')
    return tokens


async def measure(server: Proc, n: int, rounds: int, ban: dict) -> dict:
    await server.ready()
    await batch(server.url, 10, 8, ban)  # warm: connections, caches, the first compile of everything
    one: list[float] = []
    many: list[float] = []
    tokens: list[float] = []
    for _ in range(rounds):
        for max_tokens, into in ((1, one), (64, many)):
            before = _cpu_seconds(server.proc.pid)
            got = await batch(server.url, n, max_tokens, ban)
            into.append((_cpu_seconds(server.proc.pid) - before) / n)
            if max_tokens == 64:
                tokens.append(got / n)
    per_request, per_long = statistics.median(one), statistics.median(many)
    per_token = (per_long - per_request) / (statistics.mean(tokens) - 1)
    return {"cpu_ms_per_request": round(1000 * per_request, 2), "cpu_ms_per_token": round(1000 * per_token, 3),
            "cpu_ms_per_64_token_request": round(1000 * per_long, 2)}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=ROOT / "data/work/tiny/gguf_model/kiln-tiny-Q4_K_M.gguf")
    parser.add_argument("--requests", type=int, default=100, help="requests per batch (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="batches of each length; the median is kept")
    args = parser.parse_args()
    binary = engine.build()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf if args.gguf.exists() else stand_in_gguf(Path(tmp))
        ban = {str(eos_id(gguf)): -100}
        report = {}
        gateway = kiln(gguf, 2, 4)
        try:
            report["kiln"] = await measure(gateway, args.requests, args.rounds, ban)
        finally:
            gateway.stop()
        upstream, port = llama_server(binary, gguf, 4, 1), free_port()
        relay = Proc("relay", [sys.executable, str(RELAY), str(port), upstream.url], port, health="/health")
        try:
            await upstream.ready()
            report["relay"] = await measure(relay, args.requests, args.rounds, ban)
        finally:
            relay.stop()
            upstream.stop()
    for name, r in report.items():
        print(f"{name:<6} {json.dumps(r)}")
    k, r = report["kiln"], report["relay"]
    print(f"kiln / relay: {k['cpu_ms_per_request'] / r['cpu_ms_per_request']:.2f}x CPU per request, "
          f"{k['cpu_ms_per_token'] / r['cpu_ms_per_token']:.2f}x per relayed token")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
