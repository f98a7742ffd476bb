"""One request's way through the pool: input preparation, routing, retry, timeout, accounting.

- Input: Unicode NFC, line endings and trailing spaces normalised, runs of blank lines collapsed
  (indentation is kept: the model writes code), cut to LLM_INPUT_MAX_LENGTH characters plus a
  margin (so masking's work is bounded), PII masked with kiln's masker, then cut to the limit: the
  final cut comes after masking so it never leaves half an address unmasked.
- Routing: the deployment's pool (production or canary, sticky per user), its least-busy ready replica.
- Retry: a request that failed before its first token (connection refused or reset, a 5xx, an
  empty stream, no first token within KILN_FIRST_TOKEN_TIMEOUT_SEC: a hung replica, which leaves
  the pool until its health check answers again) is sent once more to another replica; after the
  first token it is not, since the client already has part of the answer.
- Timeout: the whole request, queue wait included, has INFERENCE_TIMEOUT_SEC. Closing the
  upstream connection is what cancels the generation in llama-server.
- Accounting: every request ends in one `Call.finish`: metrics and one JSON log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from pipeline.data.pii import mask_pii
from pipeline.serve.edge import mark_logged
from pipeline.serve.metrics import Metrics
from pipeline.serve.replicas import READY, STOPPED, Pool, Replica
from pipeline.serve.rollout import Deployment

access_log = logging.getLogger("kiln.serve.access")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# characters kept past the limit before masking: longer than any address or number the masker finds
MASK_MARGIN = 256


def prepare_text(text: str, max_chars: int) -> str:
    """What the model sees of a user's text: normalised, cut near `max_chars`, PII masked, cut to `max_chars`."""
    text = text[: 2 * (max_chars + MASK_MARGIN)]  # normalising can only shorten it much
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("\n", text)).strip()[: max_chars + MASK_MARGIN]
    masked, _ = mask_pii(text)
    return masked[:max_chars]


class InferenceError(Exception):
    """A request that ran and failed: `status` 400 (the replica refused the input), 503 or 500."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class _Retryable(Exception):
    """Failed before the first token on one replica; another may succeed."""


@dataclass
class Call:
    """One request, from arrival to its log line."""

    route: str
    key_id: str | None = None
    user: str | None = None  # the caller's own user id (OpenAI's `user`): the canary draw sticks to it
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started: float = field(default_factory=time.monotonic)
    query: str = ""
    queue_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica: str | None = None
    version: str | None = None
    status: int = 200
    retried: bool = False
    error: str | None = None
    preset: str | None = None  # the preset the route used, and the body it sent upstream: for the trace
    sent: dict | None = None
    sticky: str | None = None  # who the request is for (user, else key): canary routing stays with them
    streamed: bool = False
    _done: bool = False

    def finish(self, metrics: Metrics, status: int | None = None) -> None:
        if self._done:
            return
        self._done = True
        if status is not None:
            self.status = status
        total = time.monotonic() - self.started
        version = self.version or "none"
        metrics.latency.labels(self.route, version).observe(total)
        if self.ttft_s is not None:
            metrics.ttft.labels(self.route, version).observe(self.ttft_s)
        if self.status == 200:
            metrics.prompt_tokens.labels(version).inc(self.prompt_tokens)
            metrics.completion_tokens.labels(version).inc(self.completion_tokens)
            gen_s = total - (self.ttft_s or 0.0)
            if self.completion_tokens > 1 and gen_s > 0:
                metrics.tokens_per_second.labels(version).observe((self.completion_tokens - 1) / gen_s)
        line = {
            "request_id": self.request_id, "route": self.route, "status": self.status,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "queue_ms": round(self.queue_s * 1000, 1),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1),
            "total_ms": round(total * 1000, 1), "replica": self.replica, "version": self.version,
            "key_id": self.key_id, "retried": self.retried, "query": self.query[:50],
        }  # fmt: skip
        if self.error:
            line["error"] = self.error
        metrics.outcomes.labels(self.route, outcome(self.status), str(self.status)).inc()
        mark_logged()
        access_log.info(json.dumps(line, ensure_ascii=False))


def outcome(status: int) -> str:
    if status == 200:
        return "completed"
    if status == 499:
        return "client_disconnected"
    return "rejected" if status in (401, 403, 413, 422, 429) else "failed"


def usage_from_tail(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last event of a llama-server stream that reports them."""
    for raw in reversed(tail.split(b"\n")):
        if not raw.startswith(b"data: {") or (b'"timings"' not in raw and b'"usage"' not in raw):
            continue
        try:
            event = json.loads(raw[6:])
        except ValueError:
            continue  # the tail cut this event; an earlier one may still be whole
        if event.get("usage"):
            return event["usage"].get("prompt_tokens", 0), event["usage"].get("completion_tokens", 0)
        timings = event.get("timings") or {}
        return timings.get("prompt_n", 0), timings.get("predicted_n", 0)
    return None


class Inference:
    def __init__(self, deployment: Deployment, metrics: Metrics, timeout_s: float, first_token_s: float = 30.0):
        self.deployment, self.metrics, self.timeout_s = deployment, metrics, timeout_s
        self.first_token_s = first_token_s

    def deadline(self, call: Call) -> float:
        return call.started + self.timeout_s

    def timeout_error(self) -> InferenceError:
        return InferenceError(503, f"inference timeout ({self.timeout_s:g} s)")

    def _pick(self, pool: Pool | None, tried: list[Replica]) -> tuple[Pool, Replica]:
        for candidate in (pool, self.deployment.active):
            replica = candidate.pick(tuple(tried)) if candidate else None
            if replica is not None:
                return candidate, replica
        if tried and tried[-1].state == READY and tried[-1].alive():  # a stale connection, not a dead replica
            return pool or self.deployment.active, tried[-1]
        if not tried:
            raise InferenceError(503, "no replica is ready (the model is loading or every replica failed)")
        raise InferenceError(503, f"replica {tried[-1].name} failed and no other replica is ready")

    async def _attempts(self, call: Call, attempt, pool: Pool | None):
        """Run `attempt(replica)` on a replica, and once more on another if it raised _Retryable."""
        pool, tried, last = pool or self.deployment.route(call.sticky), [], None
        for _ in range(2):
            pool, replica = self._pick(pool, tried)
            tried.append(replica)
            call.replica, call.version = replica.name, replica.source.version
            replica.in_flight += 1
            try:
                try:
                    async with asyncio.timeout(self.first_token_s):
                        return await attempt(replica)
                except TimeoutError:  # this attempt's own deadline, not the request's (that one cancels)
                    self.metrics.hung.labels(replica.name).inc()
                    pool.report_hung(replica)
                    raise _Retryable(f"{replica.name} sent no first token in {self.first_token_s:g} s") from None
            except _Retryable as exc:
                last = exc
                pool.report_failure(replica)
                call.retried = True
                self.metrics.retries.labels(replica.source.version).inc()
            except aiohttp.ClientError as exc:  # connection refused or reset before any answer
                last = exc
                pool.report_failure(replica, exc)
                call.retried = True
                self.metrics.retries.labels(replica.source.version).inc()
            finally:
                replica.in_flight -= 1
        raise InferenceError(503, f"replica failed: {last}")

    async def complete(self, call: Call, path: str, body: dict, pool: Pool | None = None) -> dict:
        """A non-streaming answer from llama-server's `path`, gathered from its stream: llama-server
        notices a closed connection at once while streaming but not while it computes a whole answer,
        so only a stream lets a timeout cancel the generation."""
        replica, resp, first = await self.open_stream(call, path, {**body, "stream": True}, pool)
        data = first
        try:
            async with asyncio.timeout_at(loop_deadline(self.deadline(call))):
                async for chunk in resp.content.iter_any():
                    data += chunk
        except TimeoutError:
            raise self.timeout_error() from None
        except aiohttp.ClientError as exc:
            raise InferenceError(503, f"replica {replica.name} failed mid-answer: {exc}") from None
        finally:
            replica.in_flight -= 1
            resp.close()
        events = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
        failed = next((e["error"] for e in events if "error" in e), None)
        if failed is not None:
            code = failed.get("code", 500) if isinstance(failed, dict) else 500
            message = failed.get("message", failed) if isinstance(failed, dict) else failed
            raise InferenceError(400 if code < 500 else 503, f"the model failed the request: {message}")
        if not _finished(data):
            raise InferenceError(503, f"replica {replica.name} ended the answer early")
        return assemble(path, events)

    async def open_stream(
        self, call: Call, path: str, body: dict, pool: Pool | None = None
    ) -> tuple[Replica, aiohttp.ClientResponse, bytes]:
        """Start a streaming request and read up to its first bytes (the first token's event).
        The caller owns the replica's in-flight count and the response from here on."""
        holder: dict = {}

        async def attempt(replica: Replica):
            resp = await self.deployment.session.post(replica.url + path, json=body, headers=replica.headers)
            try:
                if resp.status >= 500:
                    raise _Retryable(f"{replica.name} answered {resp.status}: {(await resp.read())[:200]!r}")
                if resp.status != 200:
                    raise InferenceError(400, f"the model refused the request: {_upstream_message(await resp.read())}")
                first = await resp.content.readany()
                if not first:
                    raise _Retryable(f"{replica.name} closed the stream before the first token")
            except BaseException:
                resp.close()
                raise
            replica.in_flight += 1  # held past _attempts' own count, released by the relay
            holder["replica"] = replica
            return resp, first

        try:
            async with asyncio.timeout_at(loop_deadline(self.deadline(call))):
                resp, first = await self._attempts(call, attempt, pool)
        except TimeoutError:
            raise self.timeout_error() from None
        call.ttft_s = time.monotonic() - call.started
        return holder["replica"], resp, first

    async def relay(
        self, call: Call, replica: Replica, resp: aiohttp.ClientResponse, first: bytes, on_end=None
    ) -> AsyncIterator[bytes]:
        """llama-server's stream as it arrives, bytes unchanged. At the deadline the upstream is closed
        (which cancels the generation) and one error event ends the stream; a client too slow to take
        what was sent (the send is blocked) is cut off there too, so it cannot hold its place longer."""
        expired, sending, ended = [], [False], []
        consumer = asyncio.current_task()
        tail = first[-8192:]

        def end(status: int) -> None:
            if not ended:
                ended.append(status)
                self._end_stream(call, replica, resp, timer, tail, status, on_end)

        def expire() -> None:
            expired.append(True)
            resp.close()
            if sending[0] and consumer is not None:  # blocked on a client that does not read
                call.error = self.timeout_error().detail + " (the client did not read the stream)"
                end(503)
                consumer.cancel()

        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop_deadline(self.deadline(call)), expire)
        gaps = self.metrics.inter_token.labels(call.version or "none")
        last = loop.time()
        pending = b""  # an event not yet complete: only whole events go out, so a cut ends cleanly
        try:
            whole, pending = split_events(first)
            if whole:
                sending[0] = True
                yield whole
                sending[0] = False
            async for chunk in resp.content.iter_any():
                now = loop.time()
                gaps.observe(now - last)
                last = now
                tail = (tail + chunk)[-8192:]
                whole, pending = split_events(pending + chunk)
                if whole:
                    sending[0] = True
                    yield whole
                    sending[0] = False
        except (TimeoutError, aiohttp.ClientError) as exc:
            call.error = str(exc) or type(exc).__name__
        except BaseException:  # the client went away: closing the upstream stops the generation
            call.error = call.error or "client disconnected"
            end(499)
            raise
        if expired:
            status, call.error = 503, self.timeout_error().detail
        elif not _finished(tail):
            retired = replica.state == STOPPED
            status, call.error = 503, _early_end(replica) if retired else (call.error or _early_end(replica))
        else:
            status = 200
        end(status)
        if status != 200:
            yield sse_event({"error": {"message": call.error, "code": status}})
        elif pending:
            yield pending

    def _end_stream(self, call: Call, replica: Replica, resp, timer, tail: bytes, status: int, on_end) -> None:
        if on_end is not None:
            on_end()
        timer.cancel()
        replica.in_flight -= 1
        resp.close()
        usage = usage_from_tail(tail)
        if usage:
            call.prompt_tokens, call.completion_tokens = usage
        call.finish(self.metrics, status)


def assemble(path: str, events: list[dict]) -> dict:
    """One non-streaming answer from a llama-server stream's events, in the shape llama-server's own
    non-streamed answer has: every field of every choice kept (text or message content, reasoning,
    tool calls, logprobs), the top-level fields (id, created, model, usage, timings, ...) of the last event."""
    if path == "/completion":  # native: the last event carries the counts and timings
        return {**events[-1], "content": "".join(e.get("content", "") for e in events)}
    chat = path.endswith("/chat/completions")
    choices: dict[int, dict] = {}
    top: dict = {}
    for event in events:
        top.update({k: v for k, v in event.items() if k != "choices" and v is not None})
        for choice in event.get("choices", []):
            merged = choices.setdefault(choice.get("index", 0), {"index": choice.get("index", 0)})
            _merge_choice(merged, choice, chat)
    out = []
    for i in sorted(choices):
        choice = choices[i]
        if chat:
            message = choice.setdefault("message", {"role": "assistant", "content": None})
            message.setdefault("role", "assistant")
            if message.get("content") is None and not message.get("tool_calls"):
                message["content"] = ""
        else:
            choice.setdefault("text", "")
            choice.setdefault("logprobs", None)  # llama-server's text completion says null; its chat answer omits it
        choice.setdefault("finish_reason", None)
        out.append(choice)
    usage = top.get("usage")
    if usage is None and top.get("timings"):
        prompt, completion = top["timings"].get("prompt_n", 0), top["timings"].get("predicted_n", 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if usage is not None and "prompt_tokens_details" not in usage and "cache_n" in (top.get("timings") or {}):
        # llama-server's non-streamed usage says how much of the prompt came from its cache; its stream's does not
        usage = {**usage, "prompt_tokens_details": {"cached_tokens": top["timings"]["cache_n"]}}
    return {**top, "object": "chat.completion" if chat else "text_completion", "choices": out, "usage": usage}


def _merge_choice(merged: dict, choice: dict, chat: bool) -> None:
    for key, value in choice.items():
        if key == "index" or value is None:
            continue
        if key == "delta" and chat:
            _merge_delta(merged.setdefault("message", {"role": "assistant", "content": None}), value)
        elif key == "text" and not chat:
            merged["text"] = merged.get("text", "") + value
        elif key == "logprobs":
            merged["logprobs"] = _merge_lists(merged.get("logprobs"), value)
        else:
            merged[key] = value


def _merge_delta(message: dict, delta: dict) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls":
            calls = message.setdefault("tool_calls", [])
            for piece in value:
                i = piece.get("index", len(calls))
                while len(calls) <= i:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                _merge_tool_call(calls[i], piece)
        elif isinstance(value, str) and key != "role":
            message[key] = (message.get(key) or "") + value
        else:
            message[key] = value


def _merge_tool_call(call: dict, piece: dict) -> None:
    for key, value in piece.items():
        if key == "index" or value is None:
            continue
        if key == "function":
            for name in ("name", "arguments"):
                call["function"][name] += value.get(name) or ""
        else:
            call[key] = value


def _merge_lists(acc, value):
    """Streamed logprobs pieces into one: lists concatenated key by key (OpenAI's and llama-server's shapes)."""
    if acc is None:
        return (
            {k: list(v) if isinstance(v, list) else v for k, v in value.items()} if isinstance(value, dict) else value
        )
    if isinstance(acc, dict) and isinstance(value, dict):
        for k, v in value.items():
            acc[k] = acc.get(k, []) + v if isinstance(v, list) and isinstance(acc.get(k, []), list) else v
    return acc


def merge_answers(answers: list[dict]) -> dict:
    """`n` answers to the same request as one with n choices (index 0..n-1) and their usage summed."""
    if len(answers) == 1:
        return answers[0]
    merged = {**answers[0], "choices": []}
    for i, answer in enumerate(answers):
        merged["choices"].extend({**c, "index": i} for c in answer.get("choices", []))
    usages = [a.get("usage") or {} for a in answers]
    merged["usage"] = {
        "prompt_tokens": usages[0].get("prompt_tokens", 0),
        "completion_tokens": sum(u.get("completion_tokens", 0) for u in usages),
    }
    merged["usage"]["total_tokens"] = merged["usage"]["prompt_tokens"] + merged["usage"]["completion_tokens"]
    return merged


def _early_end(replica: Replica) -> str:
    if replica.state == STOPPED:  # a swap's drain time ran out while this stream was still going
        return f"version {replica.source.version} was retired (KILN_DRAIN_SEC ran out) before the answer ended"
    return f"replica {replica.name} ended the stream early"


def _finished(tail: bytes) -> bool:
    """Whether a stream reached its end event: OpenAI's [DONE], llama-server's native stop."""
    return b"data: [DONE]" in tail or b'"stop":true' in tail or b'"stop": true' in tail


def split_events(data: bytes) -> tuple[bytes, bytes]:
    """`data` cut after its last complete server-sent event: (whole events, the incomplete rest)."""
    end = data.rfind(b"\n\n")
    return (data[: end + 2], data[end + 2 :]) if end >= 0 else (b"", data)


def sse_event(obj: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _upstream_message(data: bytes) -> str:
    try:
        err = json.loads(data).get("error", {})
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")


def loop_deadline(monotonic_deadline: float) -> float:
    """asyncio's clock is time.monotonic on every platform kiln runs on; keep the conversion in one place."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())
