"""API keys -> tenants. (Stub: auth off, everyone is the 'default' tenant with admin rights.
The adapters/tenancy work replaces this with hashed keys from settings.)"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request


@dataclass(frozen=True)
class Tenant:
    name: str
    is_admin: bool = False


DEFAULT_TENANT = Tenant("default", is_admin=True)


async def get_tenant(request: Request) -> Tenant:
    """FastAPI dependency: the caller's tenant (401 on a bad key once keys are configured)."""
    return DEFAULT_TENANT
