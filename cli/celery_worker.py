"""`python -m cli.celery_worker CELERY-ARGS`: Celery's own command line, as `python -m celery`,
except that each distinct Python warning is logged once per process.

Celery logs warnings through the `py.warnings` logger. The worker imports and runs the same
training code for every job, and `warnings.catch_warnings` blocks in the libraries reset
Python's own "once" bookkeeping, so without this every job repeated the same warnings.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


class FirstOccurrenceOnly(logging.Filter):
    """Passes a record whose message it has not passed before."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


def _warnings_once(**_: Any) -> None:
    logging.getLogger("py.warnings").addFilter(FirstOccurrenceOnly())


def main() -> int:
    from celery import maybe_patch_concurrency
    from celery.signals import after_setup_logger

    maybe_patch_concurrency()  # as `python -m celery` does, before Celery's modules load
    from celery.bin.celery import main as celery_main

    after_setup_logger.connect(_warnings_once, weak=False)
    return int(celery_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
