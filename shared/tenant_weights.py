"""A tenant's weight: its share of the workers when tenants wait for the same ones.

Only an admin key sets it (`PUT /v1/tenants/{tenant_id}/weight`). How the weight is used is
`shared.jobs.claim_next`'s business: a free worker claims from the tenant with the fewest
running jobs per unit of weight, so a tenant of weight 2 keeps getting workers until it runs
twice as many jobs as a tenant of weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.models import Tenant

MAX_WEIGHT = 100.0
"""The largest weight an admin may set. Weights are relative: 100 against the default 1
already lets a tenant run 100 jobs before another tenant gets its second, and a bound keeps a
typo from going further."""

MIN_WEIGHT = 0.01
"""The smallest: a tenant of weight 0.01 waits behind 100 running jobs of a tenant of weight
1. Below it nothing is gained, and near the smallest floats the claim's running / weight
overflows PostgreSQL's double precision, which would stop every claim."""


class TenantNotFound(LookupError):
    pass


@dataclass(frozen=True)
class TenantWeight:
    tenant_id: str
    name: str
    weight: float


def get_weight(session: Session, tenant_id: str) -> TenantWeight:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise TenantNotFound(tenant_id)
    return TenantWeight(tenant.id, tenant.name, tenant.weight)


def set_weight(session: Session, tenant_id: str, weight: float) -> TenantWeight:
    """Set the tenant's weight; the caller commits. The next claim uses it; jobs already
    running keep their workers."""
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, not {weight}")
    changed = session.execute(
        update(Tenant).where(Tenant.id == tenant_id).values(weight=weight)
        .returning(Tenant.name)
    ).one_or_none()
    if changed is None:
        raise TenantNotFound(tenant_id)
    return TenantWeight(tenant_id, changed[0], weight)
