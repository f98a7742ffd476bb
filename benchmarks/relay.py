"""The least a Python gateway can do: a raw ASGI app on kiln's own server stack (uvicorn with uvloop
and httptools, aiohttp upstream) that forwards the request body to the least busy of its upstream
llama-servers and writes the upstream stream back chunk by chunk. No auth, limits, masking,
metrics or tracing: the floor that kiln's gateway is measured against (gateway_cpu.py, serve_load.py).

    python benchmarks/relay.py PORT UPSTREAM_URL [UPSTREAM_URL ...]
"""

from __future__ import annotations

import sys

import aiohttp
import uvicorn

upstreams = sys.argv[2:]
busy = dict.fromkeys(upstreams, 0)  # requests in flight per upstream
session: aiohttp.ClientSession | None = None


async def app(scope, receive, send):
    global session
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    upstream = min(busy, key=busy.__getitem__)
    busy[upstream] += 1
    try:
        async with session.request(scope["method"], upstream + scope["path"], data=body or None,
                                   headers={"content-type": "application/json"}) as r:  # fmt: skip
            headers = [(b"content-type", r.headers.get("content-type", "text/plain").encode())]
            await send({"type": "http.response.start", "status": r.status, "headers": headers})
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        busy[upstream] -= 1


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", access_log=False,
                log_level="warning")  # fmt: skip
