"""Who may read GET /metrics: the job counts it shows span every tenant, operator data that
no tenant's API key unlocks. With `TUNERY_METRICS_TOKEN` set, whoever sends it as a bearer
token; without, only a client on this machine (the embedded default binds to 127.0.0.1)."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from api.errors import ApiError
from api.limits.auth_failures import client_address, refuse_if_over
from shared.settings import Settings


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_metrics_reader(request: Request, sent_token: str, settings: Settings) -> None:
    """Raise the 401 or 403 that `request` gets, if any."""
    token = settings.metrics.token
    if token is None:
        if is_loopback(client_address(request)):
            return
        raise ApiError(403, "forbidden", "GET /metrics answers only clients on this machine; "
                       "set TUNERY_METRICS_TOKEN on the server and send it as "
                       "'Authorization: Bearer <token>' to scrape from elsewhere")
    if not hmac.compare_digest(sent_token.encode(), token.get_secret_value().encode()):
        refuse_if_over(request, "authentications")
        raise ApiError(401, "unauthorized", "GET /metrics needs the token TUNERY_METRICS_TOKEN "
                       "sets: send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
