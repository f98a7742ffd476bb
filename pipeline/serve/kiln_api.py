"""kiln's own routes: `/`, `/health`, `/infer`, `/infer/stream`, `/llm/models`,
`/llm/generate/stream`, `/metrics`, `/admin/reload` (the table is in gateway.py).

Each route reads the shared `Gateway` from the app's state; inference routes pass its guard
(auth, rate limit) as a dependency and its admission, and speak llama-server's native
`/completion` upstream, reframed as kiln's events when streamed.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, field_validator

from pipeline import logs
from pipeline.presets import DEFAULT, Preset
from pipeline.serve.edge import request_record
from pipeline.serve.gateway import STREAM_HEADERS, Gateway
from pipeline.serve.guards import Rejected
from pipeline.serve.inference import Call, sse_event

log = logs.get("api")
router = APIRouter()


async def _guard(request: Request) -> str | None:
    return await request.app.state.kiln.guard(request)


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


@router.get("/")
async def info(request: Request):
    gw: Gateway = request.app.state.kiln
    deployment = gw.deployment
    pool = deployment.active
    return {
        "model": pool.source.name if pool else None,
        "version": pool.version if pool else None,
        "alias": pool.source.alias if pool else deployment.target.which,
        "replicas": {"ready": len(pool.ready()) if pool else 0, "total": len(pool.replicas) if pool else 0},
        "canary": _canary_info(deployment),
        "uptime_s": round(time.time() - deployment.started, 1),
        "error": deployment.error,
    }  # fmt: skip


def _canary_info(deployment) -> dict | None:
    canary = deployment.canary
    if canary is not None:
        return {"version": canary.version, "share": deployment.canary_share, "ready": len(canary.ready())}
    if deployment.canary_error:
        return {"version": None, "share": deployment.canary_share, "ready": 0, "error": deployment.canary_error}
    return None


@router.get("/health")
async def health(request: Request):
    gw: Gateway = request.app.state.kiln
    deployment = gw.deployment
    pool = deployment.active
    if pool is not None and pool.ready():
        answer = {"status": "ok", "version": pool.version, "replicas_ready": len(pool.ready())}
        troubled = pool.troubled()
        if troubled:  # still serving, with fewer replicas: say which and why
            answer.update(status="degraded", replicas=troubled)
        return answer
    status = "failed" if deployment.error else "loading"
    return JSONResponse({"status": status, "detail": deployment.error}, 503)


@router.post("/infer")
async def infer(req: InferRequest, request: Request, key: str | None = Depends(_guard)):
    gw: Gateway = request.app.state.kiln
    deployment = gw.deployment
    call = Call("/infer", key_id=key, sticky=key, preset=req.preset)
    preset = gw.preset(req.preset)
    prompt = call.query = gw.prepare(req.query)
    body = call.sent = native_body(prompt, preset, req.max_length, temperature=req.temperature, top_p=req.top_p)

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

    return await gw.run_json(call, work, fallback, places=req.num_return_sequences)


async def stream_native(gw: Gateway, route: str, text: str, preset_name: str, key, max_length=None, **sampler):
    call = Call(route, key_id=key, sticky=key, preset=preset_name)
    preset = gw.preset(preset_name)
    prompt = call.query = gw.prepare(text)
    body = call.sent = {**native_body(prompt, preset, max_length, **sampler), "stream": True}
    return await gw.run_stream(call, "/completion", body, _fallback_stream, reframe=reframe_tokens)


@router.post("/infer/stream")
async def infer_stream(req: InferRequest, request: Request, key: str | None = Depends(_guard)):
    gw: Gateway = request.app.state.kiln
    if req.num_return_sequences != 1:
        raise HTTPException(422, "num_return_sequences must be 1 when streaming")
    return await stream_native(
        gw, "/infer/stream", req.query, req.preset, key, req.max_length, temperature=req.temperature, top_p=req.top_p
    )


@router.post("/llm/generate/stream")
async def generate_stream(req: GenerateRequest, request: Request, key: str | None = Depends(_guard)):
    gw: Gateway = request.app.state.kiln
    return await stream_native(gw, "/llm/generate/stream", req.prompt, req.preset, key)


@router.get("/llm/models")
async def llm_models(request: Request, key: str | None = Depends(_guard)):
    gw: Gateway = request.app.state.kiln
    deployment = gw.deployment
    catalog = deployment.target.catalog
    versions = await asyncio.to_thread(catalog) if catalog else []
    return {
        "served": [
            {"version": p.version, "role": p.role, "model": p.source.label, "sha256": p.source.sha256}
            for p in deployment.serving()
        ],
        "versions": versions,
        "presets": {name: p.as_dict() for name, p in sorted(gw.presets().items())},
    }


@router.get("/metrics")
async def prometheus(request: Request):
    gw: Gateway = request.app.state.kiln
    metrics = gw.metrics
    metrics.in_flight.set(gw.admission.in_flight)
    metrics.queued.set(gw.admission.queued)
    await gw.deployment.export_replica_metrics()
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload")
async def reload(request: Request):
    gw: Gateway = request.app.state.kiln
    deployment = gw.deployment
    try:
        who = gw.auth.check_admin(request.headers)
    except Rejected as exc:
        record = request_record.get()
        if record is not None:
            record["error"] = exc.detail
        return JSONResponse({"detail": exc.detail}, exc.status)
    try:
        result = await deployment.reload(forced=True)
    except Exception as exc:
        log.warning("reload", route="/admin/reload", status=503, key_id=who, error=str(exc))
        return JSONResponse({"detail": f"reload failed: {exc}"}, 503)
    log.info("reload", route="/admin/reload", status=200, key_id=who, result=result)
    return result
