"""The route class of every router: a sync route gives its database connection back on the
thread it ran on, as soon as it returns.

FastAPI runs a sync route on a pool thread, then validates its answer and closes its
dependencies on other pool threads. A session the route left in a transaction would keep its
connection through those waits, and a burst of requests would hold every connection while
every thread waited for one, until the pool's timeout answered them all 503. Closing the
session in the route's own thread ends that: a connection is only ever held by a thread that
is running. The session stays usable (a later read takes a connection again); objects it
loaded keep their loaded attributes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from sqlalchemy.orm import Session


def _closing_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return run


class SessionRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)
