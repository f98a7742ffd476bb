"""The canary's routes: `GET /canary` (status), `GET /canary/analysis` (the analysis now, nothing done),
`POST /admin/canary/promote` and `POST /admin/canary/abort` (admin key; what `kiln canary` calls).
The watch itself is pipeline/serve/canary.py; the statistics pipeline/release/canary.py.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pipeline import logs
from pipeline.serve.guards import Rejected

log = logs.get("api")
router = APIRouter()


async def _guard(request: Request) -> str | None:
    return await request.app.state.guard(request)


@router.get("/canary")
async def canary_status(request: Request, key: str | None = Depends(_guard)):
    return request.app.state.kiln.canary.status()


@router.get("/canary/analysis")
async def canary_analysis(request: Request, key: str | None = Depends(_guard)):
    analysis = request.app.state.kiln.canary.analysis()
    if analysis is None:
        return JSONResponse({"detail": "no canary is served"}, 404)
    return analysis


async def _admin(request: Request, act):
    gw = request.app.state.kiln
    try:
        who = gw.auth.check_admin(request.headers)
    except Rejected as exc:
        return JSONResponse({"detail": exc.detail}, exc.status)
    try:
        entry = await act(gw.canary)
    except Exception as exc:  # the registry refused (files changed, unreachable): the canary stays as it was
        log.warning("canary", route=request.url.path, status=503, key_id=who, error=str(exc))
        return JSONResponse({"detail": f"canary decision failed: {exc}"}, 503)
    if entry.get("decision") is None:
        return JSONResponse({"detail": entry["reason"]}, 409)
    log.info("canary", route=request.url.path, status=200, key_id=who, result=entry)
    return entry


@router.post("/admin/canary/promote")
async def canary_promote(request: Request):
    return await _admin(request, lambda watch: watch.promote(by="manual"))


@router.post("/admin/canary/abort")
async def canary_abort(request: Request):
    reason = request.query_params.get("reason") or "aborted by hand"
    return await _admin(request, lambda watch: watch.abort(reason, by="manual"))
