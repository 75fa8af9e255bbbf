"""`/v1/tenants/{tenant_id}/weight`: an admin reads and sets a tenant's share of the workers
(`shared.tenant_weights`). A tenant's id is the `tenant_id` of `GET /v1/me` and of its jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import AdminDep, SessionDep
from api.errors import AUTHENTICATED, error_responses
from api.schemas import TenantWeightIn, TenantWeightOut
from api.session_route import SessionRoute
from shared.tenant_weights import TenantWeight, get_weight, set_weight

router = APIRouter(route_class=SessionRoute, prefix="/v1", tags=["tenants (admin)"],
                   responses={**AUTHENTICATED, **error_responses(403, 404)})

TenantId = Annotated[str, Path(min_length=1, max_length=36)]


def _weight_out(weight: TenantWeight) -> TenantWeightOut:
    return TenantWeightOut(tenant_id=weight.tenant_id, name=weight.name, weight=weight.weight)


@router.get("/tenants/{tenant_id}/weight", summary="A tenant's weight (admin key only)")
def read_weight(tenant_id: TenantId, _: AdminDep, session: SessionDep) -> TenantWeightOut:
    return _weight_out(get_weight(session, tenant_id))


@router.put("/tenants/{tenant_id}/weight",
            summary="Set a tenant's weight, its share of the workers (admin key only)")
def put_weight(tenant_id: TenantId, body: TenantWeightIn, _: AdminDep,
               session: SessionDep) -> TenantWeightOut:
    weight = set_weight(session, tenant_id, body.weight)
    session.commit()
    return _weight_out(weight)
