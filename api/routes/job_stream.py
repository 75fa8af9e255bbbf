"""`GET /v1/finetune/llm/{job_id}/stream`: a job live, as server-sent events.

The events and their order are a contract the dashboard and `tunery watch` rely on: `job` (the
job as `GET /v1/finetune/llm/{id}` shows it) first and whenever its status, phase or progress
change; `status`, `log` and `metric` for each row of its feed, each with the cursor after it as
its id; `end` once the job is finished and every row sent. README, "Following a job live".
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import AUTHENTICATED, error_responses
from api.feed_stream import (
    LastEventIdHeader,
    LastEventIdQuery,
    event_stream,
    follow_feed,
    resume_cursor,
    sse_event,
    sse_response,
)
from api.routes.finetune import JobId
from api.schemas import JobOut, LogLineOut, MetricOut, StatusChangeOut, StreamEndOut
from api.session_route import SessionRoute
from shared import jobs
from shared.job_feed import FeedPage, FeedRow
from shared.models import JobEvent, JobLog, JobStatus

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/finetune/llm", tags=["finetune"], responses=AUTHENTICATED)


class NativeEvents:
    """The contract's events for each page of a job's feed, in order: the `job` first, an
    event per row, then the `job` again when what a follower shows of it (status, phase,
    progress) changed, and `end` on the last page.

    After the rows rather than before: a stream that fell behind catches up with rows the
    job wrote before its state moved on, and a follower that showed the newer state first
    would show a finished job above its last log lines.
    """

    def __init__(self) -> None:
        self._shown: tuple[object, ...] | None = None

    def __call__(self, page: FeedPage) -> str:
        parts = []
        job = JobOut.of(page.job)
        if self._shown is None:
            parts.append(self._job_event(job))
        cursor = page.after
        for row in page.rows:
            cursor = cursor.after(row)
            name, data = _row_event(row)
            parts.append(sse_event(data.model_dump_json(), event=name, event_id=str(cursor)))
        if (job.status, job.phase, job.progress) != self._shown:
            parts.append(self._job_event(job))
        if page.ended:
            end = StreamEndOut(status=JobStatus(page.job.status))
            parts.append(sse_event(end.model_dump_json(), event="end", event_id=str(cursor)))
        return "".join(parts)

    def _job_event(self, job: JobOut) -> str:
        self._shown = (job.status, job.phase, job.progress)
        return sse_event(job.model_dump_json(), event="job")


def _row_event(row: FeedRow) -> tuple[str, BaseModel]:
    if isinstance(row, JobEvent):
        return "status", StatusChangeOut(
            from_status=JobStatus(row.from_status) if row.from_status else None,
            to_status=JobStatus(row.to_status), attempt=row.attempt, reason=row.reason,
            at=row.at)
    if isinstance(row, JobLog):
        return "log", LogLineOut(id=row.id, attempt=row.attempt, line=row.line, at=row.at)
    return "metric", MetricOut(step=row.step, attempt=row.attempt, values=row.values, at=row.at)


@router.get("/{job_id}/stream", response_class=StreamingResponse,
            summary="A job live, as server-sent events: its state, status changes, log lines "
                    "and metrics until it ends; resumable with Last-Event-ID",
            responses={**sse_response("The job's events, live until its `end`.",
                                      ["job", "status", "log", "metric", "end"]),
                       **error_responses(400, 404)})
def stream_job(job_id: JobId, caller: TenantDep, session: SessionDep, settings: SettingsDep,
               last_event_id_header: LastEventIdHeader = None,
               last_event_id: LastEventIdQuery = None) -> StreamingResponse:
    cursor = resume_cursor(last_event_id_header, last_event_id)
    job = jobs.get_job(session, caller.scope, job_id)
    # The request's session lives until the response ends, which for a stream is when the job
    # does: closed now, it gives its connection back. Each poll opens its own.
    session.close()
    return event_stream(follow_feed(caller.scope, job.id, cursor, NativeEvents(),
                                    settings.stream), caller.key_id, settings.stream)
