"""Adapter management routes: /v1/adapters (stub; filled in by the adapters work)."""

from fastapi import APIRouter

router = APIRouter(tags=["adapters"])
