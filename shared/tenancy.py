"""Which tenants' rows a caller may read and act on: the one place tenant isolation is decided.

A lookup takes a `Scope`: a tenant id (a member key: that tenant's rows only) or
`ALL_TENANTS` (an admin key, for operators). Every job, dataset, deployment and webhook
endpoint query filters through `visible_to`, so another tenant's row is simply not found,
exactly like a row that never existed, and no route needs an `if admin` of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, TypeVar

from sqlalchemy import ColumnElement, and_, func, select, true, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from shared.models import Dataset, Deployment, Job, WebhookEndpoint


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


Listed = TypeVar("Listed", Job, Dataset, Deployment, WebhookEndpoint)


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


class CursorNotFound(LookupError):
    """The `after` cursor names no row the scope sees."""


def page_after(
    session: Session, model: type[Listed], scope: Scope, *, after_id: str | None, limit: int,
    descending: bool = True, filters: Sequence[ColumnElement[bool]] = (),
) -> tuple[list[Listed], bool]:
    """One page of the `model` rows `scope` sees, by creation (newest first when
    `descending`), starting after the row `after_id` (the last one of the previous page), and
    whether more follow. A cursor, unlike an offset, skips or repeats nothing while rows are
    added: OpenAI's lists page this way. `CursorNotFound` when `after_id` names no such row."""
    where = and_(visible_to(scope, model.tenant_id), *filters)
    if after_id is not None:
        cursor = session.execute(
            select(model.created_at, model.id)
            .where(model.id == after_id, visible_to(scope, model.tenant_id))
        ).one_or_none()
        if cursor is None:
            raise CursorNotFound(after_id)
        key, at = tuple_(model.created_at, model.id), tuple_(*cursor)
        where = and_(where, key < at if descending else key > at)
    order = ((model.created_at.desc(), model.id.desc()) if descending
             else (model.created_at, model.id))
    rows = session.scalars(select(model).where(where).order_by(*order).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit
