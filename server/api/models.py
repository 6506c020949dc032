"""GET /v1/models: the base model and the adapters the calling tenant may use (each with `parent`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from scaleserve.adapters.registry import SHARED_TENANT

from ..auth import Tenant, get_tenant
from ..schemas import ErrorResponse, ModelCard, ModelList
from .common import APIError

router = APIRouter(tags=["openai"])


def _owner(tenant: str) -> str:
    return "scaleserve" if tenant == SHARED_TENANT else tenant  # operator-loaded (--adapters): shared


def _cards(request: Request, tenant: Tenant) -> list[ModelCard]:
    st = request.app.state
    base = st.served_model_name
    # root: the base's name, not its directory (every tenant reads this list: no host paths in it)
    cards = [ModelCard(id=base, created=int(st.started_at), owned_by="scaleserve", root=base,
                       max_model_len=st.engine.max_model_len)]
    for av in st.registry.list(tenant.name):
        cards.append(ModelCard(id=av.name, created=int(av.created_at), owned_by=_owner(av.tenant), parent=base,
                               root=f"{av.name}@v{av.version}", max_model_len=st.engine.max_model_len))
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, tenant: Tenant = Depends(get_tenant)):
    return ModelList(data=_cards(request, tenant))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, request: Request, tenant: Tenant = Depends(get_tenant)):
    for card in _cards(request, tenant):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.", "model",
                   "model_not_found")
