"""Whether this worker process is shutting down, so that its running job is handed back.

Celery's warm shutdown (SIGTERM, a first Ctrl-C: what Docker, Kubernetes and systemd send)
would otherwise train the job to its end, which can be hours, longer than any supervisor waits
before its SIGKILL; the cold shutdown (SIGQUIT, a second Ctrl-C) would terminate the task,
which the solo pool cannot do (`worker.solo_pool`). Instead the attempt stops at its next safe
point and hands the job back to the queue (`worker.attempt`); the next worker resumes it from
its last checkpoint.

`begin_shutdown()` runs inside Celery's signal handlers, which interrupt the main thread
between two bytecodes of whatever it was doing (a database write, a checkpoint upload): so it
only sets a flag, which the attempt's heartbeat reads at its next beat and turns into a stop
request like a cancel's.
"""

from __future__ import annotations

_shutting_down = False


def begin_shutdown() -> None:
    """This process stops taking jobs and hands its running one back. Safe in a signal
    handler: one assignment, no lock."""
    global _shutting_down
    _shutting_down = True


def shutting_down() -> bool:
    return _shutting_down
