"""The HTTP gateway (FastAPI): the state every route shares. app.py builds the app that mounts kiln's own
routes (kiln_api.py) and the OpenAI-compatible ones (openai_api.py) over it.

    GET  /                      model, version, alias, replicas ready/total, uptime
    GET  /health                200 once a replica is warm, else 503
    POST /infer                 {"query", "max_length", "temperature", "top_p", "num_return_sequences", "preset"}
    POST /infer/stream          the same as server-sent events, one per token, then `event: done`
    GET  /llm/models            registered versions, aliases, presets, what is served
    POST /llm/generate/stream   {"prompt", "preset"} as server-sent events
    GET  /metrics               Prometheus text
    POST /admin/reload          swap to the version the alias names now (admin key)
    GET  /canary                the canary, production, request counts, decisions (canary_api.py)
    GET  /canary/analysis       the canary analysis now
    POST /admin/canary/promote  promote the canary now, the analysis attached (admin key)
    POST /admin/canary/abort    abort the canary now: share 0, version tagged canary_failed (admin key)

Every inference route passes auth and the rate limit (a dependency), then admission
(`Gateway.admit`); every outcome, 429 included, ends in one `Call.finish`, and every request that
reached a version, with its answer's text, in the per-version quality counters (`Gateway.quality`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pipeline.presets import DEFAULT, Preset
from pipeline.serve.canary import CanaryActions, CanaryWatch, Quality, answer_texts, stream_text
from pipeline.serve.edge import error_body, request_record
from pipeline.serve.guards import Admission, Auth, RateLimiter, Rejected, retry_after_header, route_limits
from pipeline.serve.inference import Call, Inference, InferenceError, loop_deadline, prepare_text
from pipeline.serve.metrics import Metrics
from pipeline.serve.rollout import Deployment
from pipeline.serve.tracing import Tracing

log = logging.getLogger("kiln.serve")


def client_address(request: Request) -> str:
    """The client as the edge resolved it (X-Forwarded-For only from a trusted proxy), else the peer."""
    resolved = request.scope.get("state", {}).get("client_address")
    return resolved or (request.client.host if request.client else "unknown")


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Gateway:
    """The state every route shares: settings, the deployment, the guards, the metrics."""

    def __init__(
        self, settings, deployment: Deployment, metrics: Metrics, canary_actions: CanaryActions | None = None
    ) -> None:
        self.settings, self.deployment, self.metrics = settings, deployment, metrics
        self.quality = Quality(metrics.registry, settings)
        self.canary = CanaryWatch(settings, deployment, self.quality, canary_actions)
        self.auth = Auth(settings.api_keys, settings.admin_keys, settings.api_key_hashes)
        self.limiter = RateLimiter(settings.kiln_rate_limit_rpm, settings.kiln_rate_limit_burst)
        self.route_limiters = {
            route: RateLimiter(rpm, settings.kiln_rate_limit_burst)
            for route, rpm in route_limits(settings.kiln_route_rate_limits).items()
        }
        # failed authentication per client address: a key cannot be guessed at line speed
        self.auth_failures = RateLimiter(settings.kiln_auth_failures_per_min, settings.kiln_auth_failures_per_min)
        self.admission = Admission(settings.max_concurrent_inference, settings.kiln_max_queue)
        self.inference = Inference(
            deployment, metrics, settings.inference_timeout_sec, settings.kiln_first_token_timeout_sec
        )
        self.tracing = Tracing(settings, deployment, metrics.registry)  # pipeline/serve/tracing.py

    async def guard(self, request: Request) -> str | None:
        """The route dependency: the caller's key (401 without one when keys are set), then its rate
        limit (429), the route's own limit where one is set; answers the key id routes log."""
        client = client_address(request)
        record = request_record.get()
        try:
            self.auth_failures.check_not_empty(client, "too many failed authentications from this address")
            try:
                key = self.auth.check(request.headers)
            except Rejected as exc:
                if exc.status == 401:
                    self.auth_failures.take(client)
                raise
            if record is not None:
                record["key_id"] = key
            self.limiter.check(key or client)
            route_limiter = self.route_limiters.get(request.url.path)
            if route_limiter is not None:
                route_limiter.check(key or client)
        except Rejected as exc:
            if exc.status == 429:
                self.metrics.rejected.labels(exc.reason).inc()
            if record is not None:
                record["error"] = exc.detail  # the edge logs the line; never the key itself
            headers = retry_after_header(exc.retry_after)
            if exc.status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            raise HTTPException(exc.status, exc.detail, headers=headers) from None
        return key

    def presets(self) -> dict[str, Preset]:
        pool = self.deployment.active
        return pool.source.presets if pool else {DEFAULT: Preset()}

    def preset(self, name: str | None) -> Preset:
        presets = self.presets()
        if (name or DEFAULT) not in presets:
            raise HTTPException(422, f"unknown preset {name!r} (presets: {', '.join(sorted(presets))})")
        return presets[name or DEFAULT]

    def prepare(self, text: str) -> str:
        return prepare_text(text, self.settings.llm_input_max_length)

    def reject(self, call: Call, exc: Rejected) -> JSONResponse:
        if exc.status == 429:
            self.metrics.rejected.labels(exc.reason).inc()
        call.error = exc.detail
        call.finish(self.metrics, exc.status)
        traced = self.tracing.failed(call)  # a busy gateway's refusal is a served outcome: traced too
        body = error_body(call.route, exc.status, exc.detail)
        return JSONResponse(body, exc.status, headers={**retry_after_header(exc.retry_after), **traced})

    def fail(self, call: Call, status: int, detail: str, fallback) -> Response:
        """A request that ran and failed: its status and detail, or the fallback answer for a 5xx."""
        call.error = detail
        call.finish(self.metrics, status)
        self.quality.outcome(call)
        text = self.settings.llm_fallback_response if status >= 500 else None
        traced = self.tracing.failed(call, fallback=text)  # the trace holds what the user got
        if text is not None:
            answer = fallback(text)
            answer.headers.update({"X-Request-Id": call.request_id, **traced})
            return answer
        body = error_body(call.route, status, detail)
        return JSONResponse(body, status, headers={"X-Request-Id": call.request_id, **traced})

    def gone(self, call: Call) -> None:
        """The client went away (the edge cancelled the request): account it as 499."""
        call.error = call.error or "client disconnected"
        call.finish(self.metrics, 499)

    async def admit(self, call: Call, places: int = 1) -> None:
        """`places` in flight (n answers are n admissions) within the request's deadline; Rejected (429)
        or InferenceError (timeout). All or none: a refusal gives back what was taken."""
        if places > self.admission.max_in_flight:  # could never all be held at once: refuse, do not wait
            limit = self.admission.max_in_flight
            raise Rejected(422, f"{places} answers need {places} places at once; MAX_CONCURRENT_INFERENCE is {limit}")
        held = 0
        try:
            async with asyncio.timeout_at(loop_deadline(self.inference.deadline(call))):
                for _ in range(places):
                    call.queue_s += await self.admission.acquire()
                    held += 1
        except BaseException as exc:
            for _ in range(held):
                self.admission.release()
            if isinstance(exc, TimeoutError):
                raise self.inference.timeout_error() from None
            raise
        self.metrics.queue_wait.labels(call.route).observe(call.queue_s)

    async def admitted(self, call: Call, fallback, places: int = 1) -> Response | None:
        """None once `call` holds its places in flight; else the answer that refuses it (429, or the timeout)."""
        try:
            await self.admit(call, places)
        except Rejected as exc:
            return self.reject(call, exc)
        except InferenceError as exc:
            return self.fail(call, exc.status, exc.detail, fallback)
        except asyncio.CancelledError:  # left while queued: the queue already forgot it
            self.gone(call)
            raise
        return None

    async def run_json(self, call: Call, work, fallback, places: int = 1) -> Response:
        """Admit, run `work()` (a coroutine returning the body), answer JSON; every failure mapped."""
        refused = await self.admitted(call, fallback, places)
        if refused is not None:
            return refused
        try:
            body = await work()
        except InferenceError as exc:
            return self.fail(call, exc.status, exc.detail, fallback)
        except asyncio.CancelledError:  # the upstream answer was closed on the way out, which stops it
            self.gone(call)
            raise
        except Exception:
            log.exception("request %s failed", call.request_id)
            return self.fail(call, 500, "internal server error", fallback)
        finally:
            for _ in range(places):
                self.admission.release()
        call.finish(self.metrics, 200)
        self.quality.outcome(call)
        texts = answer_texts(body) if isinstance(body, dict) else []
        for text in texts:
            self.quality.answer(call.version, text, call.completion_tokens // max(1, len(texts)))
        traced = self.tracing.answered(call, body)
        return JSONResponse(body, headers={"X-Request-Id": call.request_id, **traced})

    async def run_stream(self, call: Call, path: str, body: dict, fallback, reframe=None, pool=None) -> Response:
        """Admit, start the upstream stream (retry and timeout before the first token), then relay it."""
        refused = await self.admitted(call, fallback)
        if refused is not None:
            return refused
        try:
            replica, resp, first = await self.inference.open_stream(call, path, body, pool)
        except BaseException as exc:  # a client gone before the first token must give its place back too
            self.admission.release()
            if isinstance(exc, InferenceError):
                return self.fail(call, exc.status, exc.detail, fallback)
            if isinstance(exc, asyncio.CancelledError):
                self.gone(call)
                raise
            if not isinstance(exc, Exception):
                raise
            log.exception("request %s failed", call.request_id)
            return self.fail(call, 500, "internal server error", fallback)
        stream = self.inference.relay(call, replica, resp, first, on_end=self.admission.release)
        traced, stream = self.tracing.streamed(call, stream)
        if reframe is not None:
            stream = reframe(stream, call)
        stream = self._watched(stream, call)
        headers = {**STREAM_HEADERS, "X-Request-Id": call.request_id, **traced}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def _watched(self, stream, call: Call):
        """The stream unchanged; at its end the request's outcome and its answer's text go to `quality`."""
        pieces, pending = [], b""
        try:
            async for chunk in stream:
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for raw in events:
                    line = raw.rsplit(b"\n", 1)[-1]
                    if line.startswith(b"data: {"):
                        with contextlib.suppress(ValueError, AttributeError):  # not an event this gateway wrote
                            pieces.append(stream_text(json.loads(line[6:])))
                yield chunk
        finally:
            self.quality.outcome(call)
            if call.status == 200:
                self.quality.answer(call.version, "".join(pieces), call.completion_tokens)
