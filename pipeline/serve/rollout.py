"""What is served: the production pool, an optional canary pool, and the hot swap between versions.

`Deployment.reload()` asks the registry which version the alias names now; when it moved
(`kiln promote`, `kiln rollback`) it pulls and verifies the new version, starts and warms its
replicas while the old ones keep serving, switches traffic in one assignment, then lets the old
pool finish what it has in flight (up to KILN_DRAIN_SEC) before stopping it. A request holds its
replica from start to end, so it finishes on the version it started on; one still running when
the drain time is up ends with an error event. The registry is polled every KILN_POLL_SEC;
`POST /admin/reload` triggers the same step at once.

A swap that fails (the version cannot be pulled, verified or started) leaves the old version
serving; the reason is in `GET /`, the log and `/admin/reload`'s 503. The poll does not try that
version again for FAILED_RETRY_S (no new llama-servers every poll), unless the alias names
another one or an admin asks with `/admin/reload`.

With a canary (`--canary candidate --canary-share 0.1`) that share of users goes to the canary's
pool (sticky: a user's requests stay on one version); its version is on every metric and log
line, so the two compare. A canary that cannot start is logged and shown in `/` and `/metrics`;
production serves on.
`adopt_canary` (a promotion) makes the canary's warm pool production in place; `drop_canary` (an
abort) stops routing to it and retires it once its requests in flight have finished.

A request may also name a registered version that is neither (the playground's "any version"):
`pool_of_version` starts it with one replica on first use and keeps the KILN_ON_DEMAND_VERSIONS most
recently named (the least recently named is retired past that; 0 turns this off). Such a pool
takes only the requests that name it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from pipeline.errors import KilnError
from pipeline.serve.metrics import Metrics
from pipeline.serve.remote import Claims, RemoteReplica
from pipeline.serve.replicas import Pool
from pipeline.serve.source import ModelSource

log = logging.getLogger("kiln.serve")
FAILED_RETRY_S = 300.0  # the poll tries a version that failed to swap in again after this long, not before


@dataclass
class Target:
    """Which model to serve: an alias or version in the registry (`fetch`, `resolve`), or a fixed file."""

    which: str  # the alias or version number asked for ("local" for a file)
    fetch: Callable[[str], ModelSource]  # alias or version -> pulled, verified source (blocking)
    resolve: Callable[[str], str] | None = None  # alias -> version number now; None: it never moves
    catalog: Callable[[], list[dict]] | None = None  # every registered version with its aliases
    tracking_uri: str | None = None  # where served answers are traced (pipeline/serve/tracing.py); None: not traced


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
        self.canary_error: str | None = None  # why the canary could not start
        self.failed_version: tuple[str, str, float] | None = None  # (version, why, retry at) of a failed swap
        self.started = time.time()
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._draining: set[Pool] = set()
        self._poller: asyncio.Task | None = None
        self.polls = 0  # registry polls done
        self.on_demand: OrderedDict[str, Pool] = OrderedDict()  # version -> pool, least recently named first
        self._demand_lock = asyncio.Lock()
        self.claims = Claims(settings.kiln_drain_sec)  # which pool each remote replica serves (remote.py)

    def pools(self) -> list[Pool]:
        """The pools in rotation: production and the canary."""
        return [p for p in (self.active, self.canary) if p is not None]

    def serving(self) -> list[Pool]:
        """Every pool answering requests: those in rotation, then the versions started on demand."""
        return [*self.pools(), *self.on_demand.values()]

    def served_pool(self, version: str) -> Pool | None:
        return next((p for p in self.serving() if p.version == version), None)

    async def pool_of_version(self, version: str) -> Pool:
        """The pool serving registered `version`, started on demand (one replica) if none does.
        KilnError when versions are not served on demand here or `version` cannot be served."""
        pool = self.served_pool(version)
        if pool is not None:
            if version in self.on_demand:
                self.on_demand.move_to_end(version)
            return pool
        keep = self.settings.kiln_on_demand_versions
        if self.target.catalog is None or keep < 1:
            raise KilnError(f"version {version} is not served here (only {self._names()})")
        async with self._demand_lock:  # two first requests for one version start it once
            pool = self.served_pool(version)
            if pool is not None:
                return pool
            try:
                source = await asyncio.to_thread(self.target.fetch, version)
            except Exception as exc:  # not registered, not verified, the registry out of reach
                raise KilnError(f"version {version} cannot be served: {str(exc).splitlines()[0]}") from None
            one_replica = self.settings.model_copy(update={"kiln_replicas": 1})
            pool = Pool(self.binary, source, one_replica, self.metrics, "on-demand")
            try:
                await pool.start(self.session)  # closes itself and raises when no replica starts
            except Exception as exc:
                raise KilnError(f"version {version} could not start: {exc}") from None
            self.metrics.served.labels(version, "on-demand").set(1)
            self.on_demand[version] = pool
            log.info("version %s started on demand", version)
            while len(self.on_demand) > keep:
                self._take_out(self.on_demand.popitem(last=False)[1])
            return pool

    def _names(self) -> str:
        return ", ".join(f"{p.role} {p.version}" for p in self.pools()) or "none"

    def route(self, sticky: str | None = None) -> Pool | None:
        """The canary for its share of users (the same user always lands on the same side), else production."""
        if self.canary is not None and self.canary.ready() and share_of(sticky) < self.canary_share:
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
                self._take_out(old)
            if self.settings.replica_urls:  # the remote replicas follow production, one at a time
                new.add(self._remote(new.source))

    async def drop_canary(self) -> None:
        """Share 0 at once; the canary's pool finishes what it has in flight, then stops."""
        async with self._lock:
            pool, self.canary, self.canary_share = self.canary, None, 0.0
            if pool is None:
                return
            log.info("canary %s dropped: share 0", pool.source.label)
            self._take_out(pool)

    def _remote(self, source: ModelSource) -> list:
        """Production's replicas on other machines (`--replica-url`); a canary and on-demand versions run here."""
        key = self.settings.kiln_replica_key
        return [RemoteReplica(url, source, key, self.claims) for url in self.settings.replica_urls]

    async def _start_pool(self, source: ModelSource, role: str) -> Pool:
        remote = self._remote(source) if role == "production" else []
        pool = Pool(self.binary, source, self.settings, self.metrics, role, remote)
        await pool.start(self.session)
        self.metrics.served.labels(source.version, role).set(1)
        return pool

    async def start(self) -> None:
        """Pull, start and warm the production (and canary) replicas, then watch the registry."""
        self.loop = asyncio.get_running_loop()  # the gateway's event loop (other threads submit to it)
        # a fresh loopback connection per request (~0.1 ms): llama-server closes idle keep-alive
        # connections on its own schedule, and a request written to one of those fails before it starts;
        # keeping them open (2 s) was measured at 16 clients and gained nothing (README: serving figures)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        try:
            source = self.initial or await asyncio.to_thread(self.target.fetch, self.target.which)
            self.active = await self._start_pool(source, "production")
        except Exception as exc:
            self.error = str(exc)
            log.error("startup failed: %s", exc)
            raise
        log.info("serving %s on %d replicas", source.label, len(self.active.ready()))
        if self.canary_target is not None:
            await self._start_canary()
        if self.target.resolve is not None and self.settings.kiln_poll_sec > 0:
            self._poller = asyncio.create_task(self._poll())

    async def _start_canary(self) -> None:
        """The canary's pool; one that cannot start is logged and shown, and production serves on."""
        try:
            canary = await asyncio.to_thread(self.canary_target.fetch, self.canary_target.which)
            self.canary = await self._start_pool(canary, "canary")
        except Exception as exc:
            self.canary_error = str(exc)
            self.metrics.canary_failed.set(1)
            log.error("canary %s could not start; production serves on: %s", self.canary_target.which, exc)

    async def export_replica_metrics(self) -> None:
        """llama-server's own slot metrics into kiln's, per replica and version (at each scrape)."""
        for pool in [*self.serving(), *self._draining]:
            for replica, values in (await pool.slot_metrics()).items():
                for kind, value in values.items():
                    self.metrics.replica_slots.labels(replica, pool.version, kind).set(value)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.kiln_poll_sec)
            try:
                await self.reload()
            except SwapFailed:
                pass  # said why (log, `/`, metrics); the poll does not try that version again
            except Exception as exc:  # a registry hiccup must not stop serving; the next poll tries again
                self.error = str(exc)
                log.warning("registry poll failed: %s", exc)
            self.polls += 1

    async def reload(self, forced: bool = False) -> dict:
        """Swap to the version the alias names now, if it moved. Returns what happened; raises with the
        reason when the new version cannot be pulled, verified or started (the old one serves on).
        A version that failed is not tried again by the poll, only when `forced` (an admin's reload)."""
        async with self._lock:
            old = self.active
            if self.target.resolve is None:
                return {"changed": False, "version": old.version if old else None, "reason": "serving a fixed file"}
            version = await asyncio.to_thread(self.target.resolve, self.target.which)
            if old is not None and version == old.version:
                if self.failed_version is not None:  # the alias went back: nothing is failing any more
                    self.failed_version, self.error = None, None
                return {"changed": False, "version": version}
            failed = self.failed_version
            if failed is not None and failed[0] == version and not forced and time.monotonic() < failed[2]:
                return {"changed": False, "version": old.version if old else None, "failed": failed[1]}
            started = time.monotonic()
            try:
                source = await asyncio.to_thread(self.target.fetch, version)
                source = dataclasses.replace(source, alias=self.target.which)
                new = await self._start_pool(source, "production")
            except Exception as exc:
                why = f"version {version} could not be served: {exc}"
                self.failed_version, self.error = (version, why, time.monotonic() + FAILED_RETRY_S), why
                self.metrics.swap_failures.labels(version).inc()
                log.error("hot swap failed; %s serves on: %s", old.source.label if old else None, why)
                raise SwapFailed(why) from exc
            self.active = new  # from here every new request goes to the new version
            self.error, self.failed_version = None, None
            self.metrics.swaps.inc()
            log.info("hot swap: %s -> %s", old.source.label if old else None, source.label)
            if old is not None:
                self._take_out(old)
            return {
                "changed": True, "from": old.version if old else None, "to": version,
                "start_s": round(time.monotonic() - started, 2),
            }  # fmt: skip

    def _take_out(self, pool: Pool) -> None:
        """`pool` out of service: its `served` gauge 0; it finishes what it has in flight (up to
        KILN_DRAIN_SEC), then stops, while the event loop serves on."""
        self.metrics.served.labels(pool.version, pool.role).set(0)
        self._draining.add(pool)
        asyncio.create_task(self._retire(pool))

    async def _retire(self, pool: Pool) -> None:
        drained = await pool.drain(self.settings.kiln_drain_sec)
        if not drained:
            log.warning("version %s still had %d requests after the drain time", pool.version, pool.in_flight)
        await pool.close()  # the event loop serves on while the old processes exit
        self._draining.discard(pool)

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
        await asyncio.gather(*(pool.close() for pool in [*self.serving(), *self._draining]))
        if self.session:
            await self.session.close()


class SwapFailed(RuntimeError):
    """A hot swap that could not happen; the message says which version and why."""


def share_of(sticky: str | None) -> float:
    """Where `sticky` (a user or key) falls in [0, 1): the same one always falls in the same place;
    without one, a fresh draw per request."""
    if not sticky:
        return random.random()
    return int.from_bytes(hashlib.sha256(sticky.encode()).digest()[:8], "big") / 2.0**64
