"""The gateway's edge: what every HTTP request meets before and around its route.

- Error bodies: a `/v1/*` route answers OpenAI's `{"error": {"message", "type", "param", "code"}}` (so
  the `openai` client raises its typed exceptions), with kiln's `"detail"` beside it; kiln's own routes
  answer `{"detail": ...}`.
- `ClientWatch` (pure ASGI middleware): a request body over `KILN_MAX_BODY_BYTES` is a 413 before
  anything parses it, and a client that goes away cancels its request wherever it is (queued for
  admission, waiting for its first token, computing a whole answer, or relaying a stream), so its
  place and its generation are given back at once instead of when the model would have finished.
- `client_address`: the peer address, or the `X-Forwarded-For` hop a trusted proxy
  (`KILN_TRUSTED_PROXIES`) names; a header from anyone else is ignored, so it cannot buy a fresh
  rate-limit bucket.
- `request_record`: the request's mutable record, shared with the route, so the edge writes one access
  log line for a request that no route logged (401, 403, 404, 413, 422 and rate-limit 429s).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import json
import logging

access_log = logging.getLogger("kiln.serve.access")

OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
}  # fmt: skip
OPENAI_CODES = {
    401: "invalid_api_key", 403: "forbidden", 404: "not_found", 413: "request_too_large", 422: "invalid_value",
    429: "rate_limit_exceeded", 499: "client_closed_request", 500: "internal_error", 503: "service_unavailable",
}  # fmt: skip

PROBES = {"/health", "/metrics"}
# the request's record: {"route", "logged", "status", "client", "key_id"}; routes mark what they logged
request_record: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kiln_request_record", default=None)


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The body of an error answer on `path`: OpenAI's shape on /v1 routes (with "detail"), else kiln's."""
    if not is_openai(path):
        return {"detail": message}
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}
    return {"error": error, "detail": message}


def mark_logged() -> None:
    record = request_record.get()
    if record is not None:
        record["logged"] = True


def _networks(spec: str) -> list:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


class TrustedProxies:
    """Addresses (or CIDR ranges) whose `X-Forwarded-For` names the real client."""

    def __init__(self, spec: str) -> None:
        self.networks = _networks(spec)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client: the peer, or the right-most untrusted hop of X-Forwarded-For when the peer is trusted."""
        peer = peer or "unknown"
        if not forwarded_for or not self.networks or not self.trusts(peer):
            return peer
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            if not self.trusts(hop):
                return hop
        return peer


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class ClientWatch:
    """Body limit, cancel on disconnect, and the access line for requests no route logged."""

    def __init__(self, app, max_body: int, proxies: TrustedProxies) -> None:
        self.app, self.max_body, self.proxies = app, max_body, proxies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        peer = scope["client"][0] if scope.get("client") else None
        client = self.proxies.client(peer, _header(scope, b"x-forwarded-for"))
        scope.setdefault("state", {})["client_address"] = client
        record = {"route": scope["path"], "logged": False, "status": None, "client": client, "key_id": None}
        token = request_record.set(record)
        try:
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                return await self._too_large(scope, send, record)
            await self._run(scope, receive, send, record)
        finally:
            request_record.reset(token)
            probe = scope["path"] in PROBES  # a load balancer's 503 every second while loading is not news
            if not record["logged"] and not probe and record["status"] is not None and record["status"] >= 400:
                line = {"route": scope["path"], "status": record["status"], "client": client,
                        "key_id": record["key_id"], "error": record.get("error")}  # fmt: skip
                access_log.info(json.dumps(line, ensure_ascii=False))

    async def _too_large(self, scope, send, record) -> None:
        message = f"request body over {self.max_body} bytes (KILN_MAX_BODY_BYTES)"
        record["status"], record["error"] = 413, message
        body = json.dumps(error_body(scope["path"], 413, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _run(self, scope, receive, send, record) -> None:
        # the whole body first (the routes read it whole anyway): a body that grows past the limit without
        # a Content-Length is refused here too, and from then on the next message can only be the disconnect
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                record["status"], record["error"] = 499, "client disconnected"
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await self._too_large(scope, send, record)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        state = {"replayed": False, "complete": False}
        app_task: asyncio.Task | None = None

        async def watch() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["complete"] and app_task is not None:
                app_task.cancel()  # the client is gone: free its place and stop its generation now
            return message

        watcher = asyncio.create_task(watch())

        async def watched_receive():
            if not state["replayed"]:
                state["replayed"] = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await asyncio.shield(watcher)

        async def watched_send(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        app_task = asyncio.create_task(self.app(scope, watched_receive, watched_send))
        try:
            await app_task
        except asyncio.CancelledError:
            if not app_task.cancelled() or _current_cancelling():
                app_task.cancel()
                raise
            if record["status"] is None:  # the client left before an answer: nobody to answer
                record["status"], record["error"] = 499, "client disconnected"
        finally:
            if not watcher.done():
                watcher.cancel()


def _current_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())
