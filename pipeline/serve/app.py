"""The FastAPI app of `kiln serve`: the shared Gateway, kiln's own routes (kiln_api.py), the
OpenAI-compatible ones (openai_api.py), CORS and the per-route response counter. The routers import the
gateway, and this module imports both, so the imports run one way.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipeline.serve.canary_api import router as canary_router
from pipeline.serve.edge import ClientWatch, TrustedProxies, error_body
from pipeline.serve.feedback_api import router as feedback_router
from pipeline.serve.gateway import Gateway
from pipeline.serve.kiln_api import router as kiln_router
from pipeline.serve.metrics import Metrics
from pipeline.serve.openai_api import router as openai_router
from pipeline.serve.rollout import Deployment
from pipeline.serve.tracing import TRACE_HEADER


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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as one line naming the field: ("query: String should have ...", "query")."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    return (f"{field}: {errors[0].get('msg')}" if field else str(errors[0].get("msg"))), field


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal in the route's own error shape (OpenAI's on /v1, kiln's elsewhere)."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        body = error_body(request.url.path, exc.status_code, str(exc.detail))
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        body = error_body(request.url.path, 422, message, param=field)
        if "detail" in body and not request.url.path.startswith("/v1/"):
            body["detail"] = jsonable_encoder(exc.errors())  # kiln's routes keep FastAPI's list, as before
        return JSONResponse(body, 422)


def create_app(
    settings, deployment: Deployment, metrics: Metrics, on_startup_failure=None, canary_actions=None
) -> FastAPI:
    gw = Gateway(settings, deployment, metrics, canary_actions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start():
            try:
                await deployment.start()
            except Exception:  # deployment.error says why; /health stays 503
                if on_startup_failure:
                    on_startup_failure()
                return
            gw.canary.start()  # --canary-auto: the analysis looks every KILN_CANARY_INTERVAL_SEC

        task = asyncio.create_task(start())  # /health answers 503 while the replicas load
        yield
        task.cancel()
        gw.canary.stop()
        await deployment.stop()
        await asyncio.to_thread(gw.tracing.close)  # what is queued is written before the process ends

    app = FastAPI(title="kiln serve", lifespan=lifespan)
    app.state.kiln = gw
    app.state.guard = gw.guard

    app.include_router(kiln_router)
    app.include_router(openai_router)
    app.include_router(canary_router)
    app.include_router(feedback_router)  # POST /v1/feedback, GET /playground
    add_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After", TRACE_HEADER],
        )  # fmt: skip
    app.add_middleware(
        ClientWatch, max_body=settings.kiln_max_body_bytes, proxies=TrustedProxies(settings.kiln_trusted_proxies)
    )
    routers = (kiln_router, openai_router, canary_router, feedback_router)
    routes = {r.path for router in routers for r in router.routes if hasattr(r, "path")}
    app.add_middleware(RouteCounter, metrics=metrics, routes=routes)
    return app
