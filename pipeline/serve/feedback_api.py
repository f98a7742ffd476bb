"""Users' judgements of served answers, and the chat page that collects them.

    POST /v1/feedback   {"trace_id", "rating": "up"|"down"|1..5, "comment"?, "preferred_answer"?,
                         "better_than"?: another trace id (a side-by-side pick)}
    GET  /playground    a chat page: pick a version (served, or any registered one: started on
                        demand) and a preset, chat (streamed), rate each answer, or ask two
                        versions at once and pick the better answer

The feedback route passes the same guard (API key, rate limit) as inference. The judgement is
stored on the trace in MLflow (pipeline/data/feedback.py); an unknown trace id is a 404, a bad body
a 422, each with one line. A trace still waiting in the writer's queue is waited for (up to
FEEDBACK_WAIT_S), so an answer can be rated as soon as it ends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import logs
from pipeline.data.feedback import TraceNotFound, log_judgement
from pipeline.serve.gateway import Gateway

log = logs.get("api")
router = APIRouter()
TRACE_ID = r"^tr-[0-9a-f]{32}$"
FEEDBACK_WAIT_S = 10.0
PAGE = Path(__file__).with_name("playground.html")


async def _guard(request: Request) -> str | None:
    return await request.app.state.kiln.guard(request)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trace_id: str = Field(..., pattern=TRACE_ID)
    rating: Literal["up", "down"] | int | None = None
    comment: str | None = Field(None, max_length=4000)
    preferred_answer: str | None = Field(None, min_length=1, max_length=16000)
    better_than: str | None = Field(None, pattern=TRACE_ID, description="the trace whose answer was worse")

    @model_validator(mode="after")
    def something_judged(self):
        if isinstance(self.rating, int) and not 1 <= self.rating <= 5:
            raise ValueError(f"rating {self.rating}: 'up', 'down' or 1 to 5")
        if self.rating is None and self.preferred_answer is None and self.better_than is None:
            raise ValueError("give a rating, a preferred_answer or better_than")
        if self.better_than == self.trace_id:
            raise ValueError("better_than names the same trace")
        return self


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"].removeprefix("Value error, ")


@router.post("/v1/feedback")
async def feedback(request: Request, key: str | None = Depends(_guard)):
    gw: Gateway = request.app.state.kiln
    try:
        req = FeedbackRequest.model_validate(await request.json())
    except ValueError as exc:  # ValidationError is one; so is a body that is not JSON
        detail = _one_line(exc) if isinstance(exc, ValidationError) else "the request body is not valid JSON"
        return JSONResponse({"detail": detail}, 422)
    if gw.tracing.uri is None:
        return JSONResponse({"detail": "answers are not traced here (no tracking store): nothing to rate"}, 503)
    for trace_id in filter(None, (req.trace_id, req.better_than)):
        if not await asyncio.to_thread(gw.tracing.wait_written, trace_id, FEEDBACK_WAIT_S):
            # served here and still queued (a slow store): not unknown, so not a 404; ask again later
            detail = f"trace {trace_id} is still being written; retry"
            return JSONResponse({"detail": detail}, 503, headers={"Retry-After": "5"})
    try:
        ids = await asyncio.to_thread(
            log_judgement, gw.tracing.uri, req.trace_id, key or "anonymous", req.rating, req.comment,
            req.preferred_answer, req.better_than,
        )  # fmt: skip
    except TraceNotFound as exc:
        return JSONResponse({"detail": str(exc)}, 404)
    log.info("feedback", trace_id=req.trace_id, key_id=key, rating=req.rating, pairwise=req.better_than is not None)
    return {"trace_id": req.trace_id, "assessments": ids}


@router.get("/playground", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
