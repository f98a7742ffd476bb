"""The OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The request goes to llama-server's own implementation of the same route, so every field it
understands works; the gateway fills what the client left out from the preset (`"preset"` in
the body picks one, default `default`), masks every text the model will read (each message, each
text part, tool call names and arguments), and chooses the pool: a `model` of "canary",
"production" or a version (`kiln-tiny:3`, `3`; a registered one nobody serves is started on demand)
goes there, any other name is routed as usual (sticky per `user`, else per API key). Streams are
relayed byte for byte: no per-token re-encoding on the hot path. OpenAI fields kiln cannot honour
are refused with a 422 naming the field; `n` answers are `n` admissions. Every error has OpenAI's
body, so the `openai` client raises its typed exceptions.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipeline.errors import KilnError
from pipeline.presets import DEFAULT
from pipeline.serve.edge import error_body
from pipeline.serve.gateway import STREAM_HEADERS, Gateway
from pipeline.serve.inference import Call, merge_answers, sse_event

router = APIRouter()
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "repeat_penalty")
# OpenAI fields llama-server (so kiln) cannot honour: refused by name rather than silently ignored
UNSUPPORTED = ("best_of", "echo", "suffix", "audio", "modalities", "prediction", "web_search_options",
               "functions", "function_call", "store", "metadata", "service_tier")  # fmt: skip
MAX_N = 8
# below this many characters the text is masked on the event loop (a thread hop would cost more)
THREAD_MASK_CHARS = 4096


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


async def _guard(request: Request) -> str | None:
    return await request.app.state.guard(request)


def _model_list(gw: Gateway) -> list[dict]:
    return [
        {"id": p.source.label, "object": "model", "created": int(gw.deployment.started), "owned_by": "kiln",
         "version": p.version, "role": p.role}
        for p in gw.deployment.serving()
    ]  # fmt: skip


@router.get("/v1/models")
async def models(request: Request, key: str | None = Depends(_guard)):
    return {"object": "list", "data": _model_list(request.app.state.kiln)}


def _texts_of_message(message: dict, i: int) -> list[tuple[tuple, str]]:
    """Every text a client sends in `message` as (its path in the message, text), refusing shapes that
    are not OpenAI's (a content list holding a plain string, say) with a 422 naming where."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where}: an object {{role, content}} is required", where)
    found: list[tuple[tuple, str]] = []
    content = message.get("content")
    if isinstance(content, str):
        found.append((("content",), content))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise BadRequest(f"{where}.content[{j}]: a content part object is required, not {type(part).__name__}",
                                 f"{where}.content")  # fmt: skip
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}.content[{j}].text: a string is required", f"{where}.content")
                found.append((("content", j, "text"), part["text"]))
    elif content is not None:
        raise BadRequest(f"{where}.content: a string or a list of content parts is required", f"{where}.content")
    if isinstance(message.get("name"), str):
        found.append((("name",), message["name"]))
    for j, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise BadRequest(f"{where}.tool_calls[{j}].function: an object is required", f"{where}.tool_calls")
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                found.append((("tool_calls", j, "function", key), function[key]))
    return found


def _put(node, path: tuple, text: str) -> None:
    """Write a prepared text back at `path` (one _texts_of_message produced)."""
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = text


def _copy_message(message: dict) -> dict:
    copied = {**message}
    if isinstance(message.get("content"), list):
        copied["content"] = [{**part} for part in message["content"]]
    if message.get("tool_calls"):
        copied["tool_calls"] = [{**c, "function": {**c["function"]}} for c in message["tool_calls"]]
    return copied


async def prepare_messages(gw: Gateway, messages) -> list[dict]:
    """The messages as the model will read them: every text prepared (normalised, cut, PII masked)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list of {role, content} is required", "messages")
    limit = gw.settings.kiln_max_messages
    if len(messages) > limit:
        raise BadRequest(f"messages: {len(messages)} messages, over the limit of {limit} (KILN_MAX_MESSAGES)",
                         "messages")  # fmt: skip
    texts = [((i, *path), text) for i, m in enumerate(messages) for path, text in _texts_of_message(m, i)]
    copied = [_copy_message(m) for m in messages]
    prepared = await prepare_all(gw, [text for _, text in texts])
    for (path, _), text in zip(texts, prepared, strict=True):
        _put(copied, path, text)
    return copied


async def prepare_all(gw: Gateway, texts: list[str]) -> list[str]:
    """Each text prepared; on a worker thread when there is enough of it to hold up the event loop."""
    if sum(len(t) for t in texts) < THREAD_MASK_CHARS:
        return [gw.prepare(t) for t in texts]
    return await asyncio.to_thread(lambda: [gw.prepare(t) for t in texts])


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body("/v1/", status, message, param=param), status)


def _refuse_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise BadRequest(f"{name}: not supported by kiln (llama-server cannot honour it)", name)
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise BadRequest(f"n: an integer from 1 to {MAX_N} is required", "n")
    if n > 1 and body.get("stream"):
        raise BadRequest("n: more than one choice cannot be streamed; ask without stream", "n")


async def _prepare_body(gw: Gateway, body, call: Call, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_unsupported(body)
    if chat:
        body["messages"] = await prepare_messages(gw, body.get("messages"))
        last = body["messages"][-1].get("content")
        call.query = last if isinstance(last, str) else ""
        return body
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        body["prompt"] = call.query = (await prepare_all(gw, [prompt]))[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        body["prompt"] = await prepare_all(gw, prompt)
        call.query = body["prompt"][0]
    else:
        raise BadRequest("prompt: a non-empty string or list of strings is required", "prompt")
    return body


async def _proxy(request: Request, route: str, key: str | None, chat: bool):
    gw: Gateway = request.app.state.kiln
    try:
        body = await request.json()
    except ValueError:
        return _error(422, "the request body is not valid JSON")
    call = Call(route, key_id=key)
    try:
        body = await _prepare_body(gw, body, call, chat)
    except BadRequest as exc:
        return _error(422, exc.message, exc.param)
    call.preset, call.sent = body.get("preset") or DEFAULT, body
    try:
        preset = gw.preset(body.pop("preset", None))
    except Exception as exc:
        return _error(422, getattr(exc, "detail", str(exc)), "preset")
    for k, v in preset.sampler().items():
        body.setdefault(k, v)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = preset.max_tokens
    user = body.get("user") if isinstance(body.get("user"), str) else None
    call.sticky = user or key
    try:
        pool = await _pool_for(gw, body.get("model"), call.sticky)
    except KilnError as exc:
        return _error(404, str(exc), "model")
    served = pool or gw.deployment.active
    model_id = served.source.label if served else "kiln"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    if body.get("stream"):
        return await gw.run_stream(call, path, body, lambda text: _fallback_stream(text, model_id, chat), pool=pool)
    n = body.pop("n", 1) or 1

    async def work():
        answers = await asyncio.gather(*(gw.inference.complete(call, path, body, pool) for _ in range(n)))
        answer = merge_answers(answers)
        usage = answer.get("usage") or {}
        call.prompt_tokens = usage.get("prompt_tokens", 0)
        call.completion_tokens = usage.get("completion_tokens", 0)
        answer["model"] = answer.get("model") or model_id  # llama-server names the version that answered
        return answer

    return await gw.run_json(call, work, lambda text: JSONResponse(_fallback_answer(text, model_id, chat)), places=n)


async def _pool_for(gw: Gateway, model, user: str | None = None):
    """The pool `model` names: "canary", "production", or a version (`kiln-tiny:3` or `3`), a registered
    version that is not served started on demand (pipeline/serve/rollout.py); any other name (clients
    send their own) gets the pool the (sticky) canary draw picks. KilnError: a version not servable."""
    d = gw.deployment
    if not isinstance(model, str) or not model:
        return d.route(user)
    if model in ("canary", "production"):
        return (d.canary if model == "canary" else d.active) or d.route(user)
    name = d.active.source.name if d.active else None
    version = model.removeprefix(f"{name}:") if name else model
    if version.isdigit():
        return await d.pool_of_version(version)
    return d.route(user)


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


@router.post("/v1/embeddings")
async def embeddings(request: Request, key: str | None = Depends(_guard)):
    message = (
        "embeddings are not served: kiln serves generative models, and its llama-server replicas run "
        "without --embeddings (a causal language model's hidden states are not trained as embeddings)"
    )
    return _error(404, message, "model")
