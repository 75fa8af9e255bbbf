"""OpenAI's webhook endpoint objects, field for field as the official `openai` SDK reads them
(`openai.types.webhooks`: `WebhookEndpoint`, `WebhookEndpointWithSecret`,
`WebhookEndpointTestResult`, ...), the bodies its `client.webhooks` methods send, and the
delivery attempts Tunery lists beside them. Fields that are Tunery extensions say so.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field

from shared.models import DeliveryStatus, WebhookEndpoint, as_utc
from shared.webhooks.deliveries import AttemptView
from shared.webhooks.events import EVENT_TYPES, JOB_SUCCEEDED

MAX_URL_CHARS = 2048


def _known_event_type(value: str) -> str:
    if value not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value[:80]!r}; one of {', '.join(EVENT_TYPES)}")
    return value


def _distinct(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


EventType = Annotated[str, AfterValidator(_known_event_type)]
EventTypes = Annotated[list[EventType], AfterValidator(_distinct),
                       Field(min_length=1, max_length=len(EVENT_TYPES) * 2)]


def _event_types_field() -> Any:
    return Field(
        None,
        # OpenAI's name, and the one Stripe's and Standard Webhooks' users know.
        validation_alias=AliasChoices("event_types", "enabled_events"),
        description="The event types delivered to this endpoint (`GET "
        "/v1/webhook_event_types`); `enabled_events` is accepted for it too. Tunery extension: "
        "left out, every type.")


Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS, description=(
    "Where deliveries are POSTed: https, a host that resolves to public addresses only "
    "(the operator's TUNERY_ALLOWED_PRIVATE_URL_HOSTS and TUNERY_ALLOW_HTTP_URLS excepted)."))]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    name: Name | None = Field(None, description="Tunery extension: optional, the URL's host "
                                                "by default.")
    event_types: EventTypes | None = _event_types_field()


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    name: Name | None = None
    event_types: EventTypes | None = _event_types_field()
    enabled: bool | None = Field(None, description="Tunery extension: true sends to an "
                                 "endpoint disabled by a 410 Gone again; false stops it.")


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = Field(
        True, description="Keep signing with the previous secret too, beside the new one, for "
        "TUNERY_WEBHOOK_SECRET_ROTATION_WINDOW_S (24 h by default). Tunery's default is true, "
        "OpenAI's false: pass false after a leak.")


class TestSend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: EventType = Field(JOB_SUCCEEDED, description="The sample event to send.")


class EndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    updated_at: int | None
    name: str
    url: str
    event_types: list[str]
    signing_secret_hint: str | None
    enabled: bool = Field(description="Tunery extension: false once the endpoint answered "
                                      "410 Gone (or was disabled); nothing is sent then.")
    disabled_reason: str | None = Field(description="Tunery extension: why it is disabled.")


class EndpointWithSecretOut(EndpointOut):
    signing_secret: str = Field(description="`whsec_…`: shown only here, at creation and "
                                            "rotation; verify deliveries with it.")


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class TestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    event_type: str
    status_code: int = Field(description="The endpoint's answer.")
    # OpenAI's SDK types this Literal[True]: "whether the test request completed", with
    # status_code to say how the endpoint answered. A test that got no answer is an error.
    success: Literal[True] = Field(True, description="The test request completed: always "
                                   "true, as in OpenAI's API; see `delivered`.")
    delivered: bool = Field(description="Tunery extension: the endpoint answered 2xx, which "
                                        "is what a delivery counts as delivered.")
    webhook_endpoint_id: str


class EventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class AttemptOut(BaseModel):
    """Tunery extension: one try at sending a delivery."""

    id: str
    object: Literal["webhook_endpoint.attempt"] = "webhook_endpoint.attempt"
    webhook_id: str = Field(description="The delivery's `webhook-id` header: the same on "
                                        "every attempt of one delivery.")
    event_id: str
    event_type: str
    attempt: int = Field(description="1 for the first attempt of the delivery.")
    started_at: int
    finished_at: int | None
    duration_ms: int | None
    status_code: int | None = Field(description="The endpoint's answer; null when none came.")
    error: str | None = Field(description="Why no answer came (timeout, refused address, "
                                          "connection error); null with a status code.")
    delivery_status: DeliveryStatus
    test: bool = Field(description="A test send (`POST …/test`).")


class AttemptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AttemptOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _epoch(moment: datetime) -> int:
    return int(as_utc(moment).timestamp())


def endpoint_object(endpoint: WebhookEndpoint) -> EndpointOut:
    return EndpointOut(
        id=endpoint.id, created_at=_epoch(endpoint.created_at),
        updated_at=_epoch(endpoint.updated_at), name=endpoint.name, url=endpoint.url,
        event_types=list(endpoint.event_types), signing_secret_hint=endpoint.secret_hint,
        enabled=endpoint.disabled_at is None, disabled_reason=endpoint.disabled_reason)


def endpoint_with_secret(endpoint: WebhookEndpoint, secret: str) -> EndpointWithSecretOut:
    return EndpointWithSecretOut(**endpoint_object(endpoint).model_dump(), signing_secret=secret)


def endpoint_list(endpoints: list[WebhookEndpoint], more: bool) -> EndpointList:
    data = [endpoint_object(e) for e in endpoints]
    return EndpointList(data=data, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None, has_more=more)


def attempt_list(views: list[AttemptView], more: bool) -> AttemptList:
    data = [AttemptOut(
        id=v.attempt.id, webhook_id=v.attempt.delivery_id, event_id=v.event_id,
        event_type=v.event_type, attempt=v.attempt.number,
        started_at=_epoch(v.attempt.started_at),
        finished_at=_epoch(v.attempt.finished_at) if v.attempt.finished_at else None,
        duration_ms=v.attempt.duration_ms, status_code=v.attempt.status_code,
        error=v.attempt.error, delivery_status=DeliveryStatus(v.delivery_status),
        test=v.is_test) for v in views]
    return AttemptList(data=data, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None, has_more=more)
