"""What a request passes before it reaches a replica: the API key, the per-key rate limit, admission.

- `Auth`: when keys are configured (plain, or as sha256 hex digests), `Authorization: Bearer KEY` or
  `X-API-Key: KEY` must carry one; the presented key's digest is compared with every configured digest
  in constant time; only a short hash of a key (`key_id`) is ever logged or used as a label.
- `RateLimiter`: a token bucket per key (or per client address without keys): `rpm` tokens a
  minute, `burst` at most; an empty bucket is a 429 with the seconds until the next token.
- `Admission`: at most `max_in_flight` requests inside, at most `max_queue` waiting; past that
  a 429 at once, so an overloaded gateway answers fast instead of timing out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections import deque


class Rejected(Exception):
    """A request refused before it ran: `status` 401 or 429, `retry_after` seconds for a 429."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None, reason: str = "") -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after, self.reason = status, detail, retry_after, reason


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class Auth:
    def __init__(
        self, keys: set[str], admin_keys: set[str], key_hashes: frozenset[str] | set[str] = frozenset()
    ) -> None:
        self.keys, self.admin_keys = keys, admin_keys
        digests = {_digest(k) for k in keys | admin_keys} | {h.lower() for h in key_hashes}
        # admin keys open the inference routes too, but only where keys are required at all
        self._digests = sorted(digests) if keys or key_hashes else []
        self._admin_digests = sorted(_digest(k) for k in admin_keys)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    @staticmethod
    def presented(headers) -> str | None:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        return headers.get("x-api-key") or None

    def check(self, headers) -> str | None:
        """The caller's key_id (None when no keys are configured); 401 when a key is needed and wrong."""
        if not self.required:
            return None
        key = self.presented(headers)
        if key is None:
            raise Rejected(401, "missing API key (Authorization: Bearer KEY or X-API-Key: KEY)")
        digest = _digest(key)
        if not _matches(digest, self._digests):
            raise Rejected(401, "invalid API key")
        return digest[:8]

    def check_admin(self, headers) -> str:
        key = self.presented(headers)
        if not self.admin_keys:
            raise Rejected(403, "no admin keys configured (KILN_ADMIN_KEYS)")
        if key is None or not _matches(_digest(key), self._admin_digests):
            raise Rejected(401, "an admin key is required")
        return key_id(key)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _matches(digest: str, digests: list[str]) -> bool:
    """Whether `digest` is one of `digests`, comparing with every one in constant time (no early exit)."""
    found = False
    for candidate in digests:
        found |= hmac.compare_digest(digest, candidate)
    return found


def route_limits(spec: str) -> dict[str, float]:
    """`/v1/chat/completions=30,/infer=60` -> {route: requests per minute}."""
    limits = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        route, sep, rpm = part.partition("=")
        try:
            limits[route.strip()] = float(rpm)
        except ValueError:
            sep = ""
        if not sep or not route.strip().startswith("/") or limits.get(route.strip(), 0) <= 0:
            raise ValueError(f"{part!r}: expected ROUTE=REQUESTS_PER_MINUTE, e.g. /v1/chat/completions=30")
    return limits


class RateLimiter:
    def __init__(self, rpm: float, burst: int) -> None:
        self.rate = rpm / 60.0  # tokens per second
        self.burst = burst
        self.buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, last refill time)

    def check(self, who: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self.buckets.get(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self.buckets[who] = (tokens, now)
            wait = (1 - tokens) / self.rate
            raise Rejected(429, f"rate limit exceeded; retry in {wait:.1f} s", retry_after=wait, reason="rate_limit")
        self.buckets[who] = (tokens - 1, now)
        self._trim()

    def _refilled(self, who: str) -> tuple[float, float]:
        now = time.monotonic()
        tokens, last = self.buckets.get(who, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate), now

    def check_not_empty(self, who: str, detail: str) -> None:
        """429 when `who`'s bucket is empty, without taking a token (a bucket of failures, say)."""
        if self.rate <= 0:
            return
        tokens, _ = self._refilled(who)
        if tokens < 1:
            wait = (1 - tokens) / self.rate
            raise Rejected(429, f"{detail}; retry in {wait:.1f} s", retry_after=wait, reason="auth_failures")

    def take(self, who: str) -> None:
        """Take one token from `who`'s bucket (down to empty, never below)."""
        if self.rate <= 0:
            return
        tokens, now = self._refilled(who)
        self.buckets[who] = (max(0.0, tokens - 1), now)
        self._trim()

    def _trim(self) -> None:
        if len(self.buckets) > 100_000:  # forget the oldest callers rather than grow without bound
            for stale in sorted(self.buckets, key=lambda k: self.buckets[k][1])[:50_000]:
                del self.buckets[stale]


class Admission:
    """FIFO admission: a released place goes straight to the oldest waiter."""

    def __init__(self, max_in_flight: int, max_queue: int) -> None:
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Take a place, waiting in the queue if need be; returns the seconds waited. 429 when full."""
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise Rejected(
                429, f"server busy: {self.in_flight} requests in flight and {self.queued} queued",
                retry_after=1, reason="overload",
            )  # fmt: skip
        start = time.monotonic()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the place was handed over just as the caller gave up: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        return time.monotonic() - start

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place moves to the waiter; in_flight stays
                return
        self.in_flight -= 1


def retry_after_header(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds is not None else {}
