"""The worker's Celery pool: Celery's solo pool (one job at a time, in the main thread) with a
cold shutdown that hands the running job back.

On a cold shutdown Celery terminates every task whose message is not acknowledged yet, and a
training task acknowledges its message only when it ends (acks_late). The solo pool cannot
terminate its task: Celery's raises NotImplementedError from inside the signal handler, that is
in the middle of the training job, which then ended FAILED for a reason of the worker's. Here,
terminating the task asks it to hand its job back (`worker.shutdown`), as a warm shutdown does.
"""

from __future__ import annotations

from typing import Any

from celery.concurrency.solo import TaskPool

from worker.shutdown import begin_shutdown


class HandBackSoloPool(TaskPool):
    """`--pool solo`, whose `terminate_job` asks the running job to hand itself back."""

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        begin_shutdown()
