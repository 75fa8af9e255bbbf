"""`/v1/me`: the API key a request carries, so a client can check its key and its limits
before it submits anything."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep, TenantDep
from api.errors import AUTHENTICATED
from api.schemas import CallerOut
from api.session_route import SessionRoute
from shared.models import KeyRole

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1", tags=["keys"], responses=AUTHENTICATED)


@router.get("/me", summary="This API key: its id, prefix, role, tenant and limits")
def read_me(caller: TenantDep, settings: SettingsDep) -> CallerOut:
    return CallerOut(
        key_id=caller.key_id,
        key_prefix=caller.key_prefix,
        key_name=caller.key_name,
        role=KeyRole.ADMIN if caller.is_admin else KeyRole.MEMBER,
        tenant_id=caller.tenant_id,
        rate_limit_per_minute=settings.limits.rate_limit_per_minute,
        max_active_jobs=settings.limits.max_active_jobs_per_tenant,
    )
