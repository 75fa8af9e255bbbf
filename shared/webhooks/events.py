"""The events Tunery sends to webhook endpoints, and their bodies.

OpenAI's three fine-tuning events go out exactly as OpenAI sends them,
`{"id": "evt_…", "object": "event", "type": …, "created_at": <unix s>, "data": {"id":
"ftjob-…"}}`, so that `client.webhooks.unwrap()` reads them into its own types. Tunery's
own events (`tunery.job.*`) share the envelope; their `data` also carries the job's
MonsterAPI id (`job_id`) and what the event is about (attempt, step, eval_loss).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.job_ids import openai_job_id
from shared.models import JobStatus

JOB_SUCCEEDED = "fine_tuning.job.succeeded"
JOB_FAILED = "fine_tuning.job.failed"
JOB_CANCELLED = "fine_tuning.job.cancelled"
JOB_QUEUED = "tunery.job.queued"
JOB_STARTED = "tunery.job.started"
JOB_PAUSED = "tunery.job.paused"
CHECKPOINT_SAVED = "tunery.job.checkpoint_saved"
EVALUATED = "tunery.job.evaluated"

EVENT_TYPES: tuple[str, ...] = (
    JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED,
    JOB_QUEUED, JOB_STARTED, JOB_PAUSED, CHECKPOINT_SAVED, EVALUATED,
)
"""Every event type, the one list: what an endpoint may ask for and gets by default."""

OPENAI_EVENT_TYPES = frozenset({JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED})

STATUS_EVENTS: dict[JobStatus, str] = {
    JobStatus.QUEUED: JOB_QUEUED,
    JobStatus.RUNNING: JOB_STARTED,
    JobStatus.PAUSED: JOB_PAUSED,
    JobStatus.COMPLETED: JOB_SUCCEEDED,
    JobStatus.FAILED: JOB_FAILED,
    JobStatus.CANCELLED: JOB_CANCELLED,
}
"""The event a job's move to each status sends."""

# The job a test send names: no job has it.
SAMPLE_JOB_ID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    body: str
    """The JSON text sent, and signed, byte for byte on every attempt."""


def job_event(event_type: str, job_id: str, at: datetime, **details: Any) -> Event:
    """The event `event_type` about job `job_id`, which happened at `at`. `details` go into a
    Tunery event's data; OpenAI's events carry the job's id only, as OpenAI's do."""
    data: dict[str, Any] = {"id": openai_job_id(job_id)}
    if event_type not in OPENAI_EVENT_TYPES:
        data.update(job_id=job_id, **details)
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {"id": event_id, "object": "event", "type": event_type,
            "created_at": int(at.timestamp()), "data": data}
    return Event(event_id, event_type, json.dumps(body, separators=(",", ":")))
