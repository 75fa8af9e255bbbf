"""Stopping a job where it waits outside the training loop: a model or dataset download, a
file being parsed, tokenizing.

The training loop reads `should_stop()` between steps; the stages before it run library code
(httpx, `datasets`, transformers' loaders) that never asks. Inside an `InterruptibleRegion`
the heartbeat thread, once it has a reason to stop, sends the main thread `STOP_SIGNAL`
(`interrupt_main_thread`), whose handler raises wherever the main thread is: between two
bytecodes, or in a blocking socket read (the signal interrupts the system call, and Python
runs the handler before retrying it, PEP 475). The region turns that into `TrainingStopped`.

Only inside a region, and not inside `uninterruptible()` (the reporter's database writes):
never during uploads, checkpoint writes or the training loop. The handler itself checks that
a region is still open, so a signal that arrives just as the region ends is ignored.

The worker runs one job at a time in the main thread (Celery's solo pool). A region entered
from another thread (tests) interrupts nothing: it only checks `should_stop()` on entry and
on an exception.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

from worker.pipeline.errors import StopReason, TrainingStopped

log = logging.getLogger("tunery.worker")

ShouldStop = Callable[[], StopReason | None]

# Celery uses SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1 and SIGUSR2; a real-time signal is
# free (absent on macOS: no interruption there, as before).
_SIGRTMIN: int | None = getattr(signal, "SIGRTMIN", None)
STOP_SIGNAL: int | None = None if _SIGRTMIN is None else _SIGRTMIN + 3

_active: InterruptibleRegion | None = None
"""The region the main thread is in; set and cleared only by the main thread."""
_shield_depth = 0
"""Open `uninterruptible()` blocks of the main thread."""
_handler_installed = False


class _StopSignal(BaseException):
    """What the stop signal's handler raises; the region turns it into `TrainingStopped`. A
    BaseException, so that a library's `except Exception` cannot swallow it: W&B's start-up,
    for one, catches and retries around the very waits a cancel interrupts."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = reason


class InterruptibleRegion:
    """`with InterruptibleRegion(reporter.should_stop) as region:` the block may be stopped
    at any point by `interrupt_main_thread()` with `TrainingStopped(should_stop())`.

    `region.end()` closes the region early, for good (e.g. inside a `with` that must be
    entered interruptibly but whose exit must not be interrupted). On leaving with an
    exception while a stop was asked for (and before `end()`), that exception becomes
    `TrainingStopped`: a library may have wrapped the one the handler raised.
    """

    def __init__(self, should_stop: ShouldStop) -> None:
        self.should_stop = should_stop
        self._open = False
        self._armed = False

    def __enter__(self) -> InterruptibleRegion:
        global _active
        self._open = True
        if STOP_SIGNAL is not None and _active is None and _in_main_thread():
            _install_handler()
            self._armed = True
            _active = self
        # After arming: a stop asked for just before is seen here, one asked for just after
        # gets the signal.
        try:
            _raise_if_asked(self.should_stop)
        except BaseException:
            self.end()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def end(self) -> None:
        global _active
        self._open = False
        if self._armed:
            self._armed = False
            _active = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        was_open = self._open
        self.end()
        if exc_type is not None and issubclass(exc_type, _StopSignal):
            assert isinstance(exc, _StopSignal)
            raise TrainingStopped(exc.reason) from None
        if not was_open or exc_type is None or not issubclass(exc_type, Exception):
            return
        if issubclass(exc_type, TrainingStopped):
            return
        reason = self.should_stop()
        if reason:
            raise TrainingStopped(reason) from None


def interrupt_main_thread() -> bool:
    """From another thread (the heartbeat), once a stop is asked for: interrupt the main
    thread if it is in a region and not in an `uninterruptible()` block. Safe to call again
    (a library may have swallowed the first interruption). Returns whether a signal was sent."""
    if STOP_SIGNAL is None or _active is None or _shield_depth:
        return False
    ident = threading.main_thread().ident
    if ident is None:
        return False
    signal.pthread_kill(ident, STOP_SIGNAL)
    return True


@contextmanager
def uninterruptible() -> Iterator[None]:
    """A block of the main thread that a stop signal must not cut in two (a database write);
    a stop asked for meanwhile is delivered by the heartbeat's next signal. Elsewhere a no-op."""
    global _shield_depth
    if not _in_main_thread():
        yield
        return
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    region = _active
    if region is None or _shield_depth:
        return
    reason = region.should_stop()
    if reason:
        raise _StopSignal(reason)


def _install_handler() -> None:
    global _handler_installed
    if not _handler_installed:
        assert STOP_SIGNAL is not None
        signal.signal(STOP_SIGNAL, _on_stop_signal)
        _handler_installed = True


def _raise_if_asked(should_stop: ShouldStop) -> None:
    reason = should_stop()
    if reason:
        raise TrainingStopped(reason)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
