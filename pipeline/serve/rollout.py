"""What is served: the production pool, an optional canary pool, and the hot swap between versions.

`Deployment.reload()` asks the registry which version the alias names now; when it moved
(`kiln promote`, `kiln rollback`) it pulls and verifies the new version, starts and warms its
replicas while the old ones keep serving, switches traffic in one assignment, then lets the old
pool finish what it has in flight (up to KILN_DRAIN_SEC) before stopping it. A request holds its
replica from start to end, so it finishes on the version it started on. The registry is polled
every KILN_POLL_SEC; `POST /admin/reload` triggers the same step at once.

With a canary (`--canary candidate --canary-share 0.1`) that share of requests goes to the
canary's pool; its version is on every metric and log line, so the two compare. The draw is sticky:
a request naming a user (OpenAI's `user` field, else the API key) hashes to a fixed point in [0, 1),
so one user sees one version throughout the canary; anonymous requests draw at random.
`adopt_canary` (a promotion) makes the canary's warm pool production in place; `drop_canary` (an
abort) stops routing to it and retires it once its requests in flight have finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from pipeline.serve.metrics import Metrics
from pipeline.serve.replicas import Pool
from pipeline.serve.source import ModelSource

log = logging.getLogger("kiln.serve")


@dataclass
class Target:
    """Which model to serve: an alias or version in the registry (`fetch`, `resolve`), or a fixed file."""

    which: str  # the alias or version number asked for ("local" for a file)
    fetch: Callable[[str], ModelSource]  # alias or version -> pulled, verified source (blocking)
    resolve: Callable[[str], str] | None = None  # alias -> version number now; None: it never moves
    catalog: Callable[[], list[dict]] | None = None  # every registered version with its aliases
    tracking_uri: str | None = None  # where served answers are traced (pipeline/serve/tracing.py); None: not traced


def sticky_draw(user: str) -> float:
    """A user's fixed point in [0, 1): the same user always falls on the same side of the share."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64


class Deployment:
    def __init__(
        self, binary: Path, settings, metrics: Metrics, target: Target,
        canary: Target | None = None, canary_share: float = 0.0, initial: ModelSource | None = None,
    ) -> None:  # fmt: skip
        self.initial = initial  # already pulled (the command checks the registry before listening)
        self.binary, self.settings, self.metrics = binary, settings, metrics
        self.target, self.canary_target, self.canary_share = target, canary, canary_share
        self.active: Pool | None = None
        self.canary: Pool | None = None
        self.error: str | None = None  # why the last start or reload failed
        self.started = time.time()
        self.session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._draining: set[Pool] = set()
        self._poller: asyncio.Task | None = None

    def pools(self) -> list[Pool]:
        return [p for p in (self.active, self.canary) if p is not None]

    def route(self, user: str | None = None) -> Pool | None:
        """The canary's pool for its share of requests (sticky per `user`), else production's."""
        if self.canary is not None and self.canary.ready() and self.canary_share > 0:
            if (sticky_draw(user) if user else random.random()) < self.canary_share:
                return self.canary
        return self.active

    async def adopt_canary(self) -> None:
        """The canary's pool becomes production (it is warm: nothing restarts); the old production
        pool finishes its requests and stops."""
        async with self._lock:
            new, old = self.canary, self.active
            if new is None:
                return
            self.canary, self.canary_share, self.canary_target = None, 0.0, None
            new.role = "production"
            self.active = new
            self.metrics.served.labels(new.version, "canary").set(0)
            self.metrics.served.labels(new.version, "production").set(1)
            self.metrics.swaps.inc()
            log.info("canary promoted in place: %s -> %s", old.source.label if old else None, new.source.label)
            if old is not None and old is not new:
                self.metrics.served.labels(old.version, "production").set(0)
                self._draining.add(old)
                asyncio.create_task(self._retire(old))

    async def drop_canary(self) -> None:
        """Share 0 at once; the canary's pool finishes what it has in flight, then stops."""
        async with self._lock:
            pool, self.canary, self.canary_share = self.canary, None, 0.0
            if pool is None:
                return
            self.metrics.served.labels(pool.version, "canary").set(0)
            log.info("canary %s dropped: share 0", pool.source.label)
            self._draining.add(pool)
            asyncio.create_task(self._retire(pool))

    async def _start_pool(self, source: ModelSource, role: str) -> Pool:
        pool = Pool(self.binary, source, self.settings, self.metrics, role)
        await pool.start(self.session)
        self.metrics.served.labels(source.version, role).set(1)
        return pool

    async def start(self) -> None:
        """Pull, start and warm the production (and canary) replicas, then watch the registry."""
        # a fresh loopback connection per request (~0.1 ms): llama-server closes idle keep-alive
        # connections on its own schedule, and a request written to one of those fails before it starts
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        try:
            source = self.initial or await asyncio.to_thread(self.target.fetch, self.target.which)
            self.active = await self._start_pool(source, "production")
            if self.canary_target is not None:
                canary = await asyncio.to_thread(self.canary_target.fetch, self.canary_target.which)
                self.canary = await self._start_pool(canary, "canary")
        except Exception as exc:
            self.error = str(exc)
            log.error("startup failed: %s", exc)
            raise
        log.info("serving %s on %d replicas", source.label, len(self.active.ready()))
        if self.target.resolve is not None and self.settings.kiln_poll_sec > 0:
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.kiln_poll_sec)
            try:
                await self.reload()
            except Exception as exc:  # a registry hiccup must not stop serving; the next poll tries again
                self.error = str(exc)
                log.warning("registry poll failed: %s", exc)

    async def reload(self) -> dict:
        """Swap to the version the alias names now, if it moved. Returns what happened."""
        async with self._lock:
            old = self.active
            if self.target.resolve is None:
                return {"changed": False, "version": old.version if old else None, "reason": "serving a fixed file"}
            version = await asyncio.to_thread(self.target.resolve, self.target.which)
            if old is not None and version == old.version:
                return {"changed": False, "version": version}
            source = await asyncio.to_thread(self.target.fetch, version)
            source = dataclasses.replace(source, alias=self.target.which)
            started = time.monotonic()
            new = await self._start_pool(source, "production")
            self.active = new  # from here every new request goes to the new version
            self.error = None
            self.metrics.swaps.inc()
            log.info("hot swap: %s -> %s", old.source.label if old else None, source.label)
            if old is not None:
                self.metrics.served.labels(old.version, "production").set(0)
                self._draining.add(old)
                asyncio.create_task(self._retire(old))
            return {
                "changed": True, "from": old.version if old else None, "to": version,
                "start_s": round(time.monotonic() - started, 2),
            }  # fmt: skip

    async def _retire(self, pool: Pool) -> None:
        drained = await pool.drain(self.settings.kiln_drain_sec)
        if not drained:
            log.warning("version %s still had %d requests after the drain time", pool.version, pool.in_flight)
        pool.stop()
        self._draining.discard(pool)

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
        for pool in [*self.pools(), *self._draining]:
            pool.stop()
        if self.session:
            await self.session.close()
