"""`tunery watch JOB`: a job followed live through its event stream
(`GET /v1/finetune/llm/{id}/stream`), its log lines printed as they come under a one-line
progress bar, until it ends. A dropped connection is taken up again from the last event
received (`Last-Event-ID`), so nothing is missed and nothing printed twice."""

from __future__ import annotations

import time
from typing import Any

import httpx

from cli.api_client import ApiClient, ApiRefused, ApiUnreachable
from cli.progress_line import ProgressLine, bar, format_duration
from cli.sse import ServerSentEvent, read_events

FIRST_RETRY_S = 0.5
LONGEST_RETRY_S = 5.0


class JobView:
    """What the events of one job's stream show: log lines and status changes as lines,
    steps, loss, ETA and phase on the progress line."""

    def __init__(self, line: ProgressLine) -> None:
        self.line = line
        self.job: dict[str, Any] = {}
        self.step: int | None = None
        self.total: int | None = None
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.eta_s: float | None = None

    def show(self, event: ServerSentEvent) -> None:
        data = event.json()
        if event.name == "job":
            self.job = data
        elif event.name == "log":
            self.line.print(data["line"])
        elif event.name == "status":
            reason = f" ({data['reason']})" if data.get("reason") else ""
            self.line.print(f"status: {data['from_status'] or 'new'} -> {data['to_status']}"
                            f"{reason}")
        elif event.name == "metric":
            self._metric(data)
        if event.name != "end":
            self.line.update(self.progress())

    def _metric(self, data: dict[str, Any]) -> None:
        values = data["values"]
        if "total_steps" in values:
            self.total = int(values["total_steps"])
        if "loss" in values:
            self.step, self.loss = data["step"], values["loss"]
            self.eta_s = values.get("eta_s")
        if "eval_loss" in values:
            self.eval_loss = values["eval_loss"]

    def progress(self) -> str:
        fraction = (self.step / self.total if self.step is not None and self.total
                    else self.job.get("progress"))
        parts = [bar(fraction)]
        if self.total:
            parts.append(f"step {self.step or 0}/{self.total}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval {self.eval_loss:.4f}")
        if self.eta_s is not None and self.job.get("status") == "RUNNING":
            parts.append(f"eta {format_duration(self.eta_s)}")
        parts.append(self.job.get("phase") or self.job.get("status") or "")
        return " | ".join(part for part in parts if part)


def watch_job(api: ApiClient, job_id: str, give_up_after_s: float) -> int:
    """Follow `job_id` to its end: 0 when it COMPLETED, 1 when it FAILED or was CANCELLED.

    Raises `ApiRefused` for a refusal that asking again will not change (an unknown job, a
    wrong key) and `ApiUnreachable` once the API has not answered for `give_up_after_s`.
    """
    view = JobView(ProgressLine())
    cursor: str | None = None
    answered_at, wait_s = time.monotonic(), FIRST_RETRY_S
    try:
        while True:
            headers = {"Last-Event-ID": cursor} if cursor else None
            try:
                with api.stream(f"/v1/finetune/llm/{job_id}/stream", headers=headers) as response:
                    for event in read_events(response.iter_lines()):
                        answered_at, wait_s = time.monotonic(), FIRST_RETRY_S
                        cursor = event.id or cursor
                        view.show(event)
                        if event.name == "end":
                            return _ended(view, job_id, event.json()["status"])
                reason = "the stream closed before the job ended"
            except (ApiUnreachable, httpx.TransportError) as exc:
                reason = str(exc) or type(exc).__name__
            except ApiRefused as exc:
                if not exc.transient:
                    raise
                reason = exc.message
            if time.monotonic() - answered_at > give_up_after_s:
                raise ApiUnreachable(f"no answer from {api.base_url} for {give_up_after_s:g} s "
                                     f"({reason}); the job goes on: watch it again later")
            view.line.print(f"tunery watch: connection lost ({reason}); resuming")
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, LONGEST_RETRY_S)
    finally:
        view.line.close()


def _ended(view: JobView, job_id: str, status: str) -> int:
    view.line.update(view.progress())
    view.line.close()
    error = view.job.get("error")
    print(f"job {job_id} {status}" + (f": {error}" if error and status != "COMPLETED" else ""))
    return 0 if status == "COMPLETED" else 1
