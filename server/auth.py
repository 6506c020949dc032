"""API keys -> tenants, and OpenAI-shaped HTTP errors.

Keys come from settings.api_keys ('key=tenant,key2=tenant2', e.g. from a Kubernetes Secret as an
environment variable) and/or settings.api_keys_file (one 'key=tenant' per line, '#' comments; a
mounted Secret). Only the sha256 of each key is kept in memory; a presented key is hashed and
compared against every stored hash with hmac.compare_digest, without stopping at a match, so the
time taken does not depend on which key (or how much of one) matched.

The tenant named ADMIN_TENANT ("admin") manages every tenant's adapters. With no keys configured,
auth is off: every caller is the tenant "default" with admin rights, and configure() logs a loud
warning at start.

Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}. Routers built with
`route_class=OpenAIErrorRoute` turn OpenAIError (raised by handlers or by dependencies such as
get_tenant) into that shape themselves, without any app-level exception handler.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from scaleserve.adapters.store import NAME_RULE, valid_name

from .api.common import note_error

log = logging.getLogger("scaleserve.auth")

ADMIN_TENANT = "admin"


@dataclass(frozen=True)
class Tenant:
    name: str
    is_admin: bool = False


DEFAULT_TENANT = Tenant("default", is_admin=True)


# --- errors ----------------------------------------------------------------------------------------


class OpenAIError(HTTPException):
    """An HTTP error rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(status_code, message, headers)
        self.message, self.type, self.code, self.param = message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


async def openai_error_handler(request: Request, exc: OpenAIError) -> JSONResponse:
    """For app.add_exception_handler(OpenAIError, openai_error_handler) (in create_app)."""
    return exc.response()


class OpenAIErrorRoute(APIRoute):
    """An APIRoute whose handler (dependencies included) renders OpenAIError itself (and counts it in the
    app's metrics, if it has any)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except OpenAIError as e:  # counted and logged as the app-level handlers do the others
                note_error(request, e.code or e.type, e.status_code, e.message)
                return e.response()

        return route


# --- keys ------------------------------------------------------------------------------------------


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, source: str = "api keys") -> list[tuple[str, str]]:
    """'key=tenant' entries separated by newlines or commas; blank lines and '#' comments ignored."""
    out = []
    for lineno, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, tenant = line.rpartition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise ValueError(f"{source}: entry {lineno} is not 'key=tenant'")
        if not valid_name(tenant):
            raise ValueError(f"{source}: entry {lineno}: tenant {tenant!r} is invalid ({NAME_RULE})")
        out.append((key, tenant))
    return out


class KeyTable:
    """sha256(key) -> tenant. Plaintext keys are not kept."""

    def __init__(self, entries: list[tuple[str, str]] = ()):
        self._entries = [(_hash(k), t) for k, t in entries]

    @classmethod
    def from_settings(cls, settings) -> "KeyTable":
        entries = []
        if settings.api_keys is not None:
            entries += parse_keys(settings.api_keys.get_secret_value(), "SCALESERVE_API_KEYS")
        if settings.api_keys_file is not None:
            path = Path(settings.api_keys_file)
            entries += parse_keys(path.read_text(), str(path))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def tenants(self) -> set[str]:
        return {t for _, t in self._entries}

    def lookup(self, key: str) -> Tenant | None:
        digest = _hash(key)
        found = None
        for h, tenant in self._entries:  # every entry, no early exit
            if hmac.compare_digest(h, digest):
                found = tenant
        if found is None:
            return None
        return Tenant(found, is_admin=found == ADMIN_TENANT)


AUTH_OFF_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!!  AUTHENTICATION IS OFF: no API keys configured (SCALESERVE_API_KEYS / SCALESERVE_API_KEYS_FILE).\n"
    "!!  Every caller is tenant 'default' with ADMIN rights over all adapters.\n"
    "!!  Fine on a laptop; never expose this server to a network you do not control.\n"
    + "!" * 78
)


def configure(app, settings) -> KeyTable:
    """Load the keys into app.state.auth; call once at start (the lifespan). Logs loudly if auth is off."""
    table = KeyTable.from_settings(settings)
    app.state.auth = table
    if table.enabled:
        log.info("auth on: %d API keys for %d tenants", len(table), len(table.tenants()))
    else:
        log.warning(AUTH_OFF_WARNING)
    return table


def _table(request: Request) -> KeyTable:
    state = request.app.state
    table = getattr(state, "auth", None)
    if table is None:  # configure() was not called: do it now from the app's settings, if any
        settings = getattr(state, "settings", None)
        table = configure(request.app, settings) if settings is not None else KeyTable()
        state.auth = table
    return table


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, type="invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def get_tenant(request: Request) -> Tenant:
    """FastAPI dependency: the caller's tenant; 401 (OpenAI error shape) on a missing or bad key."""
    table = _table(request)
    if not table.enabled:
        return DEFAULT_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer YOUR_KEY'")
    tenant = table.lookup(key.strip())
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


__all__ = ["Tenant", "DEFAULT_TENANT", "ADMIN_TENANT", "KeyTable", "configure", "get_tenant", "OpenAIError",
           "OpenAIErrorRoute", "openai_error_handler", "parse_keys"]
