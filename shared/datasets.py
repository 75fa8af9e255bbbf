"""Datasets uploaded to Tunery: checking a received file, storing it, and every write to a
`datasets` row.

A file is parsed completely before it becomes a dataset, so a job that names a dataset id can
only fail on its content for reasons the template decides (missing columns are caught at
submit too). Two ways in:

- `POST /v1/datasets`: the API receives the file and calls `create_dataset`.
- MonsterAPI's flow, `GET /v1/upload`: `start_upload` makes a `pending` row and, on S3, a
  presigned PUT URL to a staging key (`upload_staging_prefix`). With local storage the API
  receives the PUT itself and calls `finish_upload`; with S3 nobody is told when the PUT
  ends, so `check_pending` finishes the upload the first time the dataset is referenced.

Only checked files live under `dataset_prefix`, whose file name always carries the format
suffix, so the worker needs no database to read one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from shared.dataset_columns import MESSAGES_COLUMN, is_chat_template, missing_columns
from shared.dataset_files import (
    MAX_NESTING,
    DatasetFileError,
    TooManyRows,
    detect_format,
    format_of_name,
    summarize_file,
)
from shared.loss_mask import LossMaskError, check_turns, is_trained
from shared.models import Dataset, DatasetStatus, Job, JobStatus, utcnow
from shared.openai_training_file import TrainingFileChecker, not_json_lines
from shared.prompt_template import Example, render_preview
from shared.schema import template_placeholders
from shared.settings import get_settings
from shared.storage import ObjectNotFound, Storage, StorageUnreachable
from shared.storage_keys import (
    dataset_key,
    dataset_prefix,
    tokenized_prefix,
    upload_staging_prefix,
)
from shared.tenancy import Scope, newest_first, page_after, visible_to

FIRST_ROWS = 5
# Rows kept in the database for previews, and the bounds that keep that sample small even
# for wide or long-text datasets.
SAMPLE_ROWS = 20
MAX_SAMPLE_CELL_CHARS = 4000
MAX_SAMPLE_CHARS = 256 * 1024
MAX_NAME_CHARS = 100
# A preview shows at most this many characters of each prompt and each completion (flagged
# when cut), so its answer stays under SAMPLE_ROWS * 2 * PREVIEW_PART_CHARS characters of
# examples plus a message of at most PREVIEW_MESSAGE_CHARS, whatever the template repeats.
PREVIEW_PART_CHARS = 2000
PREVIEW_MESSAGE_CHARS = 2000

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class DatasetNotFound(LookupError):
    pass


class DatasetRejected(ValueError):
    """The file is not a usable dataset; the message says why (and where, for parse errors)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.message, self.too_large = message, too_large


class DatasetInUse(Exception):
    """A dataset that queued, running or paused jobs still train on."""

    def __init__(self, dataset_id: str, job_ids: list[str]) -> None:
        self.message = (
            f"dataset {dataset_id} is the data_path or validation_data_path of active jobs "
            f"{job_ids}; wait for them to end or cancel them, then delete it"
        )
        super().__init__(self.message)
        self.job_ids = job_ids


class UploadRefused(Exception):
    """A PUT to the local upload route that cannot be accepted (bad token, already done)."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.message, self.conflict = message, conflict


@dataclass(frozen=True)
class Preview:
    placeholders: list[str]
    completion_placeholder: str
    """The last placeholder: the loss is computed on its value and the text after it."""
    missing_columns: list[str]
    examples: list[Example]
    problems: list[str | None]
    """For each example, why a job would fail on its row or leave it out; None when it
    trains."""
    chat: bool
    """The template is `{messages}`: examples show each conversation as readable
    `role: content` lines, not through the model's chat template."""
    rows: list[dict[str, Any]]
    """The rows the examples were rendered from."""


def new_dataset_id() -> str:
    return f"ds_{uuid.uuid4().hex}"


def safe_file_name(name: str | None, fmt: str | None = None) -> str:
    """A storage-safe version of a client's file name, ending in `.{fmt}` when given.

    Only the last path segment is kept and anything outside ``[A-Za-z0-9._-]`` becomes "_",
    so a name can neither escape its dataset's folder nor confuse a URL.
    """
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE_NAME_CHARS.sub("_", base).lstrip(".-_") or "dataset"
    if len(base) > MAX_NAME_CHARS:
        stem, dot, suffix = base.rpartition(".")
        base = stem[: MAX_NAME_CHARS - len(suffix) - 1] + dot + suffix if dot else base
        base = base[:MAX_NAME_CHARS]
    if fmt is not None and format_of_name(base) != fmt:
        base = f"{base}.{fmt}"
    return base


def create_dataset(
    session: Session,
    storage: Storage,
    tenant_id: str,
    path: Path,
    *,
    name: str | None,
    content_type: str | None,
    max_bytes: int,
    check_openai: bool = False,
) -> Dataset:
    """Check the received file at `path`, store it and add a `ready` row (not committed).

    Raises `DatasetRejected` (nothing stored) when the file is too large, empty or unparseable.
    With `check_openai` (a file uploaded for OpenAI fine-tuning), the row's `openai_check` also
    says what OpenAI's rules for training files find in it (`shared.openai_training_file`);
    a file they refuse is still stored, as OpenAI keeps it: the job that names it fails.
    """
    dataset = Dataset(
        id=new_dataset_id(),
        tenant_id=tenant_id,
        name=safe_file_name(name),
        status=DatasetStatus.PENDING.value,
        storage_key="",
    )
    _store_checked(storage, dataset, path, content_type, max_bytes, check_openai=check_openai)
    session.add(dataset)
    return dataset


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant's datasets take: their number (pending and failed ones included) and the
    bytes of their stored files."""

    datasets: int
    bytes: int


def tenant_usage(session: Session, tenant_id: str) -> TenantUsage:
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
            Dataset.tenant_id == tenant_id
        )
    ).one()
    return TenantUsage(int(count), int(size or 0))


def dataset_count_problem(usage: TenantUsage, max_datasets: int) -> str | None:
    """Why the tenant may not add one more dataset (TUNERY_MAX_TENANT_DATASETS); None if it
    may. 0 means no limit."""
    if max_datasets and usage.datasets >= max_datasets:
        return (
            f"this tenant has {usage.datasets} datasets, the most this server keeps per tenant "
            f"is {max_datasets} (TUNERY_MAX_TENANT_DATASETS); delete some with "
            "DELETE /v1/datasets/{id}"
        )
    return None


def dataset_bytes_problem(usage: TenantUsage, new_bytes: int, max_bytes: int) -> str | None:
    """Why a file of `new_bytes` would not fit in the tenant's storage quota
    (TUNERY_MAX_TENANT_DATASET_BYTES); None if it fits. 0 means no limit."""
    if max_bytes and usage.bytes + new_bytes > max_bytes:
        file = f"a file of {new_bytes} bytes does not fit" if new_bytes else "no file fits"
        return (
            f"this tenant's datasets use {usage.bytes} bytes of the {max_bytes} this server "
            f"keeps per tenant (TUNERY_MAX_TENANT_DATASET_BYTES); {file}: delete datasets "
            "with DELETE /v1/datasets/{id}"
        )
    return None


def jobs_using(session: Session, dataset: Dataset) -> list[str]:
    """Ids of the QUEUED, RUNNING or PAUSED jobs of the dataset's tenant that train or
    evaluate on it, as data_path or validation_data_path (a paused job reads both again when
    resumed). A tenant has few active jobs (TUNERY_MAX_ACTIVE_JOBS_PER_TENANT), so their
    payloads are read here rather than queried as JSON, which SQLite and PostgreSQL spell
    differently."""
    active = session.execute(
        select(Job.id, Job.payload).where(
            Job.tenant_id == dataset.tenant_id,
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value,
                            JobStatus.PAUSED.value]),
        )
    ).all()
    return [
        job_id for job_id, payload in active
        if isinstance(payload, dict)
        and isinstance(payload.get("data_config"), dict)
        and dataset.id in (payload["data_config"].get("data_path"),
                           payload["data_config"].get("validation_data_path"))
    ]


def delete_dataset(session: Session, storage: Storage, dataset: Dataset) -> None:
    """Remove the dataset's stored objects, then its row (not committed). Raises
    `DatasetInUse` while an active job trains on it.

    Objects go first: if removing them fails, the row stays and the delete can be retried;
    a row without its file could only fail the jobs that name it."""
    using = jobs_using(session, dataset)
    if using:
        raise DatasetInUse(dataset.id, using)
    discard_objects(storage, dataset.id)
    session.delete(dataset)


def get_dataset(session: Session, scope: Scope, dataset_id: str) -> Dataset:
    """The dataset, if `scope` (a tenant id, or ALL_TENANTS for an admin key) may see it;
    another tenant's is indistinguishable from a missing one."""
    dataset = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, visible_to(scope, Dataset.tenant_id))
    )
    if dataset is None:
        raise DatasetNotFound(dataset_id)
    return dataset


def list_datasets(
    session: Session, scope: Scope, limit: int, offset: int
) -> tuple[list[Dataset], int]:
    return newest_first(session, Dataset, scope, limit, offset)


def datasets_after(
    session: Session, scope: Scope, after_id: str | None, limit: int, *,
    descending: bool = True, filters: Sequence[ColumnElement[bool]] = (),
) -> tuple[list[Dataset], bool]:
    """A page of the datasets `scope` sees after the dataset `after_id`, and whether more
    follow (`shared.tenancy.page_after`)."""
    return page_after(session, Dataset, scope, after_id=after_id, limit=limit,
                      descending=descending, filters=filters)


def start_upload(
    session: Session, storage: Storage, tenant_id: str, filename: str, expires_s: int
) -> tuple[Dataset, str, str | None]:
    """Add a `pending` dataset for MonsterAPI's upload flow (not committed).

    Returns the row, the upload token (shown once; only its hash is stored) and the store's
    presigned PUT URL, or None when the API must receive the PUT itself (local storage).
    """
    dataset_id = new_dataset_id()
    name = safe_file_name(filename)
    token = secrets.token_urlsafe(32)
    upload_url = storage.presigned_upload_url(upload_staging_prefix(dataset_id) + name, expires_s)
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name,
        status=DatasetStatus.PENDING.value,
        storage_key=upload_staging_prefix(dataset_id) + name,
        upload_token_hash=_token_hash(token),
        upload_expires_at=utcnow() + timedelta(seconds=expires_s),
    )
    session.add(dataset)
    return dataset, token, upload_url


def dataset_for_upload(session: Session, dataset_id: str, token: str) -> Dataset:
    """The pending dataset `token` may upload to, or `UploadRefused`.

    A wrong token and an unknown id give the same answer, so tokens cannot be used to probe
    for ids.
    """
    dataset = session.get(Dataset, dataset_id)
    if (
        dataset is None
        or dataset.upload_token_hash is None
        or not hmac.compare_digest(dataset.upload_token_hash, _token_hash(token))
    ):
        raise UploadRefused("invalid upload URL: unknown upload or wrong token")
    if dataset.status != DatasetStatus.PENDING.value:
        raise UploadRefused(
            f"upload {dataset_id} is already {dataset.status}; ask GET /v1/upload for a new URL",
            conflict=True,
        )
    expires = dataset.upload_expires_at
    if expires is not None and _aware(expires) < utcnow():
        raise UploadRefused("this upload URL has expired; ask GET /v1/upload for a new one")
    return dataset


def finish_upload(
    storage: Storage, dataset: Dataset, path: Path, *, content_type: str | None, max_bytes: int,
    check_openai: bool = False,
) -> None:
    """Check and store the file received for a pending upload; the row becomes `ready`, or
    `failed` with the reason (then `DatasetRejected` is raised). The caller commits either
    way: a failed upload stays failed, and its URL is spent (a PUT to it gets 409).
    `check_openai` as for `create_dataset`."""
    try:
        _store_checked(storage, dataset, path, content_type, max_bytes,
                       check_openai=check_openai)
    except DatasetRejected as exc:
        _mark(dataset, DatasetStatus.FAILED, error=exc.message)
        raise


def check_pending(
    storage: Storage, dataset: Dataset, work_dir: Path, *, max_bytes: int,
    quota_problem: Callable[[int], str | None] | None = None, check_openai: bool = False,
) -> None:
    """Finish an S3 upload whose bytes arrived by presigned PUT; no-op for other states.

    Raises `DatasetRejected` (row now `failed`) when the file does not pass, or when
    `quota_problem` finds a reason its size cannot be kept (a presigned PUT cannot be refused
    while it happens); the caller commits either way. `check_openai` as for `create_dataset`.
    """
    if dataset.status != DatasetStatus.PENDING.value:
        return
    prefix = upload_staging_prefix(dataset.id)
    staged = storage.list(prefix)
    if not staged:
        return  # the client has not uploaded yet
    try:
        if staged[0].size > max_bytes:
            raise DatasetRejected(_too_large(dataset.name, max_bytes), too_large=True)
        problem = quota_problem(staged[0].size) if quota_problem else None
        if problem:
            raise DatasetRejected(problem, too_large=True)
        local = work_dir / dataset.name
        storage.download_file(staged[0].key, local)
        finish_upload(storage, dataset, local, content_type=None, max_bytes=max_bytes,
                      check_openai=check_openai)
    except DatasetRejected as exc:
        _mark(dataset, DatasetStatus.FAILED, error=exc.message)
        raise
    except ObjectNotFound:
        return  # a concurrent request finished it first
    finally:
        if dataset.status != DatasetStatus.PENDING.value:
            storage.delete_prefix(prefix)


def not_ready_reason(dataset: Dataset) -> str | None:
    """Why a job or a preview cannot use `dataset` yet; None when it is ready."""
    if dataset.status == DatasetStatus.READY.value:
        return None
    if dataset.status == DatasetStatus.FAILED.value:
        return f"dataset {dataset.id} was rejected: {dataset.error}"
    return (
        f"dataset {dataset.id} has not been uploaded yet: PUT the file to the upload_url "
        "GET /v1/upload returned"
    )


def first_rows(dataset: Dataset) -> list[dict[str, Any]]:
    return (dataset.sample_rows or [])[:FIRST_ROWS]


def preview(dataset: Dataset, template: str, n: int) -> Preview:
    """The first `n` (at most SAMPLE_ROWS) rows rendered with `template`, each prompt and
    completion cut at PREVIEW_PART_CHARS; placeholders the dataset lacks render as "" and are
    listed in `missing_columns`. A `{messages}` template (chat mode) shows each conversation
    as `chat_preview` does: the model's chat template needs its tokenizer
    (`shared.token_preview`)."""
    columns = dataset.columns or []
    rows = (dataset.sample_rows or [])[:n]
    chat = is_chat_template(template)
    problems: list[str | None]
    if chat:
        shown = [chat_preview(row, number) for number, row in enumerate(rows, start=1)]
        examples, problems = [e for e, _ in shown], [p for _, p in shown]
    else:
        examples = [render_preview(row, template, max_part_chars=PREVIEW_PART_CHARS)
                    for row in rows]
        problems = [None] * len(examples)
    placeholders = template_placeholders(template)
    return Preview(
        placeholders=list(dict.fromkeys(placeholders)),
        completion_placeholder=placeholders[-1],
        missing_columns=missing_columns(template, columns),
        examples=examples,
        problems=problems,
        chat=chat,
        rows=rows,
    )


def chat_preview(row: dict[str, Any], row_number: int) -> tuple[Example, str | None]:
    """A chat row readable without the model: the prompt is the turns before the last
    trained assistant turn as `role: content` lines (an assistant's tool calls as
    `name(arguments)`), then `assistant: `; the completion is that turn's content and any
    turns after it. Each part cut at PREVIEW_PART_CHARS. Also why a job would fail on the row
    (its `messages` are not turns) or leave it out (no assistant turn of weight other than
    0), or None."""
    try:
        turns = check_turns(row.get(MESSAGES_COLUMN), row_number)
    except LossMaskError as exc:
        return Example("", ""), str(exc)
    assistant = [i for i, turn in enumerate(turns) if is_trained(turn)]
    if not assistant:
        lines = "".join(f"{t['role']}: {_turn_text(t)}\n" for t in turns)
        return _cut_example(lines, ""), (
            f"row {row_number} has no assistant turn to train on (those of weight 0 are not "
            "trained): the loss is computed on assistant turns only, so a job leaves it out "
            "(unless train_on_inputs)")
    last = assistant[-1]
    prompt = "".join(f"{t['role']}: {_turn_text(t)}\n" for t in turns[:last]) + "assistant: "
    completion = _turn_text(turns[last]) + "".join(
        f"\n{t['role']}: {_turn_text(t)}" for t in turns[last + 1:])
    return _cut_example(prompt, completion), None


def _turn_text(turn: Mapping[str, Any]) -> str:
    if isinstance(turn.get("content"), str):
        return str(turn["content"])
    functions = [call.get("function") for call in turn.get("tool_calls") or []
                 if isinstance(call, Mapping)]
    return "; ".join(f"{f.get('name')}({f.get('arguments')})" for f in functions
                     if isinstance(f, Mapping))


def _cut_example(prompt: str, completion: str) -> Example:
    return Example(prompt[:PREVIEW_PART_CHARS], completion[:PREVIEW_PART_CHARS],
                   len(prompt) > PREVIEW_PART_CHARS, len(completion) > PREVIEW_PART_CHARS)


def _store_checked(
    storage: Storage, dataset: Dataset, path: Path, content_type: str | None, max_bytes: int,
    *, check_openai: bool = False,
) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetRejected(_too_large(dataset.name, max_bytes), too_large=True)
    fmt = detect_format(path, dataset.name, content_type)
    # OpenAI's rules see each row as the one pass that validates the file reads it.
    openai = TrainingFileChecker() if check_openai and fmt in ("jsonl", "json") else None
    try:
        summary = summarize_file(path, fmt, name=dataset.name, keep_rows=SAMPLE_ROWS,
                                 max_rows=get_settings().limits.max_dataset_rows,
                                 each_row=openai.add if openai is not None else None)
    except TooManyRows as exc:
        # 413 like max_dataset_bytes: the file is valid, only bigger than this server takes.
        raise DatasetRejected(str(exc), too_large=True) from None
    except DatasetFileError as exc:
        raise DatasetRejected(str(exc)) from None
    except RecursionError:
        raise DatasetRejected(_too_deep(dataset.name)) from None
    if summary.rows == 0:
        raise DatasetRejected(f"{dataset.name} has no rows")
    # Everything that can refuse the file runs before it is stored: nothing is left behind.
    sample = _sample(summary.first_rows, dataset.name)
    key = dataset_key(dataset.id, safe_file_name(dataset.name, fmt))
    try:
        storage.put_file(key, path)
    except StorageUnreachable:
        # Cleaning up would wait as long again on a store that does not answer, and an
        # object the store still takes in afterwards has no row: the maintenance sweep
        # removes it (`shared.orphaned_objects`).
        raise
    except BaseException:
        discard_objects(storage, dataset.id)  # a partial object must not stay behind
        raise
    dataset.format, dataset.size_bytes, dataset.storage_key = fmt, size, key
    dataset.rows, dataset.columns = summary.rows, summary.columns
    dataset.csv_delimiter = summary.csv_delimiter
    dataset.sample_rows = sample
    if check_openai:
        dataset.openai_check = (openai.result() if openai is not None
                                else not_json_lines(fmt)).to_json()
    _mark(dataset, DatasetStatus.READY, error=None)


def discard_objects(storage: Storage, dataset_id: str) -> None:
    """Remove everything stored for the dataset: its checked file, any staged upload and the
    tokenized examples jobs kept of it."""
    storage.delete_prefix(dataset_prefix(dataset_id))
    storage.delete_prefix(upload_staging_prefix(dataset_id))
    storage.delete_prefix(tokenized_prefix(dataset_id))


def _sample(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """JSON-safe copies of the first rows within the size budget (at least one row)."""
    sample: list[dict[str, Any]] = []
    used = 0
    for row in rows:
        try:
            safe = {str(k): _json_safe(v) for k, v in row.items()}
            used += len(str(safe))
        except RecursionError:
            # The readers refuse rows nested past MAX_NESTING; this keeps any other deep
            # value a clear refusal rather than an internal error.
            raise DatasetRejected(_too_deep(name)) from None
        if sample and used > MAX_SAMPLE_CHARS:
            break
        sample.append(safe)
    return sample


def _json_safe(value: Any) -> Any:
    # PostgreSQL's JSON type refuses NaN and Infinity; parquet cells may be dates or bytes.
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SAMPLE_CELL_CHARS:
        return text[:MAX_SAMPLE_CELL_CHARS] + "…"
    return text


def _mark(dataset: Dataset, status: DatasetStatus, *, error: str | None) -> None:
    dataset.status, dataset.error, dataset.updated_at = status.value, error, utcnow()


def _too_deep(name: str) -> str:
    return (f"{name}: a row nests objects or arrays deeper than {MAX_NESTING} levels, the "
            "most this server accepts")


def _too_large(name: str, max_bytes: int) -> str:
    return f"{name} is larger than the {max_bytes} bytes this server accepts"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; Tunery writes them all in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
