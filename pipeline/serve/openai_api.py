"""The OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The request goes to llama-server's own implementation of the same route, so every field it
understands works; the gateway fills what the client left out from the preset (`"preset"` in
the body picks one, default `default`), masks the text the model will read, and chooses the pool:
a `model` naming the canary's version or alias goes to the canary, anything else is routed as
usual (the canary's share, sticky per `user`, else per API key). Streams are relayed byte for
byte: no per-token re-encoding on the hot path.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipeline.presets import DEFAULT
from pipeline.serve.gateway import STREAM_HEADERS, Gateway
from pipeline.serve.inference import Call, sse_event

router = APIRouter()
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "repeat_penalty")


async def _guard(request: Request) -> str | None:
    return await request.app.state.guard(request)


def _model_list(gw: Gateway) -> list[dict]:
    return [
        {"id": p.source.label, "object": "model", "created": int(gw.deployment.started), "owned_by": "kiln",
         "version": p.version, "role": p.role}
        for p in gw.deployment.pools()
    ]  # fmt: skip


@router.get("/v1/models")
async def models(request: Request, key: str | None = Depends(_guard)):
    return {"object": "list", "data": _model_list(request.app.state.kiln)}


def _mask_content(gw: Gateway, content):
    if isinstance(content, str):
        return gw.prepare(content)
    if isinstance(content, list):  # content parts: mask the text ones
        return [{**part, "text": gw.prepare(part["text"])} if part.get("type") == "text" else part for part in content]
    return content


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message, "error": {"message": message, "type": "invalid_request_error"}}, status)


async def _proxy(request: Request, route: str, key: str | None, chat: bool):
    gw: Gateway = request.app.state.kiln
    try:
        body = await request.json()
    except ValueError:
        return _error(422, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(422, "the request body must be a JSON object")
    call = Call(route, key_id=key)
    call.user = body["user"] if isinstance(body.get("user"), str) and body["user"] else None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(422, "messages: a non-empty list of {role, content} is required")
        body["messages"] = [{**m, "content": _mask_content(gw, m.get("content"))} for m in messages]
        last = body["messages"][-1].get("content")
        call.query = last if isinstance(last, str) else ""
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            body["prompt"] = call.query = gw.prepare(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            body["prompt"] = [gw.prepare(p) for p in prompt]
            call.query = body["prompt"][0]
        else:
            return _error(422, "prompt: a non-empty string or list of strings is required")
    call.preset, call.sent = body.get("preset") or DEFAULT, body
    try:
        preset = gw.preset(body.pop("preset", None))
    except Exception as exc:
        return _error(422, getattr(exc, "detail", str(exc)))
    for k, v in preset.sampler().items():
        body.setdefault(k, v)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = preset.max_tokens
    pool = _pool_for(gw, body.get("model"), call.user or key)
    served = pool or gw.deployment.active
    model_id = served.source.label if served else "kiln"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    if body.get("stream"):
        return await gw.run_stream(call, path, body, lambda text: _fallback_stream(text, model_id, chat), pool=pool)

    async def work():
        answer = await gw.inference.complete(call, path, body, pool)
        usage = answer.get("usage") or {}
        call.prompt_tokens = usage.get("prompt_tokens", 0)
        call.completion_tokens = usage.get("completion_tokens", 0)
        answer["model"] = model_id
        return answer

    return await gw.run_json(call, work, lambda text: JSONResponse(_fallback_answer(text, model_id, chat)))


def _pool_for(gw: Gateway, model, user: str | None = None):
    """The canary when `model` names it; else the pool the (sticky) canary draw picks, so the answer's
    `model` names the version that wrote it."""
    canary = gw.deployment.canary
    if canary is not None and model and model in (canary.source.label, canary.version, "canary"):
        return canary
    return gw.deployment.route(user)


def _fallback_answer(text: str, model: str, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": "stop"}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {
        "id": f"fallback-{uuid.uuid4().hex[:12]}", "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "fallback": True,
    }  # fmt: skip


def _fallback_stream(text: str, model: str, chat: bool) -> StreamingResponse:
    answer = _fallback_answer(text, model, chat)
    answer["object"] = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        answer["choices"][0]["delta"] = answer["choices"][0].pop("message")
    events = sse_event(answer) + b"data: [DONE]\n\n"
    return StreamingResponse(iter([events]), media_type="text/event-stream", headers=STREAM_HEADERS)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, key: str | None = Depends(_guard)):
    return await _proxy(request, "/v1/chat/completions", key, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, key: str | None = Depends(_guard)):
    return await _proxy(request, "/v1/completions", key, chat=False)
