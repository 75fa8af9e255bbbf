"""GET /metrics: Prometheus' scrape (`api.metrics`). Not an API key's route: Prometheus sends
the metrics token, or reads from this machine (`api.metrics.access`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import MetricsReader
from api.metrics.exposition import scrape
from api.session_route import SessionRoute

router = APIRouter(route_class=SessionRoute,
                   tags=["metrics"])


# Left out of the OpenAPI document: it is the operator's, in Prometheus' format, not JSON.
@router.get("/metrics", include_in_schema=False, dependencies=[MetricsReader])
def metrics() -> Response:
    return Response(scrape(), media_type=CONTENT_TYPE_LATEST)
