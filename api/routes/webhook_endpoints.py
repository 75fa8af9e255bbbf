"""`/v1/webhook_endpoints`: a tenant's webhook endpoints, as OpenAI's `client.webhooks`
manages them (create, retrieve, update, list, delete, rotate_secret, test), and the attempts
of their deliveries. What is sent, and how, is `shared.webhooks`'s business."""

from __future__ import annotations

import os
import socket
from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep, WebhookTestSendsDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from api.openai.webhooks import (
    AttemptList,
    EndpointCreate,
    EndpointDeleted,
    EndpointList,
    EndpointOut,
    EndpointUpdate,
    EndpointWithSecretOut,
    EventTypeList,
    RotateSecret,
    TestResult,
    TestSend,
    attempt_list,
    endpoint_list,
    endpoint_object,
    endpoint_with_secret,
)
from api.session_route import SessionRoute
from shared.settings import Settings
from shared.tenancy import CursorNotFound, Scope
from shared.webhooks import deliveries, endpoints
from shared.webhooks.deliveries import ClaimedDelivery
from shared.webhooks.events import EVENT_TYPES
from shared.webhooks.send import post_delivery
from shared.webhooks.sender import claim_test_send, record_test_send

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1", tags=["openai: webhooks"], responses=OPENAI_AUTHENTICATED)

EndpointId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=64)]


def _bad_cursor(after: str) -> ApiError:
    message = f"no item with id {after} in this list"
    return ApiError(422, "invalid_request", f"after: {message}",
                    [{"path": "after", "message": message}])


@router.post("/webhook_endpoints", summary="Create a webhook endpoint; its signing secret is "
             "shown in this answer only", responses=openai_error_responses(422))
def create_endpoint(body: EndpointCreate, caller: TenantDep, session: SessionDep,
                    settings: SettingsDep) -> EndpointWithSecretOut:
    created = endpoints.create_endpoint(
        session, caller.tenant_id, url=body.url, name=body.name,
        event_types=body.event_types or EVENT_TYPES, settings=settings)
    session.commit()
    return endpoint_with_secret(created.endpoint, created.secret)


@router.get("/webhook_endpoints", summary="This key's webhook endpoints, newest first")
def list_endpoints(caller: TenantDep, session: SessionDep, after: After = None,
                   limit: Limit = 20) -> EndpointList:
    try:
        rows, more = endpoints.list_endpoints(session, caller.scope, after, limit)
    except CursorNotFound:
        raise _bad_cursor(str(after)) from None
    return endpoint_list(rows, more)


@router.get("/webhook_endpoints/{endpoint_id}", summary="A webhook endpoint",
            responses=openai_error_responses(404))
def get_endpoint(endpoint_id: EndpointId, caller: TenantDep, session: SessionDep) -> EndpointOut:
    return endpoint_object(endpoints.get_endpoint(session, caller.scope, endpoint_id))


@router.post("/webhook_endpoints/{endpoint_id}", summary="Change a webhook endpoint's URL, "
             "name, event types, or enable it again", responses=openai_error_responses(404, 422))
def update_endpoint(endpoint_id: EndpointId, body: EndpointUpdate, caller: TenantDep,
                    session: SessionDep, settings: SettingsDep) -> EndpointOut:
    endpoint = endpoints.update_endpoint(
        session, caller.scope, endpoint_id, settings=settings, url=body.url, name=body.name,
        event_types=body.event_types, enabled=body.enabled)
    session.commit()
    return endpoint_object(endpoint)


@router.delete("/webhook_endpoints/{endpoint_id}", summary="Delete a webhook endpoint and "
               "its pending deliveries", responses=openai_error_responses(404))
def delete_endpoint(endpoint_id: EndpointId, caller: TenantDep,
                    session: SessionDep) -> EndpointDeleted:
    endpoints.delete_endpoint(session, caller.scope, endpoint_id)
    session.commit()
    return EndpointDeleted(id=endpoint_id)


@router.post("/webhook_endpoints/{endpoint_id}/rotate_secret",
             summary="A new signing secret, shown in this answer only",
             responses=openai_error_responses(404))
def rotate_secret(endpoint_id: EndpointId, caller: TenantDep, session: SessionDep,
                  settings: SettingsDep, body: RotateSecret | None = None
                  ) -> EndpointWithSecretOut:
    keep_old = (body or RotateSecret()).keep_old_secret_active_for_24_hours
    rotated = endpoints.rotate_secret(session, caller.scope, endpoint_id, keep_old=keep_old,
                                      settings=settings)
    session.commit()
    return endpoint_with_secret(rotated.endpoint, rotated.secret)


@router.post("/webhook_endpoints/{endpoint_id}/test",
             summary="Send a sample event now and report the endpoint's answer",
             responses=openai_error_responses(404, 409, 429))
async def test_endpoint(endpoint_id: EndpointId, caller: TenantDep, session: SessionDep,
                        settings: SettingsDep, sends: WebhookTestSendsDep,
                        body: TestSend | None = None) -> TestResult:
    event_type = (body or TestSend()).event_type
    with sends.hold(caller.tenant_id, endpoint_id, retry_after_s=settings.webhooks.timeout_s):
        claimed = await run_in_threadpool(_claim_test_send, session, caller.scope,
                                          endpoint_id, event_type, settings)
        # The wait for the answer: on the test sends' own threads, with no connection held.
        outcome = await sends.run(post_delivery, claimed, settings)
        await run_in_threadpool(record_test_send, session, claimed, outcome, settings)
    if outcome.status_code is None:
        raise ApiError(409, "webhook_test_failed",
                       f"the endpoint gave no answer: {outcome.error}")
    return TestResult(event_type=event_type, status_code=outcome.status_code,
                      delivered=outcome.delivered, webhook_endpoint_id=endpoint_id)


def _claim_test_send(session: Session, scope: Scope, endpoint_id: str, event_type: str,
                     settings: Settings) -> ClaimedDelivery:
    endpoint = endpoints.get_endpoint(session, scope, endpoint_id)
    return claim_test_send(session, endpoint, event_type, settings,
                           owner=f"api:{socket.gethostname()}:{os.getpid()}")


@router.get("/webhook_endpoints/{endpoint_id}/attempts",
            summary="Tunery extension: the endpoint's delivery attempts, newest first",
            responses=openai_error_responses(404))
def list_attempts(endpoint_id: EndpointId, caller: TenantDep, session: SessionDep,
                  after: After = None, limit: Limit = 20) -> AttemptList:
    endpoint = endpoints.get_endpoint(session, caller.scope, endpoint_id)
    try:
        views, more = deliveries.list_attempts(session, endpoint.id, after_id=after,
                                               limit=limit)
    except CursorNotFound:
        raise _bad_cursor(str(after)) from None
    return attempt_list(views, more)


@router.get("/webhook_event_types", summary="The event types an endpoint may ask for")
def list_event_types(caller: TenantDep) -> EventTypeList:
    return EventTypeList(data=list(EVENT_TYPES))
