"""GET /health (alive), GET /ready (loaded, warmed up, not draining), GET /metrics (prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(request: Request):
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    st = request.app.state
    ok = bool(getattr(st, "ready", False)) and not getattr(st, "draining", False)
    body = {"ready": ok, "draining": bool(getattr(st, "draining", False))}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request):
    m = getattr(request.app.state, "metrics", None)
    if m is None:
        return Response(b"", media_type="text/plain")
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:  # gauges are set every step; refresh them for an idle engine too
        m.requests_waiting.set(engine.num_waiting)
        m.requests_running.set(engine.num_running)
        m.kv_cache_usage.set(engine.kv.allocator.usage())
    data, ctype = m.exposition()
    return Response(data, media_type=ctype)
