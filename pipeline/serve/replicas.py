"""The pool: resident llama-server processes of one model version, health-checked and restarted.

A `Replica` is one llama-server process on a loopback port with `slots` parallel sequences
(continuous batching) and the prompt cache on. It is `ready` only after its `/health` answers
200 and a few warm-up completions have run, so no client request ever pays for loading.

Each replica listens on loopback with a random `--api-key` made for this start, which only the
gateway holds: another local process cannot reach the model around auth, limits and masking.

A `Pool` routes each request to its least-busy ready replica (fewest requests in flight). A
monitor checks every replica each second (process alive, `/health` answers); a request that
cannot reach its replica triggers the same check at once. A failed replica is taken out of
routing, started again on the same port, warmed and put back; a replica that keeps failing to
start waits 1, 2, 4, ... s (at most KILN_RESTART_BACKOFF_MAX_SEC) between tries, so it never spins.
A hung replica (no first token within KILN_FIRST_TOKEN_TIMEOUT_SEC) is `unresponsive`: out of
routing until its `/health` answers again, restarted if its process died or it stays silent for
LOAD_TIMEOUT_S. Stopping a replica never blocks the event loop (`Replica.terminate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

from pipeline.gguf import declared_context
from pipeline.io import free_port
from pipeline.layout import cache_dir
from pipeline.serve.metrics import Metrics
from pipeline.serve.source import ModelSource

log = logging.getLogger("kiln.serve")

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
UNRESPONSIVE = "unresponsive"  # sent no first token in time: out of routing until /health answers again
STATES = (STARTING, READY, FAILED, STOPPED, UNRESPONSIVE)
LOAD_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
# llama-server's HTTP worker threads: each connection the gateway keeps open (streams, idle pooled
# connections, health checks) holds one, and a request beyond them waits; keep plenty (they sleep).
HTTP_THREADS_PER_SLOT = 4
WARMUP_PROMPT = "def add(a, b):\n    return"


class ReplicaStartError(RuntimeError):
    pass


class Unreachable(ReplicaStartError):
    """A remote replica's control port did not answer (its host or `kiln replica` is down)."""


class Replica:
    remote = False  # a llama-server another machine runs (pipeline/serve/remote.py): never started or stopped here

    def __init__(
        self, binary: Path, source: ModelSource, slots: int, context_size: int, threads: int, warmup: int,
        context_shift: bool = False, host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
        nice: int = 0,
    ) -> None:  # fmt: skip
        self.binary, self.source, self.context_shift = binary, source, context_shift
        self.slots, self.context_size, self.threads, self.warmup = slots, context_size, threads, warmup
        self.host, self.port = host, port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.name = f"{source.version}@{self.port}"
        self.fixed_key = api_key  # `kiln replica`'s key, which its gateway holds; None: a new one per start
        self.nice = nice  # CPU priority below the gateway's (KILN_REPLICA_NICE)
        self.state = STARTING
        self.in_flight = 0
        self.process: subprocess.Popen | None = None
        self.log_path = cache_dir() / "serve" / "logs" / f"llama-server-{self.port}.log"
        self.api_key = api_key or secrets.token_urlsafe(24)  # a new one per start; only the gateway knows it
        self.failures = 0  # starts failed in a row
        self.backoffs: list[float] = []  # the waits between those starts
        self.error: str | None = None  # why it is out of the pool
        self.unresponsive_since: float | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        niced = ["nice", "-n", str(self.nice)] if self.nice else []  # `nice` execs llama-server: the PID is its
        return [
            *niced, str(self.binary), "-m", str(self.source.gguf), "--host", self.host, "--port", str(self.port),
            "--parallel", str(self.slots), "--ctx-size", str(self.context_size * self.slots),
            "--threads", str(self.threads), "--threads-http", str(HTTP_THREADS_PER_SLOT * self.slots + 4),
            "--metrics", "--no-webui", "--alias", self.source.label, "--api-key", self.api_key,
            "--context-shift" if self.context_shift else "--no-context-shift",
        ]  # fmt: skip

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Start the process, wait for /health, warm it; `ready` only when all of that worked."""
        self.state = STARTING
        self.api_key = self.fixed_key or secrets.token_urlsafe(24)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            # A process group of its own: Ctrl-C in the gateway's terminal reaches the gateway, which stops it.
            # Not a session of its own: Linux (autogroup) weighs niceness only within a session, and a replica
            # in another one took an equal share of the cores from the gateway whatever its niceness, which
            # stalled the event loop for up to 280 ms at 16 clients and doubled the time to first token.
            self.process = subprocess.Popen(
                self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0
            )
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            if not self.alive():
                self.state = FAILED
                raise ReplicaStartError(f"llama-server {self.name} exited at start: {self.log_tail()}")
            if await self.healthy(session):
                break
            if time.monotonic() > deadline:
                await self.terminate()
                self.state = FAILED
                raise ReplicaStartError(f"llama-server {self.name} not healthy after {LOAD_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.1)
        for i in range(self.warmup):  # fills the prompt cache and pages the weights in
            body = {"prompt": WARMUP_PROMPT, "n_predict": 4, "temperature": 0, "cache_prompt": i > 0}
            async with session.post(f"{self.url}/completion", json=body, headers=self.headers) as resp:
                if resp.status != 200:
                    self.state = FAILED
                    raise ReplicaStartError(f"llama-server {self.name} warm-up answered {resp.status}")
                await resp.read()
        self.state = READY

    async def healthy(self, session: aiohttp.ClientSession) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with session.get(f"{self.url}/health", timeout=timeout, headers=self.headers) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-n:]) or "no output"

    def stop(self) -> None:
        """Stop the process by its PID: SIGTERM, then SIGKILL after STOP_GRACE_S (blocking: for shutdown
        outside an event loop; inside one, `await terminate()`)."""
        self.state = STOPPED
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)

    async def terminate(self) -> None:
        """`stop` without blocking the event loop: SIGTERM, poll for the exit, SIGKILL after STOP_GRACE_S."""
        self.state = STOPPED
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            while proc.poll() is None:
                await asyncio.sleep(0.01)


def local_replica(binary: Path, source: ModelSource, settings, replicas: int = 1, **where) -> Replica:
    """One llama-server of `source` on this machine, shaped by the settings: KILN_SLOTS sequences of the
    presets' context (never past the trained one), the cores shared among `replicas`."""
    threads = settings.kiln_threads or max(1, (os.cpu_count() or 2) // max(1, replicas))
    context = max(p.context_size for p in source.presets.values()) if source.presets else 2048
    context = min(context, declared_context(source.gguf))  # a slot never runs past the trained context
    return Replica(
        binary, source, settings.kiln_slots, context, threads, settings.kiln_warmup_requests,
        settings.kiln_context_shift, nice=settings.kiln_replica_nice, **where,
    )  # fmt: skip


class Pool:
    """The replicas of one version."""

    def __init__(
        self, binary: Path, source: ModelSource, settings, metrics: Metrics, role: str = "production", remote=(),
    ) -> None:  # fmt: skip
        """`remote`: replicas other machines run (pipeline/serve/remote.py), beside `KILN_REPLICAS` local ones
        (which may then be 0)."""
        count = settings.kiln_replicas if remote else max(1, settings.kiln_replicas)
        self.source, self.metrics, self.role = source, metrics, role
        self.replicas = [local_replica(binary, source, settings, count) for _ in range(count)]
        for replica in remote:
            replica.pool = self
        self.replicas += list(remote)
        self._tasks: set[asyncio.Task] = set()
        self._restarting: set[Replica] = set()
        self._monitor: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None
        self.restarts = 0
        self.backoff_max = settings.kiln_restart_backoff_max_sec
        self.closed = False

    @property
    def version(self) -> str:
        return self.source.version

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == READY]

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def _gauge(self, replica: Replica) -> None:
        self.metrics.replica_up.labels(replica.name, self.version).set(1 if replica.state == READY else 0)
        for state in STATES:
            self.metrics.replica_state.labels(replica.name, self.version, state).set(int(replica.state == state))

    def troubled(self) -> dict[str, dict]:
        """The replicas out of routing: state, why, failed starts in a row and the wait before the next."""
        return {
            r.name: {"state": r.state, "error": r.error, "failed_starts": r.failures,
                     "next_start_in_s": r.backoffs[-1] if r.backoffs and r.state == FAILED else None}
            for r in self.replicas if r.state not in (READY, STOPPED)
        }  # fmt: skip

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Start the local replicas at once; succeed when at least one is warm (the rest keep retrying).
        Remote replicas join one at a time after that (each may be serving the version this pool
        replaces, and takes its turn so the rest serve on); with no local replica, the first remote one
        that answers is loaded before this returns."""
        self.session = session
        local = [r for r in self.replicas if not r.remote]
        remote = [r for r in self.replicas if r.remote]
        if not local:
            remote.remove(await self._first_remote(remote))
        results = await asyncio.gather(*(r.start(session) for r in local), return_exceptions=True)
        for replica, result in zip(local, results, strict=True):
            self._gauge(replica)
            if isinstance(result, BaseException):
                log.warning("replica %s failed to start: %s", replica.name, result)
                self._restart_soon(replica)
        if not self.ready():
            await self.close()
            raise ReplicaStartError(f"no replica of {self.source.label} started: {results[0]}")
        self._monitor = asyncio.create_task(self._watch())
        if remote:
            self._spawn(self._join_one_by_one(remote))

    async def _first_remote(self, remote: list[Replica]) -> Replica:
        """The first remote replica that starts; one that cannot be reached is skipped, one that answered
        and could not serve the version fails the start (the others would fail alike)."""
        for replica in remote:
            try:
                await replica.start(self.session)
            except Unreachable as exc:
                log.warning("remote replica %s: %s", replica.name, exc)
                self._gauge(replica)
                continue
            except Exception:
                await self.close()
                raise
            self._gauge(replica)
            return replica
        await self.close()
        raise ReplicaStartError(f"no remote replica of {self.source.label} could be reached")

    async def _join_one_by_one(self, replicas: list[Replica]) -> None:
        for replica in replicas:
            try:
                await replica.start(self.session)
            except Exception as exc:  # it keeps trying, as a local replica that failed does
                log.warning("replica %s failed to start: %s", replica.name, exc)
                replica.state = FAILED
                self._restart_soon(replica)
            self._gauge(replica)

    def add(self, replicas: list[Replica]) -> None:
        """More replicas for a pool already serving (remote ones after a canary became production)."""
        for replica in replicas:
            replica.pool = self
        self.replicas += replicas
        self._spawn(self._join_one_by_one(replicas))

    def pick(self, exclude: tuple[Replica, ...] = ()) -> Replica | None:
        """The least-busy ready replica, ties to the first."""
        candidates = [r for r in self.replicas if r.state == READY and r not in exclude]
        return min(candidates, key=lambda r: r.in_flight) if candidates else None

    def report_failure(self, replica: Replica, exc: BaseException | None = None) -> None:
        """A request could not reach `replica`: if its process is gone (for a remote one: its address
        refused the connection), take it out and restart it now."""
        if replica.state != READY:
            return
        if not replica.alive():
            self._fail(replica, "process exited")
        elif replica.remote and isinstance(exc, aiohttp.ClientConnectorError):
            self._fail(replica, f"unreachable: {exc}")

    def report_hung(self, replica: Replica) -> None:
        """No first token in time: out of routing until /health answers (the monitor puts it back)."""
        if replica.state != READY:
            return
        log.warning("replica %s sent no first token in time; out of the pool until it answers /health", replica.name)
        replica.state, replica.error = UNRESPONSIVE, "no first token in time"
        replica.unresponsive_since = time.monotonic()
        self._gauge(replica)

    def _fail(self, replica: Replica, why: str) -> None:
        log.warning("replica %s out of the pool (%s); restarting", replica.name, why)
        replica.state, replica.error = FAILED, why
        self._gauge(replica)
        self._restart_soon(replica)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def backoff(self, failures: int) -> float:
        """The wait after `failures` failed starts in a row: 1, 2, 4, ... s, at most KILN_RESTART_BACKOFF_MAX_SEC."""
        return min(self.backoff_max, 2.0 ** (failures - 1))

    def _restart_soon(self, replica: Replica) -> None:
        """One restart loop per replica, however many failures report it."""
        if replica not in self._restarting:
            self._restarting.add(replica)
            self._spawn(self._restart(replica))

    async def _restart(self, replica: Replica) -> None:
        try:
            await self._restart_until_ready(replica)
        finally:
            self._restarting.discard(replica)

    async def _restart_until_ready(self, replica: Replica) -> None:
        while replica.state == FAILED:
            await replica.terminate()
            replica.state = FAILED
            self.restarts += 1
            self.metrics.replica_restarts.labels(replica.name).inc()
            try:
                await replica.start(self.session)
                replica.failures, replica.backoffs, replica.error = 0, [], None
                self.metrics.replica_backoff.labels(replica.name).set(0)
                log.info("replica %s back in the pool", replica.name)
            except Exception as exc:  # keep trying, ever more slowly: the pool heals or stays degraded, never spins
                replica.state, replica.error = FAILED, str(exc)
                replica.failures += 1
                wait = self.backoff(replica.failures)
                replica.backoffs.append(wait)
                self.metrics.replica_backoff.labels(replica.name).set(wait)
                log.warning("replica %s restart failed (%d in a row; next in %g s): %s",
                            replica.name, replica.failures, wait, exc)  # fmt: skip
                self._gauge(replica)
                await asyncio.sleep(wait)
            self._gauge(replica)

    async def _watch(self) -> None:
        misses: dict[str, int] = {}
        while True:
            await asyncio.sleep(1.0)
            for replica in [r for r in self.replicas if r.state == UNRESPONSIVE]:
                await self._check_unresponsive(replica)
            for replica in self.ready():
                if not replica.alive():
                    self._fail(replica, "process exited")
                elif await replica.healthy(self.session):
                    misses[replica.name] = 0
                else:
                    misses[replica.name] = misses.get(replica.name, 0) + 1
                    if misses[replica.name] >= 3 and replica.in_flight == 0:  # busy slots may delay /health
                        self._fail(replica, "/health failed 3 times")

    async def _check_unresponsive(self, replica: Replica) -> None:
        if not replica.alive():
            self._fail(replica, "process exited")
        elif await replica.healthy(self.session):
            log.info("replica %s answers /health again; back in the pool", replica.name)
            replica.state, replica.error, replica.unresponsive_since = READY, None, None
            self._gauge(replica)
        elif time.monotonic() - (replica.unresponsive_since or 0) > LOAD_TIMEOUT_S:
            self._fail(replica, f"unresponsive for {LOAD_TIMEOUT_S:.0f} s")

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight here (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0

    def stop(self) -> None:
        self.closed = True
        if self._monitor:
            self._monitor.cancel()
        for task in list(self._tasks):
            task.cancel()
        for replica in self.replicas:
            replica.stop()
            self._gauge(replica)

    async def close(self) -> None:
        """`stop` without blocking the event loop: every replica terminated at once."""
        self.closed = True
        if self._monitor:
            self._monitor.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(r.terminate() for r in self.replicas))
        for replica in self.replicas:
            self._gauge(replica)

    async def slot_metrics(self) -> dict[str, dict[str, float]]:
        """llama-server's own `requests_processing` and `requests_deferred` per ready replica."""
        found = {}
        for replica in self.replicas:
            if replica.state != READY:  # a hung one would only delay the scrape
                continue
            try:
                timeout = aiohttp.ClientTimeout(total=1)
                async with self.session.get(f"{replica.url}/metrics", headers=replica.headers, timeout=timeout) as r:
                    text = await r.text() if r.status == 200 else ""
            except (TimeoutError, aiohttp.ClientError):
                continue
            found[replica.name] = {m[1]: float(m[2]) for m in _SLOT_METRIC.finditer(text)}
        return found


_SLOT_METRIC = re.compile(r"^llamacpp:requests_(processing|deferred)\s+([0-9.eE+-]+)$", re.M)
