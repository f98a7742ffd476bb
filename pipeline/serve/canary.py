"""Live quality per version, and the canary watch that decides on it.

`Quality` sees every finished request the gateway routed to a version (`outcome`) and every answer
it returned (`answer`): it counts them in `/metrics` (outcomes, empty and repetitive answers, answer
length, the admission limits the alert rules divide by) and keeps what the canary analysis
(pipeline/release/canary.py) needs since the canary started: counts and the last `WINDOW` values of
TTFT, latency, tokens/s and answer length.

`CanaryWatch` runs that analysis on demand (`kiln canary analyze`, `GET /canary/analysis`) and, with
`--canary-auto`, every KILN_CANARY_INTERVAL_SEC. Promote: production moves in the registry (files
verified, analysis attached) and the canary's warm pool becomes the production pool in place. Abort:
the canary's share drops to 0 at once (its requests in flight finish), then the version is tagged
`canary_failed` with the reason. Production is untouched by an abort. Every decision is logged; the
two that end a canary are also events in the registry's history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from pipeline.release.canary import ABORT, HOLD, PROMOTE, CanaryPolicy, VersionSample, analyze

log = logging.getLogger("kiln.serve.canary")
WINDOW = 5000  # values kept per figure and version for the tail checks
REPEAT_TAIL = 64  # the last tokens of an answer looked at for repetition
REPEAT_N, REPEAT_MIN = 4, 3  # repetitive: some 4-gram occurs 3 times or more in that tail
_PIECES = re.compile(r"\w+|[^\w\s]")
ANSWER_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def pieces(text: str) -> list[str]:
    """An answer's tokens as the gateway sees them without a tokenizer: words and punctuation marks."""
    return _PIECES.findall(text)


def repetitive(text: str) -> bool:
    """Whether the answer's last REPEAT_TAIL pieces repeat an n-gram REPEAT_MIN times (a generation loop)."""
    tail = pieces(text)[-REPEAT_TAIL:]
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(tail) - REPEAT_N + 1):
        gram = tuple(tail[i : i + REPEAT_N])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= REPEAT_MIN:
            return True
    return False


def outcome_of(status: int, error: str | None) -> str:
    """ok, timeout, error (other 5xx), client_error (4xx), cancelled (the client went away)."""
    if status == 200:
        return "ok"
    if status == 499:
        return "cancelled"
    if status >= 500:
        return "timeout" if error and "timeout" in error else "error"
    return "client_error"


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    answers: int = 0
    empty: int = 0
    repetitive: int = 0
    values: dict[str, deque] = field(
        default_factory=lambda: {k: deque(maxlen=WINDOW) for k in ("ttft", "latency", "tokens_per_s", "answer_tokens")}
    )


class Quality:
    """Per-version outcome and answer counters: Prometheus series and the analysis's tallies."""

    def __init__(self, registry, settings) -> None:
        self.outcomes = Counter(
            "kiln_version_requests", "finished requests per version by outcome (ok, error, timeout, client_error, "
            "cancelled)", ["version", "outcome"], registry=registry,
        )  # fmt: skip
        self.answers = Counter("kiln_answers", "answers returned (200) per version", ["version"], registry=registry)
        self.empty = Counter("kiln_empty_answers", "answers with no text", ["version"], registry=registry)
        self.repeats = Counter(
            "kiln_repetitive_answers", f"answers whose last {REPEAT_TAIL} tokens repeat a {REPEAT_N}-gram",
            ["version"], registry=registry,
        )  # fmt: skip
        self.length = Histogram(
            "kiln_answer_tokens", "tokens per answer", ["version"], buckets=ANSWER_BUCKETS, registry=registry
        )
        limits = Gauge("kiln_admission_limit", "admission limits (in_flight, queue)", ["kind"], registry=registry)
        limits.labels("in_flight").set(settings.max_concurrent_inference)
        limits.labels("queue").set(settings.kiln_max_queue)
        self.tallies: dict[str, _Tally] = {}

    def reset(self) -> None:
        """Start the analysis's tallies afresh (a new canary); the Prometheus counters keep counting."""
        self.tallies.clear()

    def _tally(self, version: str) -> _Tally:
        return self.tallies.setdefault(version, _Tally())

    def outcome(self, call) -> None:
        """A finished request (inference.Call) that reached a version."""
        if not call.version:
            return  # refused before routing (429, a timeout in the queue): no version to blame
        kind = outcome_of(call.status, call.error)
        self.outcomes.labels(call.version, kind).inc()
        if kind in ("cancelled", "client_error"):
            return
        t = self._tally(call.version)
        t.requests += 1
        t.errors += kind == "error"
        t.timeouts += kind == "timeout"
        if kind != "ok":
            return
        total = time.monotonic() - call.started
        t.values["latency"].append(total)
        if call.ttft_s is not None:
            t.values["ttft"].append(call.ttft_s)
            if call.completion_tokens > 1 and total > call.ttft_s:
                t.values["tokens_per_s"].append((call.completion_tokens - 1) / (total - call.ttft_s))

    def answer(self, version: str | None, text: str, tokens: int) -> None:
        """One answer returned with 200: its text and its length in tokens (llama-server's count)."""
        if not version:
            return
        empty, looped = not text.strip(), repetitive(text)
        self.answers.labels(version).inc()
        self.length.labels(version).observe(tokens)
        if empty:
            self.empty.labels(version).inc()
        if looped:
            self.repeats.labels(version).inc()
        t = self._tally(version)
        t.answers += 1
        t.empty += empty
        t.repetitive += looped
        t.values["answer_tokens"].append(tokens)

    def sample(self, version: str, feedback: Callable[[str], tuple[int, int]] | None = None) -> VersionSample:
        t = self.tallies.get(version) or _Tally()
        s = VersionSample(
            version, t.requests, t.errors, t.timeouts, t.answers, t.empty, t.repetitive,
            ttft=list(t.values["ttft"]), latency=list(t.values["latency"]),
            tokens_per_s=list(t.values["tokens_per_s"]), answer_tokens=list(t.values["answer_tokens"]),
        )  # fmt: skip
        if feedback is not None:
            s.thumbs_down, s.votes = feedback(version)
        return s


def answer_texts(body: dict) -> list[str]:
    """The answer texts of a non-streaming body: kiln's `generated_text`, OpenAI's choices."""
    if "generated_text" in body:
        text = body["generated_text"]
        return text if isinstance(text, list) else [text or ""]
    out = []
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        out.append(message.get("content") or choice.get("text") or "")
    return out


def stream_text(event: dict) -> str:
    """The text one server-sent event adds: kiln's `token`, llama-server's `content`, OpenAI's choices."""
    if "token" in event:
        return event["token"] or ""
    if "content" in event:
        return event["content"] or ""
    return "".join(((c.get("delta") or {}).get("content") or c.get("text") or "") for c in event.get("choices") or [])


@dataclass
class CanaryActions:
    """What a decision does in the registry: promote(version, analysis), abort(version, analysis, reason)."""

    promote: Callable[[str, dict], dict]
    abort: Callable[[str, dict, str], dict]


class CanaryWatch:
    """Analysis of the canary beside production, and the decisions that end it."""

    def __init__(self, settings, deployment, quality: Quality, actions: CanaryActions | None = None) -> None:
        self.deployment, self.quality, self.actions = deployment, quality, actions
        self.policy = CanaryPolicy(
            min_requests=settings.kiln_canary_min_requests, alpha=settings.kiln_canary_alpha,
            beta=settings.kiln_canary_beta, latency_ratio=settings.kiln_canary_latency_ratio,
            ttft_ratio=settings.kiln_canary_ttft_ratio, tokens_per_s_ratio=settings.kiln_canary_tokens_per_s_ratio,
        )  # fmt: skip
        self.auto, self.interval = settings.kiln_canary_auto, settings.kiln_canary_interval_sec
        self.feedback: Callable[[str], tuple[int, int]] | None = None  # (thumbs down, votes) of a version
        self.decisions: deque[dict] = deque(maxlen=200)  # this process's decisions, oldest first
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def status(self) -> dict:
        d = self.deployment
        canary, active = d.canary, d.active
        return {
            "canary": None if canary is None else {"version": canary.version, "share": d.canary_share,
                                                  "ready": len(canary.ready())},
            "production": None if active is None else {"version": active.version},
            "auto": self.auto, "interval_s": self.interval, "min_requests": self.policy.min_requests,
            "requests": {v: t.requests for v, t in self.quality.tallies.items()},
            "decisions": list(self.decisions)[-20:],
        }  # fmt: skip

    def analysis(self) -> dict | None:
        """The analysis now, or None when no canary is served."""
        d = self.deployment
        if d.canary is None or d.active is None:
            return None
        canary = self.quality.sample(d.canary.version, self.feedback)
        production = self.quality.sample(d.active.version, self.feedback)
        return analyze(canary, production, self.policy)

    def _log(self, analysis: dict, decision: str, by: str, detail: str | None = None) -> dict:
        entry = {
            "when": time.time(), "decision": decision, "by": by, "canary": analysis["canary"]["version"],
            "production": analysis["production"]["version"], "reason": detail or analysis["reason"],
        }  # fmt: skip
        self.decisions.append(entry)
        log.info(json.dumps({"event": "canary_decision", **entry, "checks": analysis.get("checks", [])}))
        return entry

    async def decide(self, by: str = "auto") -> dict:
        """Analyse, log the decision and carry out a promote or an abort. Returns the decision entry."""
        async with self._lock:
            analysis = self.analysis()
            if analysis is None:
                return {"decision": None, "reason": "no canary is served"}
            decision = analysis["decision"]
            if decision == PROMOTE:
                return await self._promote(analysis, by)
            if decision == ABORT:
                return await self._abort(analysis, by, analysis["reason"])
            return self._log(analysis, HOLD, by)

    async def promote(self, by: str = "manual") -> dict:
        async with self._lock:
            analysis = self.analysis()
            if analysis is None:
                return {"decision": None, "reason": "no canary is served"}
            return await self._promote(analysis, by)

    async def abort(self, reason: str, by: str = "manual") -> dict:
        async with self._lock:
            analysis = self.analysis()
            if analysis is None:
                return {"decision": None, "reason": "no canary is served"}
            return await self._abort(analysis, by, reason)

    async def _promote(self, analysis: dict, by: str) -> dict:
        version = analysis["canary"]["version"]
        if self.actions is not None:  # the registry first: a version whose files fail verification stays canary
            await asyncio.to_thread(self.actions.promote, version, analysis)
        await self.deployment.adopt_canary()
        self.quality.reset()
        return self._log(analysis, PROMOTE, by)

    async def _abort(self, analysis: dict, by: str, reason: str) -> dict:
        version = analysis["canary"]["version"]
        await self.deployment.drop_canary()  # no new request reaches it; those in flight finish
        self.quality.reset()
        entry = self._log(analysis, ABORT, by, reason)
        if self.actions is not None:
            await asyncio.to_thread(self.actions.abort, version, analysis, reason)
        return entry

    def start(self) -> None:
        if self.auto and self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.deployment.canary is None:
                continue
            try:
                await self.decide("auto")
            except Exception as exc:  # a registry hiccup: the canary keeps its share, the next look tries again
                log.warning("canary decision failed: %s", exc)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
