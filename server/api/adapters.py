"""Adapter management routes.

  POST   /v1/adapters           multipart form: name, file          -> 201 adapter object
  PUT    /v1/adapters/{name}    raw body: the .safetensors bytes    -> 201 adapter object
  GET    /v1/adapters                                               -> {"object": "list", "data": [...]}
  GET    /v1/adapters/{name}                                        -> adapter object
  DELETE /v1/adapters/{name}                                        -> {"name", "deleted": true, ...}

Adapter object: {object, name, tenant, version, sha256, kind, granularity, size_bytes, created_at,
base_fingerprint}. Names: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit.

Every request acts on the caller's tenant. An admin caller may add `?tenant=NAME` to act on another
tenant (and GET /v1/adapters without it lists every tenant). Another tenant's adapter is a 404, not
a 403, so names do not leak. The whole file is read and validated before anything is stored; an
upload cut off mid-body stores nothing. Errors are in OpenAI's shape; validation errors name the first
offending tensor or field (also in error.param).

Uses app.state.registry (scaleserve.adapters.registry.AdapterRegistry) and app.state.settings.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from scaleserve.adapters.format import AdapterError
from scaleserve.adapters.registry import SHARED_TENANT, AdapterNotFound, AdapterTooLarge, TenantLimitExceeded
from scaleserve.adapters.store import valid_name

from ..auth import OpenAIError, OpenAIErrorRoute, Tenant, get_tenant

log = logging.getLogger("scaleserve.api.adapters")

router = APIRouter(tags=["adapters"], route_class=OpenAIErrorRoute)

MULTIPART_OVERHEAD = 64 << 10  # form boundaries and the name field, on top of the file itself


def _registry(request: Request):
    reg = getattr(request.app.state, "registry", None)
    if reg is None:
        raise OpenAIError(503, "the adapter registry is not ready", type="server_error", code="not_ready")
    return reg


def _target(tenant: Tenant, tenant_param: str | None) -> str:
    """The tenant whose adapters a request acts on."""
    if tenant_param is None or tenant_param == tenant.name:
        return tenant.name
    if not tenant.is_admin:
        # a non-admin naming another tenant learns nothing: same answer as an unknown adapter
        raise OpenAIError(404, "adapter not found", code="adapter_not_found")
    if not valid_name(tenant_param):
        raise OpenAIError(400, f"tenant {tenant_param!r} is invalid", param="tenant", code="invalid_value")
    return tenant_param


def _not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"adapter {name!r} not found", param="name", code="adapter_not_found")


def _max_bytes(request: Request) -> int:
    settings = getattr(request.app.state, "settings", None)
    reg = getattr(request.app.state, "registry", None)
    if settings is not None:
        return settings.max_adapter_bytes
    return reg.max_adapter_bytes if reg is not None else 1 << 30


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"adapter upload exceeds the {limit}-byte limit (SCALESERVE_MAX_ADAPTER_BYTES)",
                       param="file", code="adapter_too_large")


def _check_length_header(request: Request, limit: int) -> None:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise OpenAIError(400, "invalid Content-Length", code="invalid_request") from None
        if n > limit:
            raise _too_large(limit)


async def _store(request: Request, tenant: str, name: str, data: bytes) -> JSONResponse:
    reg = _registry(request)
    try:
        av = await run_in_threadpool(reg.upload, tenant, name, data)
    except AdapterTooLarge as e:
        raise OpenAIError(413, str(e), param=e.field, code="adapter_too_large") from None
    except AdapterError as e:
        msg = str(e) if e.field is None or e.field in str(e) else f"{e.field}: {e}"  # always name the field
        raise OpenAIError(400, msg, param=e.field, code="invalid_adapter") from None
    except TenantLimitExceeded as e:
        raise OpenAIError(429, str(e), type="rate_limit_error", code="adapter_quota_exceeded") from None
    log.info("adapter %s/%s v%d stored (%s, %d bytes)", tenant, name, av.version, av.kind, av.size_bytes)
    return JSONResponse(av.describe(), status_code=201)


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(request: Request, tenant: Tenant = Depends(get_tenant)):
    """Multipart upload: form fields `name` and `file` (the .safetensors bytes)."""
    target = _target(tenant, request.query_params.get("tenant"))
    limit = _max_bytes(request)
    _check_length_header(request, limit + MULTIPART_OVERHEAD)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError(400, "POST /v1/adapters takes multipart/form-data with fields 'name' and 'file' "
                               "(or PUT /v1/adapters/{name} with the raw file)", param="file", code="invalid_request")
    try:
        async with request.form(max_files=1, max_fields=8) as form:
            name = form.get("name")
            upload = form.get("file")
            if not isinstance(name, str) or not name:
                raise OpenAIError(400, "form field 'name' is missing", param="name", code="invalid_request")
            if upload is None or isinstance(upload, str):
                raise OpenAIError(400, "form field 'file' is missing (send it as a file part)", param="file",
                                  code="invalid_request")
            data = await upload.read(limit + 1)
    except ClientDisconnect:
        log.info("adapter upload cut off by the client; nothing stored")
        return JSONResponse({}, status_code=400)
    except OpenAIError:
        raise
    except Exception as e:  # multipart parser errors
        raise OpenAIError(400, f"malformed multipart body: {e}", param="file", code="invalid_request") from None
    if len(data) > limit:
        raise _too_large(limit)
    return await _store(request, target, name, data)


@router.put("/v1/adapters/{name}", status_code=201)
async def put_adapter(name: str, request: Request, tenant: Tenant = Depends(get_tenant)):
    """Raw upload: the request body is the .safetensors file."""
    target = _target(tenant, request.query_params.get("tenant"))
    limit = _max_bytes(request)
    _check_length_header(request, limit)
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        log.info("adapter upload of %s/%s cut off by the client after %d bytes; nothing stored",
                 target, name, len(buf))
        return JSONResponse({}, status_code=400)
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) != len(buf):
        raise OpenAIError(400, f"body has {len(buf)} bytes, Content-Length said {cl}; nothing stored", param="file",
                          code="invalid_request")
    return await _store(request, target, name, bytes(buf))


@router.get("/v1/adapters")
async def list_adapters(request: Request, tenant: Tenant = Depends(get_tenant)):
    reg = _registry(request)
    param = request.query_params.get("tenant")
    if tenant.is_admin and param is None:
        items = reg.list(None)
    else:
        target = _target(tenant, param)
        items = [av for av in reg.list(target) if av.tenant in (target, SHARED_TENANT)]
    return {"object": "list", "data": [av.describe() for av in items]}


async def _on_adapter(request: Request, tenant: Tenant, name: str, op: str):
    """registry.<op>(target tenant, name) off the event loop -> (target, result); 404 when the caller
    can't see such an adapter (a bad name included: names never leak across tenants)."""
    target = _target(tenant, request.query_params.get("tenant"))
    if not valid_name(name):
        raise _not_found(name)
    try:
        return target, await run_in_threadpool(getattr(_registry(request), op), target, name)
    except AdapterNotFound:
        raise _not_found(name) from None


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request, tenant: Tenant = Depends(get_tenant)):
    _, av = await _on_adapter(request, tenant, name, "resolve")
    return av.describe()


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request, tenant: Tenant = Depends(get_tenant)):
    target, version = await _on_adapter(request, tenant, name, "remove")
    log.info("adapter %s/%s deleted (was v%d)", target, name, version)
    return {"object": "adapter.deleted", "name": name, "tenant": target, "version": version, "deleted": True}
