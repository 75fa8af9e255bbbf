"""The files through which a worker and the process group it started for one job talk.

The worker writes `spec.json` (what to train: the request, the settings, the attempt) before
it starts torchrun, `stop` (a `StopReason`) once the attempt should end, and touches
`worker-alive` while it watches the group; rank 0 appends
what the pipeline reports to `events.jsonl`, one JSON object a line, the last one the
outcome. Files rather than a socket or a queue: no port to find, nothing lost when either
side is slow, and what a crashed group wrote is still there to read. The directory is the
attempt's private work directory, so the secrets in `spec.json` stay within the worker.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from shared.schema import FinetuneRequest
from shared.settings import Settings
from worker.pipeline.errors import StopReason

SPEC_FILE = "spec.json"
SPEC_READ_PREFIX = "spec-read-rank-"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop"
ALIVE_FILE = "worker-alive"


@dataclass(frozen=True)
class GroupSpec:
    """What every rank of the group needs to run its share of the attempt."""

    request: FinetuneRequest
    settings: Settings
    job_id: str
    attempt: int
    memory_rung: int
    hub_cache_dir: Path | None

    def write(self, directory: Path) -> None:
        fields = {
            "request": self.request.model_dump(mode="json"),
            "settings": self.settings.model_dump(mode="python"),
            "job_id": self.job_id,
            "attempt": self.attempt,
            "memory_rung": self.memory_rung,
            "hub_cache_dir": str(self.hub_cache_dir) if self.hub_cache_dir else None,
        }
        path = directory / SPEC_FILE
        # The request's tokens and the storage credentials: readable by this user only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(fields, out, default=_plain)

    @classmethod
    def read(cls, directory: Path, rank: int) -> GroupSpec:
        """The spec, read by `rank`, which says so: once every rank has, the worker deletes
        the file (`forget_spec_once_read`) and its secrets with it."""
        fields = json.loads((directory / SPEC_FILE).read_text(encoding="utf-8"))
        (directory / f"{SPEC_READ_PREFIX}{rank}").touch()
        hub_cache = fields["hub_cache_dir"]
        return cls(
            request=FinetuneRequest.model_validate(fields["request"]),
            settings=Settings(**fields["settings"]),
            job_id=fields["job_id"],
            attempt=int(fields["attempt"]),
            memory_rung=int(fields["memory_rung"]),
            hub_cache_dir=Path(hub_cache) if hub_cache else None,
        )


def forget_spec_once_read(directory: Path, ranks: int) -> bool:
    """Delete the spec once each of `ranks` ranks has read it; whether it is gone."""
    spec = directory / SPEC_FILE
    if not spec.exists():
        return True
    if len(list(directory.glob(f"{SPEC_READ_PREFIX}*"))) < ranks:
        return False
    spec.unlink()
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value)  # paths


def request_stop(directory: Path, reason: StopReason) -> None:
    """Ask the group to stop; its ranks agree on it at the end of their current step."""
    temporary = directory / f"{STOP_FILE}.new"
    temporary.write_text(reason.value, encoding="utf-8")
    temporary.replace(directory / STOP_FILE)  # whole or absent, never half written


def mark_alive(directory: Path) -> None:
    """The worker is there: it renews the lease and would pass on a stop."""
    (directory / ALIVE_FILE).touch()


def requested_stop(directory: Path) -> StopReason | None:
    try:
        return StopReason(directory.joinpath(STOP_FILE).read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return None


class EventWriter:
    """Rank 0's `JobReporter`: every report becomes a line of `events.jsonl`; a stop is what
    the worker asked for in `stop`, or a lost lease once the worker has not been seen for
    `lease_seconds` (stopped with SIGSTOP, or stuck: its heartbeat is not renewing the lease
    either, and another attempt may own the job by now)."""

    def __init__(self, directory: Path, lease_seconds: float) -> None:
        self.directory = directory
        self.lease_seconds = lease_seconds
        self._out = (directory / EVENTS_FILE).open("a", encoding="utf-8")

    def _emit(self, event: dict[str, Any]) -> None:
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def phase(self, name: str) -> None:
        self._emit({"kind": "phase", "name": name})

    def log(self, line: str) -> None:
        self._emit({"kind": "log", "line": line})

    def warn(self, warning: str) -> None:
        self._emit({"kind": "warn", "warning": warning})

    def metric(self, step: int, values: dict[str, float]) -> None:
        self._emit({"kind": "metric", "step": step, "values": values})

    def progress(self, fraction: float) -> None:
        self._emit({"kind": "progress", "fraction": fraction})

    def checkpoint_saved(self, step: int, line: str) -> None:
        self._emit({"kind": "checkpoint_saved", "step": step, "line": line})

    def should_stop(self) -> StopReason | None:
        asked = requested_stop(self.directory)
        if asked is None and self._worker_silent_for() > self.lease_seconds:
            return StopReason.LEASE_LOST
        return asked

    def _worker_silent_for(self) -> float:
        try:
            return time.time() - (self.directory / ALIVE_FILE).stat().st_mtime
        except FileNotFoundError:
            return 0.0  # a group started by hand, without a worker watching

    def outcome(self, kind: str, **fields: Any) -> None:
        """The group's last word: `trained`, `stopped`, `failed`, `out_of_memory`,
        `storage_unreachable` or `crashed`, with what the worker needs to act on it."""
        self._emit({"kind": "outcome", "outcome": kind, **fields})


class SilentReporter:
    """The `JobReporter` of ranks other than 0: they train; rank 0 speaks for the group. Only
    an outcome of their own (a rank that failed alone) is written, to `outcome-rank-N.json`."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.path = directory / f"outcome-rank-{rank}.json"

    def outcome(self, kind: str, **fields: Any) -> None:
        self.path.write_text(json.dumps({"kind": "outcome", "outcome": kind, **fields}),
                             encoding="utf-8")

    def phase(self, name: str) -> None: ...
    def log(self, line: str) -> None: ...
    def warn(self, warning: str) -> None: ...
    def metric(self, step: int, values: dict[str, float]) -> None: ...
    def progress(self, fraction: float) -> None: ...
    def checkpoint_saved(self, step: int, line: str) -> None: ...

    def should_stop(self) -> StopReason | None:
        return None


class DiscardReports:
    """Where the reports of a group whose lease is not held go: nowhere. Another attempt may
    own the job by now, and its log and metrics are not this one's to write into."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class EventReader:
    """Follows `events.jsonl` from where it last stopped reading; hands each report to a
    `JobReporter` and keeps the phase and the outcome."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / EVENTS_FILE
        self._offset = 0
        self.phase: str | None = None
        self.outcome: dict[str, Any] | None = None

    def any_outcome(self) -> dict[str, Any] | None:
        """Rank 0's outcome, or else the first other rank's (one that failed alone)."""
        if self.outcome is not None:
            return self.outcome
        for path in sorted(self.directory.glob("outcome-rank-*.json")):
            return dict(json.loads(path.read_text(encoding="utf-8")))
        return None

    def relay(self, reporter: Any) -> None:
        """Pass every complete new line to `reporter`; a line still being written waits."""
        try:
            with self.path.open("rb") as events:
                events.seek(self._offset)
                data = events.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].splitlines():
            self._replay(json.loads(raw), reporter)

    def _replay(self, event: dict[str, Any], reporter: Any) -> None:
        kind = event["kind"]
        if kind == "phase":
            self.phase = event["name"]
            reporter.phase(event["name"])
        elif kind == "log":
            reporter.log(event["line"])
        elif kind == "warn":
            reporter.warn(event["warning"])
        elif kind == "metric":
            reporter.metric(int(event["step"]), event["values"])
        elif kind == "progress":
            reporter.progress(float(event["fraction"]))
        elif kind == "checkpoint_saved":
            reporter.checkpoint_saved(int(event["step"]), event["line"])
        elif kind == "outcome":
            self.outcome = event
