"""The HTTP gateway (FastAPI): kiln's own routes, the OpenAI-compatible ones (openai_api.py), /metrics.

    GET  /                      model, version, alias, replicas ready/total, uptime
    GET  /health                200 once a replica is warm, else 503
    POST /infer                 {"query", "max_length", "temperature", "top_p", "num_return_sequences", "preset"}
    POST /infer/stream          the same as server-sent events, one per token, then `event: done`
    GET  /llm/models            registered versions, aliases, presets, what is served
    POST /llm/generate/stream   {"prompt", "preset"} as server-sent events
    GET  /metrics               Prometheus text
    POST /admin/reload          swap to the version the alias names now (admin key)

Every inference route passes auth and the rate limit (a dependency), then admission
(`Gateway.admit`); every outcome, 429 included, ends in one `Call.finish`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, field_validator

from pipeline.serve.guards import Admission, Auth, RateLimiter, Rejected, retry_after_header
from pipeline.serve.inference import Call, Inference, InferenceError, loop_deadline, prepare_text, sse_event
from pipeline.serve.metrics import Metrics
from pipeline.serve.presets import DEFAULT, Preset
from pipeline.serve.rollout import Deployment

log = logging.getLogger("kiln.serve")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class InferRequest(BaseModel):
    query: str = Field(..., min_length=1, max_length=4096)
    max_length: int | None = Field(None, ge=1, le=8192, description="new tokens; default: the preset's")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    num_return_sequences: int = Field(1, ge=1, le=8)
    preset: str = DEFAULT

    @field_validator("query")
    @classmethod
    def not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is blank")
        return v


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=4096)
    preset: str = DEFAULT


class Gateway:
    """The state every route shares: settings, the deployment, the guards, the metrics."""

    def __init__(self, settings, deployment: Deployment, metrics: Metrics) -> None:
        self.settings, self.deployment, self.metrics = settings, deployment, metrics
        self.auth = Auth(settings.api_keys, settings.admin_keys)
        self.limiter = RateLimiter(settings.kiln_rate_limit_rpm, settings.kiln_rate_limit_burst)
        self.admission = Admission(settings.max_concurrent_inference, settings.kiln_max_queue)
        self.inference = Inference(deployment, metrics, settings.inference_timeout_sec)

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
        call.finish(self.metrics, exc.status)
        return JSONResponse({"detail": exc.detail}, exc.status, headers=retry_after_header(exc.retry_after))

    def fail(self, call: Call, status: int, detail: str, fallback) -> Response:
        """A request that ran and failed: its status and detail, or the fallback answer for a 5xx."""
        call.error = detail
        call.finish(self.metrics, status)
        if status >= 500 and self.settings.llm_fallback_response is not None:
            return fallback(self.settings.llm_fallback_response)
        return JSONResponse({"detail": detail}, status, headers={"X-Request-Id": call.request_id})

    async def admit(self, call: Call) -> None:
        """A place in flight within the request's deadline; Rejected (429) or InferenceError (timeout)."""
        try:
            async with asyncio.timeout_at(loop_deadline(self.inference.deadline(call))):
                call.queue_s = await self.admission.acquire()
        except TimeoutError:
            raise self.inference.timeout_error() from None
        self.metrics.queue_wait.labels(call.route).observe(call.queue_s)

    async def run_json(self, call: Call, work, fallback) -> Response:
        """Admit, run `work()` (a coroutine returning the body), answer JSON; every failure mapped."""
        try:
            await self.admit(call)
        except Rejected as exc:
            return self.reject(call, exc)
        except InferenceError as exc:
            return self.fail(call, exc.status, exc.detail, fallback)
        try:
            body = await work()
        except InferenceError as exc:
            return self.fail(call, exc.status, exc.detail, fallback)
        except Exception:
            log.exception("request %s failed", call.request_id)
            return self.fail(call, 500, "internal server error", fallback)
        finally:
            self.admission.release()
        call.finish(self.metrics, 200)
        return JSONResponse(body, headers={"X-Request-Id": call.request_id})

    async def run_stream(self, call: Call, path: str, body: dict, fallback, reframe=None, pool=None) -> Response:
        """Admit, start the upstream stream (retry and timeout before the first token), then relay it."""
        try:
            await self.admit(call)
        except Rejected as exc:
            return self.reject(call, exc)
        except InferenceError as exc:
            return self.fail(call, exc.status, exc.detail, fallback)
        try:
            replica, resp, first = await self.inference.open_stream(call, path, body, pool)
        except Exception as exc:
            self.admission.release()
            if isinstance(exc, InferenceError):
                return self.fail(call, exc.status, exc.detail, fallback)
            log.exception("request %s failed", call.request_id)
            return self.fail(call, 500, "internal server error", fallback)
        stream = self.inference.relay(call, replica, resp, first, on_end=self.admission.release)
        if reframe is not None:
            stream = reframe(stream, call)
        headers = {**STREAM_HEADERS, "X-Request-Id": call.request_id}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def native_body(prompt: str, preset: Preset, max_tokens: int | None = None, **sampler) -> dict:
    """A llama-server /completion request: the preset's sampler, the caller's overrides on top."""
    return {
        "prompt": prompt,
        **preset.sampler(),
        **{k: v for k, v in sampler.items() if v is not None},
        "n_predict": min(max_tokens or preset.max_tokens, preset.context_size),
        "cache_prompt": True,
    }


async def reframe_tokens(chunks, call: Call):
    """llama-server's native stream as kiln's events: `data: {"token": ...}` per token, then
    `event: done` with the usage, or `event: error`."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        out = []
        for raw in events:
            if not raw.startswith(b"data: "):
                continue
            event = json.loads(raw[6:])
            if "error" in event:
                out.append(sse_event(event["error"], "error"))
            elif event.get("stop"):
                if event.get("content"):
                    out.append(sse_event({"token": event["content"]}))
                usage = _usage(event.get("tokens_evaluated", 0), event.get("tokens_predicted", 0))
                out.append(sse_event({"usage": usage, "version": call.version, "request_id": call.request_id}, "done"))
            else:
                out.append(sse_event({"token": event.get("content", "")}))
        if out:
            yield b"".join(out)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _fallback_stream(text: str) -> StreamingResponse:
    events = sse_event({"token": text}) + sse_event({"usage": _usage(0, 0), "fallback": True}, "done")
    return StreamingResponse(iter([events]), media_type="text/event-stream", headers=STREAM_HEADERS)


class RouteCounter:
    """Pure ASGI middleware: counts every response by route and status (no per-chunk cost)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(settings, deployment: Deployment, metrics: Metrics, on_startup_failure=None) -> FastAPI:
    from pipeline.serve.openai_api import router as openai_router

    gw = Gateway(settings, deployment, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start():
            try:
                await deployment.start()
            except Exception:  # deployment.error says why; /health stays 503
                if on_startup_failure:
                    on_startup_failure()

        task = asyncio.create_task(start())  # /health answers 503 while the replicas load
        yield
        task.cancel()
        await deployment.stop()

    app = FastAPI(title="kiln serve", lifespan=lifespan)
    app.state.kiln = gw

    async def guard(request: Request) -> str | None:
        try:
            key = gw.auth.check(request.headers)
            gw.limiter.check(key or (request.client.host if request.client else "unknown"))
        except Rejected as exc:
            if exc.status == 429:
                metrics.rejected.labels(exc.reason).inc()
            headers = retry_after_header(exc.retry_after)
            if exc.status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            raise HTTPException(exc.status, exc.detail, headers=headers) from None
        return key

    app.state.guard = guard

    @app.get("/")
    async def info():
        pool = deployment.active
        canary = deployment.canary
        return {
            "model": pool.source.name if pool else None,
            "version": pool.version if pool else None,
            "alias": pool.source.alias if pool else deployment.target.which,
            "replicas": {"ready": len(pool.ready()) if pool else 0, "total": len(pool.replicas) if pool else 0},
            "canary": None if canary is None else {
                "version": canary.version, "share": deployment.canary_share, "ready": len(canary.ready()),
            },
            "uptime_s": round(time.time() - deployment.started, 1),
            "error": deployment.error,
        }  # fmt: skip

    @app.get("/health")
    async def health():
        pool = deployment.active
        if pool is not None and pool.ready():
            return {"status": "ok", "version": pool.version, "replicas_ready": len(pool.ready())}
        status = "failed" if deployment.error else "loading"
        return JSONResponse({"status": status, "detail": deployment.error}, 503)

    @app.post("/infer")
    async def infer(req: InferRequest, key: str | None = Depends(guard)):
        call = Call("/infer", key_id=key)
        preset = gw.preset(req.preset)
        prompt = call.query = gw.prepare(req.query)
        body = native_body(prompt, preset, req.max_length, temperature=req.temperature, top_p=req.top_p)

        async def work():
            answers = await asyncio.gather(
                *(gw.inference.complete(call, "/completion", body) for _ in range(req.num_return_sequences))
            )
            call.prompt_tokens = answers[0].get("tokens_evaluated", 0)
            call.completion_tokens = sum(a.get("tokens_predicted", 0) for a in answers)
            texts = [a.get("content", "") for a in answers]
            return {
                "generated_text": texts[0] if len(texts) == 1 else texts,
                "model": deployment.active.source.name if deployment.active else None,
                "version": call.version, "preset": req.preset, "request_id": call.request_id,
                "usage": _usage(call.prompt_tokens, call.completion_tokens),
            }  # fmt: skip

        def fallback(text: str):
            return JSONResponse({"generated_text": text, "fallback": True, "usage": _usage(0, 0)})

        return await gw.run_json(call, work, fallback)

    async def stream_native(route: str, text: str, preset_name: str, key, max_length=None, **sampler):
        call = Call(route, key_id=key)
        preset = gw.preset(preset_name)
        prompt = call.query = gw.prepare(text)
        body = {**native_body(prompt, preset, max_length, **sampler), "stream": True}
        return await gw.run_stream(call, "/completion", body, _fallback_stream, reframe=reframe_tokens)

    @app.post("/infer/stream")
    async def infer_stream(req: InferRequest, key: str | None = Depends(guard)):
        if req.num_return_sequences != 1:
            raise HTTPException(422, "num_return_sequences must be 1 when streaming")
        return await stream_native(
            "/infer/stream", req.query, req.preset, key, req.max_length, temperature=req.temperature, top_p=req.top_p
        )

    @app.post("/llm/generate/stream")
    async def generate_stream(req: GenerateRequest, key: str | None = Depends(guard)):
        return await stream_native("/llm/generate/stream", req.prompt, req.preset, key)

    @app.get("/llm/models")
    async def llm_models(key: str | None = Depends(guard)):
        catalog = deployment.target.catalog
        versions = await asyncio.to_thread(catalog) if catalog else []
        return {
            "served": [
                {"version": p.version, "role": p.role, "model": p.source.label, "sha256": p.source.sha256}
                for p in deployment.pools()
            ],
            "versions": versions,
            "presets": {name: p.as_dict() for name, p in sorted(gw.presets().items())},
        }

    @app.get("/metrics")
    async def prometheus():
        metrics.in_flight.set(gw.admission.in_flight)
        metrics.queued.set(gw.admission.queued)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(request: Request):
        try:
            who = gw.auth.check_admin(request.headers)
        except Rejected as exc:
            return JSONResponse({"detail": exc.detail}, exc.status)
        try:
            result = await deployment.reload()
        except Exception as exc:
            log.warning("reload requested by key %s failed: %s", who, exc)
            return JSONResponse({"detail": f"reload failed: {exc}"}, 503)
        log.info("reload requested by key %s: %s", who, result)
        return result

    app.include_router(openai_router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )  # fmt: skip
    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(RouteCounter, metrics=metrics, routes=routes)
    return app
