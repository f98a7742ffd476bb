"""Replicas on other machines: `kiln replica` runs one there, `kiln serve --replica-url` routes to it.

`kiln replica` (`ReplicaHost`) pulls and verifies a registered version as the gateway does, runs one
llama-server on `--host:--port` with the key KILN_REPLICA_KEY (or one it makes and prints), and
answers its gateway on the next port (the control port):

    GET  /status   {"version", "label", "sha256", "url", "pid"}
    POST /load     {"version": N}: pull and verify N, restart llama-server on the same port with it;
                   the previous version is started again when N cannot be (503 with the reason)

both with `Authorization: Bearer KEY`. It exits non-zero when its llama-server dies, so whatever runs
it (systemd, Kubernetes) starts it again.

On the gateway a `RemoteReplica` is routed, health-checked, retried and counted like a local one,
but never started or stopped by it: "starting" it asks its control port to load the pool's version
(the sha256 must match the gateway's own pull), "stopping" it only takes it out of routing. One
llama-server serves one version at a time, so a hot swap takes each remote replica over in turn
(`Claims`): the old version's pool stops routing to it, its requests in flight finish (up to
KILN_DRAIN_SEC), then it loads the new version while the others serve on. A remote replica whose
address refuses a connection is out of the pool at once and tried again with the local replicas'
backoff, so one restarted by its operator comes back by itself.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from pipeline.serve.replicas import (
    FAILED,
    LOAD_TIMEOUT_S,
    READY,
    STARTING,
    STOPPED,
    Replica,
    ReplicaStartError,
    Unreachable,
    local_replica,
)
from pipeline.serve.source import ModelSource

log = logging.getLogger("kiln.serve")


def control_url(url: str) -> str:
    """`kiln replica` answers its gateway on the port after its llama-server's."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{(parts.port or 80) + 1}"


class Claims:
    """Which pool's replica each remote llama-server serves now: a new version's replica takes it over
    only after the previous holder has left routing and finished its requests."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.holders: dict[str, RemoteReplica] = {}
        self.previous: dict[str, RemoteReplica] = {}

    async def claim(self, replica: RemoteReplica) -> None:
        held = self.holders.get(replica.url)
        if held is not None and held is not replica:
            held.state = STOPPED  # out of its pool's routing (and restarts); the pool's other replicas serve on
            held.gauge()
            deadline = time.monotonic() + self.drain_s
            while held.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.previous[replica.url] = held
        self.holders[replica.url] = replica

    def give_back(self, replica: RemoteReplica) -> None:
        """`replica` could not take over: the previous holder, if its pool still serves, has it back."""
        if self.holders.get(replica.url) is not replica:
            return
        held = self.previous.pop(replica.url, None)
        if held is None or held.pool is None or held.pool.closed:
            del self.holders[replica.url]
            return
        self.holders[replica.url] = held
        held.pool._fail(held, f"lent to version {replica.source.version}, which could not start")

    def release(self, replica: RemoteReplica) -> None:
        if self.holders.get(replica.url) is replica:
            del self.holders[replica.url]
            self.previous.pop(replica.url, None)


class RemoteReplica(Replica):
    remote = True

    def __init__(self, url: str, source: ModelSource, key: str, claims: Claims) -> None:
        parts = urlsplit(url)
        super().__init__(Path(), source, 0, 0, 0, 0, host=parts.hostname or "", port=parts.port, api_key=key)
        self.url, self.control = url.rstrip("/"), control_url(url)
        self.name = f"{source.version}@{parts.hostname}:{parts.port}"
        self.claims, self.pool = claims, None

    def alive(self) -> bool:
        return True  # someone else's process: the health checks and refused connections decide

    @property
    def pid(self) -> int | None:
        return None

    def log_tail(self, n: int = 3) -> str:
        return f"remote replica {self.url}: {self.error or 'no error'}"

    def gauge(self) -> None:
        if self.pool is not None:
            self.pool._gauge(self)

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Take the remote llama-server over, have it load this pool's version, wait for /health."""
        self.state = STARTING
        await self.claims.claim(self)
        try:
            status = await self._control(session, "GET", "/status")
            if (status.get("version"), status.get("sha256")) != (self.source.version, self.source.sha256):
                status = await self._control(session, "POST", "/load", {"version": self.source.version})
            if status.get("sha256") != self.source.sha256:
                raise ReplicaStartError(
                    f"{self.url} serves {status.get('label')} ({str(status.get('sha256'))[:12]}), not "
                    f"{self.source.label} ({self.source.sha256[:12]}): is it on the same registry?"
                )
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while not await self.healthy(session):
                if time.monotonic() > deadline:
                    raise ReplicaStartError(f"remote replica {self.url} not healthy after {LOAD_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.1)
        except BaseException as exc:
            self.state, self.error = FAILED, str(exc) or type(exc).__name__
            self.claims.give_back(self)
            raise
        self.state, self.error = READY, None

    async def _control(self, session: aiohttp.ClientSession, method: str, path: str, body: dict | None = None) -> dict:
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S + 30)
        try:
            async with session.request(
                method, self.control + path, json=body, headers=self.headers, timeout=timeout
            ) as resp:
                answer = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise Unreachable(f"{self.control}{path}: {str(exc) or type(exc).__name__}") from None
        if resp.status != 200:
            raise ReplicaStartError(f"{self.control}{path} answered {resp.status}: {answer.get('error', answer)}")
        return answer

    def stop(self) -> None:
        self.state = STOPPED
        self.claims.release(self)

    async def terminate(self) -> None:
        self.stop()


class ReplicaHost:
    """`kiln replica`: one llama-server serving a registered version, and its control port."""

    def __init__(self, binary: Path, fetch, settings, host: str, port: int, key: str) -> None:
        self.binary, self.fetch, self.settings = binary, fetch, settings
        self.host, self.port, self.key = host, port, key
        self.replica: Replica  # set when `serve` has started the first one
        self.session: aiohttp.ClientSession
        self._lock = asyncio.Lock()

    def _replica(self, source: ModelSource) -> Replica:
        return local_replica(self.binary, source, self.settings, host=self.host, port=self.port, api_key=self.key)

    def status(self) -> dict:
        r = self.replica
        return {"version": r.source.version, "label": r.source.label, "sha256": r.source.sha256, "url": r.url,
                "pid": r.pid}  # fmt: skip

    async def load(self, version: str) -> dict:
        """Serve `version` instead; the current one again when it cannot start (ReplicaStartError says why)."""
        async with self._lock:
            if self.replica.source.version == version:
                return self.status()
            source = await asyncio.to_thread(self.fetch, version)  # pulled and verified before anything stops
            old = self.replica
            await old.terminate()
            new = self._replica(source)
            try:
                await new.start(self.session)
            except Exception as exc:
                await new.terminate()
                self.replica = self._replica(old.source)
                await self.replica.start(self.session)
                raise ReplicaStartError(f"version {version} could not start: {exc}") from None
            self.replica = new
            log.info("kiln replica: now serving %s", source.label)
            return self.status()

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.key.encode())

    async def _status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "a Bearer key is required (KILN_REPLICA_KEY)"}, status=401)
        return web.json_response(self.status())

    async def _load(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "a Bearer key is required (KILN_REPLICA_KEY)"}, status=401)
        try:
            version = str((await request.json())["version"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'the body must be {"version": N}'}, status=422)
        try:
            return web.json_response(await self.load(version))
        except Exception as exc:  # not registered, not verified, not startable: the gateway says why
            return web.json_response({"error": str(exc).splitlines()[0]}, status=503)

    async def serve(self, which: str, announce) -> int:
        """Serve until cancelled (0) or until llama-server dies (1)."""
        source = await asyncio.to_thread(self.fetch, which)  # a bad alias or a tampered file stops here
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        runner = None
        self.replica = self._replica(source)
        try:
            await self.replica.start(self.session)
            app = web.Application()
            app.add_routes([web.get("/status", self._status), web.post("/load", self._load)])
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port + 1).start()
            announce(self)
            while True:
                await asyncio.sleep(0.5)
                if not self._lock.locked() and not self.replica.alive():
                    log.error("kiln replica: llama-server exited: %s", self.replica.log_tail())
                    return 1
        finally:
            await self.replica.terminate()
            if runner is not None:
                await runner.cleanup()
            await self.session.close()
