"""What every chaos scenario expects of a job that completed: one result, every planned
step trained, one adapter in storage and no checkpoints left behind."""

from __future__ import annotations

from tests.chaos.job_records import JobTrace
from tests.chaos.stack import ChaosStack

ADAPTER = "adapter_model.safetensors"


def assert_completed_once(stack: ChaosStack, trace: JobTrace) -> None:
    detail = stack.describe(trace.job_id)
    assert trace.status == "COMPLETED", detail
    completions = trace.events_to("COMPLETED")
    assert len(completions) == 1, f"{len(completions)} COMPLETED events\n{detail}"
    assert completions[0].attempt == trace.attempt, detail
    planned = trace.planned_steps()
    assert planned, f"no training step recorded a total_steps\n{detail}"
    assert trace.row["result"]["steps"] == planned, (
        f"result steps {trace.row['result']['steps']} != the {planned} steps planned\n{detail}")
    assert_every_step_trained(trace, planned)
    files = stack.storage_files(trace.job_id)
    assert files.count(ADAPTER) == 1, files
    assert [f for f in files if f.endswith(ADAPTER)] == [ADAPTER], (
        f"more than one adapter in storage: {files}")
    assert not [f for f in files if f.startswith("checkpoints/")], (
        f"checkpoints left after COMPLETED: {files}")


def assert_every_step_trained(trace: JobTrace, planned: int) -> None:
    """Steps 1..planned, each attempt taking over where the checkpoint it resumed from ends:
    the final adapter is the product of one uninterrupted sequence of steps."""
    covered: list[int] = []
    for attempt in trace.attempts_that_trained():
        start = trace.resumed_from(attempt) or 0
        covered = [s for s in covered if s <= start] + trace.trained_steps(attempt)
    assert covered == list(range(1, planned + 1)), (
        f"the surviving steps are not 1..{planned}: {covered}\n{trace.summary()}")
