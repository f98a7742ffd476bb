"""A kiln gateway in a thread of the test process, for the tracing, feedback and loop tests.

The replicas are real llama-server processes on free loopback ports; `close` stops the server
(its lifespan stops the replicas and writes the queued traces) and kills by PID any replica left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
from needs import unavailable


def llama_server_or_skip():
    """The llama-server binary; a skip saying why without one (a failure under make test and CI)."""
    from pipeline.serve import engine

    try:
        return engine.locate()
    except engine.EngineUnavailable as exc:
        unavailable("llama-server", exc)


class ServedGateway:
    def __init__(self, target, canary=None, canary_share: float = 0.0, **settings) -> None:
        import uvicorn

        from pipeline.io import free_port
        from pipeline.serve.server import build
        from pipeline.serve.settings import ServeSettings

        defaults = {"port": free_port(), "kiln_replicas": 1, "kiln_slots": 2, "kiln_threads": 1, "kiln_poll_sec": 0}
        self.settings = ServeSettings(**{**defaults, **settings})
        self.app, self.deployment = build(self.settings, target, canary, canary_share)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.close()
        raise AssertionError(f"the gateway never became healthy: {self.deployment.error}")

    @property
    def tracing(self):
        return self.app.state.kiln.tracing

    def flush(self, *trace_ids: str) -> None:
        """Wait until these traces left the writer's queue (written or dropped)."""
        for trace_id in trace_ids:
            assert self.tracing.wait_written(trace_id, 600), f"trace {trace_id} still queued after 10 minutes"

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def pids(self) -> list[int]:
        return [r.pid for p in self.deployment.serving() for r in p.replicas if r.alive()]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        for pid in self.pids():
            os.kill(pid, signal.SIGKILL)
        self.client.close()


def sse_data(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
