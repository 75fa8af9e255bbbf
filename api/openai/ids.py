"""OpenAI-style ids for Tunery's rows: one mapping each way, so both dialects name the same
objects.

A file is an uploaded dataset (`ds_{hex}` is `file-{hex}`), a job keeps its id behind the
`ftjob-` prefix, a checkpoint is a job and a step, and an event is the row it is read from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The job's id has its owner in shared: webhooks name jobs in their bodies too.
from shared.job_ids import JOB_PREFIX as JOB_PREFIX
from shared.job_ids import job_id_of as job_id_of
from shared.job_ids import openai_job_id as openai_job_id

FILE_PREFIX = "file-"
CHECKPOINT_PREFIX = "ftckpt-"
EVENT_PREFIX = "ftevent-"
RESULT_FILE_PREFIX = "file-result-"
_DATASET_PREFIX = "ds_"

_HEX = re.compile(r"[0-9a-f]{32}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CHECKPOINT = re.compile(r"ftckpt-([0-9a-f]{32})-([1-9][0-9]{0,9})")
_EVENT = re.compile(r"ftevent-([slm])([0-9]{1,12})-([0-9])")


def file_id(dataset_id: str) -> str:
    return FILE_PREFIX + dataset_id.removeprefix(_DATASET_PREFIX)


def dataset_id(file_id: str) -> str | None:
    """The dataset a `file-…` id names; None when it is no such id (which reads as missing,
    like a file that does not exist)."""
    hex_part = file_id.removeprefix(FILE_PREFIX)
    if hex_part == file_id or not _HEX.fullmatch(hex_part):
        return None
    return _DATASET_PREFIX + hex_part


def result_file_id(job_id: str) -> str:
    return RESULT_FILE_PREFIX + job_id.replace("-", "")


def job_of_result_file(file_id: str) -> str | None:
    """The job whose result file `file_id` is; None for any other id."""
    hex_part = file_id.removeprefix(RESULT_FILE_PREFIX)
    if hex_part == file_id or not _HEX.fullmatch(hex_part):
        return None
    return _dashed(hex_part)


def checkpoint_id(job_id: str, step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{job_id.replace('-', '')}-{step}"


def checkpoint_step(checkpoint_id: str, job_id: str) -> int | None:
    """The step of `checkpoint_id` if it is one of `job_id`'s checkpoints, else None."""
    match = _CHECKPOINT.fullmatch(checkpoint_id)
    if match is None or match[1] != job_id.replace("-", ""):
        return None
    return int(match[2])


@dataclass(frozen=True, order=True)
class EventKey:
    """Where an event comes from: a status change (`s`), a log line (`l`) or a metrics row
    (`m`), the row's id, and which of the events read from that row (`part`)."""

    source: str
    row_id: int
    part: int = 0

    @property
    def id(self) -> str:
        return f"{EVENT_PREFIX}{self.source}{self.row_id}-{self.part}"


def event_key(event_id: str) -> EventKey | None:
    match = _EVENT.fullmatch(event_id)
    return None if match is None else EventKey(match[1], int(match[2]), int(match[3]))


def is_job_uuid(value: str) -> bool:
    return bool(_UUID.fullmatch(value))


def _dashed(hex_part: str) -> str:
    h = hex_part
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
