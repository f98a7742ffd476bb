"""A kiln gateway in a thread of the test process, for every test that serves (tests/serve/ and the
feedback loop's). The replicas are real llama-server processes on free loopback ports."""

from __future__ import annotations

import contextlib
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


class Gateway:
    """`kiln serve` on a free port in a thread of this process (the app `build` makes, uvicorn as the
    command configures it), stopped on close: its lifespan stops the replicas and writes the queued
    traces, and any replica left is killed by PID. Ready when `ready(client)` holds (default: /health
    answers 200), within two minutes."""

    defaults = {"kiln_replicas": 2, "kiln_slots": 2, "kiln_threads": 1, "kiln_poll_sec": 0}

    def __init__(
        self, target, canary=None, canary_share: float = 0.0, canary_actions=None, ready=None, **settings
    ) -> None:  # fmt: skip
        import uvicorn

        from pipeline.io import free_port
        from pipeline.serve.server import build, uvicorn_config
        from pipeline.serve.settings import ServeSettings

        self.settings = ServeSettings(**{"port": free_port(), **self.defaults, **settings})
        self.startup_failed = False
        self.app, self.deployment = build(
            self.settings, target, canary, canary_share, self._startup_failed, canary_actions
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, self.settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=60)
        ready = ready or (lambda client: client.get("/health").status_code == 200)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.startup_failed:
            try:
                if ready(self.client):
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.1)
        self.close()
        raise AssertionError(f"the gateway never became ready: {self.deployment.error}")

    def _startup_failed(self) -> None:
        self.startup_failed = True
        self.server.should_exit = True

    @property
    def gw(self):
        """The app's shared Gateway state (admission, deployment, metrics, tracing)."""
        return self.app.state.kiln

    @property
    def tracing(self):
        return self.gw.tracing

    def replica(self, i: int = 0):
        return self.deployment.active.replicas[i]

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
        pools = [*self.deployment.serving(), *self.deployment._draining]
        return [r.pid for p in pools for r in p.replicas if r.pid is not None and r.alive()]

    def close(self) -> None:
        for pid in self.pids():  # a stopped replica must run again to hear SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.server.should_exit = True
        self.thread.join(timeout=60)
        for pid in self.pids():  # the lifespan stops them; this covers a server that never started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.client.close()


def sse_data(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def hammer(url: str, stop: threading.Event, results: list, path="/infer") -> None:
    """Requests back to back until `stop`: (status, the version that answered, or the error) each."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            try:
                r = client.post(path, json={"query": "def f(x):", "max_length": 6})
                results.append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text))
            except httpx.HTTPError as exc:
                results.append((0, str(exc)))


@contextlib.contextmanager
def hammering(url: str, clients: int, path="/infer"):
    """`clients` threads running `hammer` while the block runs; yields their results. They stop when the
    block ends, also when it fails: a failed test must not leave them running (pytest would wait for them)."""
    stop, results = threading.Event(), []
    workers = [threading.Thread(target=hammer, args=(url, stop, results, path), daemon=True) for _ in range(clients)]
    for w in workers:
        w.start()
    try:
        yield results
    finally:
        stop.set()
        for w in workers:
            w.join(60)
