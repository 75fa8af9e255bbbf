"""A tenant's webhook endpoints: create, read, change, rotate the secret of, delete.

An endpoint's URL passes the same SSRF rules as a dataset URL (`shared.url_guard`, the
operator's `UrlPolicy`), with DNS, when it is set; the sender checks it again, and connects
only to the addresses it checked, at every attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.models import DeliveryStatus, Tenant, WebhookDelivery, WebhookEndpoint, utcnow
from shared.settings import Settings
from shared.tenancy import Scope, page_after, visible_to
from shared.url_guard import UrlPolicy, UrlRefused, check_url, resolve_allowed
from shared.webhooks import signing_secrets

# Each of a tenant's endpoints gets a row per event: bounded, so that one job's events cannot
# be made to write without limit.
MAX_ENDPOINTS_PER_TENANT = 20


class EndpointNotFound(LookupError):
    pass


class EndpointRefused(ValueError):
    """A value Tunery will not take for an endpoint; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class EndpointWithSecret:
    """An endpoint and its new signing secret in plain text: the one time it is shown."""

    endpoint: WebhookEndpoint
    secret: str


def check_endpoint_url(url: str, settings: Settings) -> str:
    """The URL's host; `EndpointRefused` naming `url` for a URL that is malformed or that the
    SSRF rules do not allow. Nothing may read the URL's parts before this has passed."""
    policy = UrlPolicy.from_settings(settings.sources)
    try:
        target = check_url(url, policy)
        resolve_allowed(target.host, target.port, policy)
    except UrlRefused as exc:
        raise EndpointRefused("url", f"url: {exc}") from None
    return target.host


def create_endpoint(session: Session, tenant_id: str, *, url: str, name: str | None,
                    event_types: Sequence[str], settings: Settings) -> EndpointWithSecret:
    """A new endpoint with a new secret, named after the URL's host unless `name` is given;
    `EndpointRefused` for a URL the SSRF rules refuse or a tenant that has
    `MAX_ENDPOINTS_PER_TENANT` already."""
    host = check_endpoint_url(url, settings)
    # Counting before inserting lets creates running at once all see room for one more. On
    # PostgreSQL the tenant's row, locked until commit, puts one tenant's creates in a line;
    # SQLite ignores the lock but takes its one write lock at the insert, so the count made
    # after it, in the same transaction, sees every create committed before.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    secret = signing_secrets.new_secret()
    endpoint = WebhookEndpoint(
        id=f"we_{uuid.uuid4().hex}", tenant_id=tenant_id, name=name or host[:200], url=url,
        event_types=list(event_types), secret=signing_secrets.seal(secret, settings),
        secret_hint=signing_secrets.hint(secret),
    )
    session.add(endpoint)
    session.flush()
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint)
                           .where(WebhookEndpoint.tenant_id == tenant_id)) or 0
    if count > MAX_ENDPOINTS_PER_TENANT:
        session.delete(endpoint)
        session.flush()
        raise EndpointRefused("body", f"a tenant has at most {MAX_ENDPOINTS_PER_TENANT} webhook "
                              "endpoints; delete one first")
    return EndpointWithSecret(endpoint, secret)


def get_endpoint(session: Session, scope: Scope, endpoint_id: str) -> WebhookEndpoint:
    """The endpoint, if `scope` may see it; another tenant's reads as missing."""
    endpoint = session.scalar(select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, visible_to(scope, WebhookEndpoint.tenant_id)))
    if endpoint is None:
        raise EndpointNotFound(endpoint_id)
    return endpoint


def list_endpoints(session: Session, scope: Scope, after_id: str | None,
                   limit: int) -> tuple[list[WebhookEndpoint], bool]:
    """A page of the endpoints `scope` sees, newest first, and whether more follow."""
    return page_after(session, WebhookEndpoint, scope, after_id=after_id, limit=limit)


def update_endpoint(session: Session, scope: Scope, endpoint_id: str, *, settings: Settings,
                    url: str | None = None, name: str | None = None,
                    event_types: Sequence[str] | None = None,
                    enabled: bool | None = None) -> WebhookEndpoint:
    """Change what is given; `enabled=True` sends to an endpoint disabled by a 410 again."""
    endpoint = get_endpoint(session, scope, endpoint_id)
    if url is not None:
        check_endpoint_url(url, settings)
        endpoint.url = url
    if name is not None:
        endpoint.name = name
    if event_types is not None:
        endpoint.event_types = list(event_types)
    if enabled is True:
        endpoint.disabled_at = endpoint.disabled_reason = None
    elif enabled is False and endpoint.disabled_at is None:
        disable(session, endpoint, "disabled by its owner")
    endpoint.updated_at = utcnow()
    session.flush()
    return endpoint


def delete_endpoint(session: Session, scope: Scope, endpoint_id: str) -> None:
    """Delete the endpoint with its deliveries and their attempts; nothing more is sent."""
    session.delete(get_endpoint(session, scope, endpoint_id))
    session.flush()


def rotate_secret(session: Session, scope: Scope, endpoint_id: str, *, keep_old: bool,
                  settings: Settings) -> EndpointWithSecret:
    """A new signing secret. With `keep_old`, the one it replaces still signs every delivery
    beside it for `settings.webhooks.secret_rotation_window_s`; without, it stops at once."""
    endpoint = get_endpoint(session, scope, endpoint_id)
    secret = signing_secrets.new_secret()
    now = utcnow()
    window = settings.webhooks.secret_rotation_window_s
    if keep_old and window > 0:
        endpoint.previous_secret = endpoint.secret
        endpoint.previous_secret_expires_at = now + timedelta(seconds=window)
    else:
        endpoint.previous_secret = endpoint.previous_secret_expires_at = None
    endpoint.secret = signing_secrets.seal(secret, settings)
    endpoint.secret_hint = signing_secrets.hint(secret)
    endpoint.updated_at = now
    session.flush()
    return EndpointWithSecret(endpoint, secret)


def disable(session: Session, endpoint: WebhookEndpoint, reason: str) -> None:
    """Stop sending to `endpoint`: it is disabled and its waiting deliveries are given up."""
    now = utcnow()
    endpoint.disabled_at, endpoint.disabled_reason, endpoint.updated_at = now, reason, now
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id,
               WebhookDelivery.status == DeliveryStatus.PENDING.value)
        .values(status=DeliveryStatus.FAILED.value, finished_at=now, lease_owner=None,
                lease_expires_at=None),
        execution_options={"synchronize_session": False},
    )

