"""Which tenants' rows a caller may read and act on: the one place tenant isolation is decided.

A lookup takes a `Scope`: a tenant id (a member key: that tenant's rows only) or
`ALL_TENANTS` (an admin key, for operators). Every job and dataset query filters through
`visible_to`, so another tenant's row is simply not found, exactly like a row that never
existed, and no route needs an `if admin` of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, TypeVar

from sqlalchemy import ColumnElement, and_, func, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session

from shared.models import Dataset, Job


class _AllTenants(enum.Enum):
    ALL_TENANTS = "all tenants"


ALL_TENANTS: Final = _AllTenants.ALL_TENANTS

Scope = str | _AllTenants
"""A tenant id, or `ALL_TENANTS`."""


def visible_to(scope: Scope, tenant_column: InstrumentedAttribute[str]) -> ColumnElement[bool]:
    """The WHERE clause that limits a query on `tenant_column`'s table to what `scope` sees."""
    if scope is ALL_TENANTS:
        return true()
    return tenant_column == scope


Listed = TypeVar("Listed", Job, Dataset)


def newest_first(
    session: Session, model: type[Listed], scope: Scope, limit: int, offset: int,
    filters: Sequence[ColumnElement[bool]] = (),
) -> tuple[list[Listed], int]:
    """One page of the `model` rows `scope` sees that match every one of `filters`, newest
    first, and how many of them it sees in all."""
    where = and_(visible_to(scope, model.tenant_id), *filters)
    total = session.scalar(select(func.count()).select_from(model).where(where))
    rows = session.scalars(
        select(model)
        .where(where)
        .order_by(model.created_at.desc(), model.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total or 0
