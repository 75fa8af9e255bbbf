"""Requests counted and timed by route template (`/v1/finetune/llm/{job_id}`), never by the
raw path: job ids in the labels would make a new series per job."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "tunery_http_requests", "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
DURATION = Histogram(
    "tunery_http_request_duration_seconds",
    "Time from a request's arrival to its response's last byte, by method and route template.",
    ["method", "route"],
    # Up to a minute: dataset uploads and streamed chat completions last that long.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Summed over the live API processes; a process that stops takes its share with it.
IN_FLIGHT = Gauge("tunery_http_requests_in_flight", "HTTP requests being handled now.",
                  multiprocess_mode="livesum")

# A path no route serves (a 404, a scanner's probe) is counted under this one name.
UNMATCHED = "unmatched"
# Any other method a client sends is counted as "other": the method is a label too.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def served_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes under `routes`, each included router opened up: recent FastAPI keeps an
    included router whole (its `original_router`). Their paths are whole templates because
    the app includes its routers without a prefix of its own, as `api.main` does."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from served_routes(included.routes)
        else:
            yield route


def route_template(scope: Scope, arrived: Scope, routes: Sequence[BaseRoute]) -> str:
    """The path template of the route that served `scope`, as the router recorded it. Else
    (a request answered before routing, such as a body over its limit, or one a mount such as
    the dashboard's files served), the route among `routes` (`served_routes`) that the
    request as it `arrived` matches, found as the router finds it: a full match first, then a
    method mismatch. Not `scope` itself: a mount rewrote its paths."""
    route = scope.get("route")
    if route is None or not getattr(route, "path", ""):
        matches = [(candidate.matches(arrived)[0], candidate) for candidate in routes]
        route = next((r for match, r in matches if match == Match.FULL),
                     next((r for match, r in matches if match == Match.PARTIAL), None))
    return str(getattr(route, "path", "") or UNMATCHED)


class RequestMetrics:
    """ASGI middleware: counts each request under its method, route template and status, times
    it, and holds it in the in-flight gauge meanwhile. Outside every other middleware, so that
    the body limit's 413 and the 500 of an unhandled exception are counted too."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        # Built with the middleware stack, at the first request: every router is included.
        self.app, self.routes = app, list(served_routes(routes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
        arrived = dict(scope)
        route: str | None = None
        counted = False

        def route_of_request() -> str:
            nonlocal route
            route = route or route_template(scope, arrived, self.routes)
            return route

        async def send_counting(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start":
                # Counted as the answer leaves, not after it: a client that has its response
                # (and scrapes next, through another process) finds it counted.
                REQUESTS.labels(method, route_of_request(), str(message["status"])).inc()
                counted = True
            await send(message)

        started = time.perf_counter()
        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_counting)
        finally:
            IN_FLIGHT.dec()
            if not counted:
                # An exception out of the app becomes Starlette's 500 outside this middleware.
                REQUESTS.labels(method, route_of_request(), "500").inc()
            DURATION.labels(method, route_of_request()).observe(time.perf_counter() - started)
