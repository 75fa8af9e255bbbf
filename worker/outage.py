"""Riding out a database outage: what the worker retries while the database is unreachable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger("tunery.worker")

T = TypeVar("T")


def through_outage(action: Callable[[], T], patience_s: float, what: str) -> T | None:
    """`action()`, retried every 2 s while the database is unreachable, for up to
    `patience_s`; None if it stays unreachable that long."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return action()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() > deadline:
                log.error("%s: given up, database unreachable for %.0f s: %s", what,
                          patience_s, exc)
                return None
            log.warning("%s waits: database unreachable: %s", what, exc)
            time.sleep(2.0)
