"""`data_config.data_path` and `validation_data_path`: whether the job can read their rows,
and what is known of them.

An uploaded dataset must be the caller's, checked and hold the columns the job reads; its
rows, columns and format are on its row. A local file must lie in an allowed directory, a URL
must resolve to an address this server may fetch, a hub dataset must exist (asked only in a
dry run). Of the last three nothing more is known until the worker reads them. A validation
dataset is always an uploaded one (the schema refuses anything else), checked as data_path's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from api.dataset_lookup import resolve_dataset
from api.preflight.body import Problem
from api.preflight.hub import HubClient
from api.schemas import PreflightDataset
from shared import datasets
from shared.dataset_columns import is_preference, missing_job_columns_message
from shared.dataset_files import format_of_name
from shared.models import Dataset
from shared.schema import DataConfig, TrainingConfig
from shared.settings import Settings
from shared.sources import (
    Source,
    SourceError,
    check_source_type,
    check_url_source_resolves,
    classify_source,
)
from shared.storage import Storage
from shared.training_plan import split_sizes
from shared.url_guard import UrlPolicy, redact_url

FIELD = "data_config.data_path"
VALIDATION_FIELD = "data_config.validation_data_path"
UNKNOWN_ROWS = "rows unknown until the worker reads it"


@dataclass
class DatasetFindings:
    report: PreflightDataset | None = None
    uploaded: Dataset | None = None
    """The uploaded dataset, when data_path names one that the job can use."""
    validation: Dataset | None = None
    """The validation dataset, when validation_data_path names one that the job can use."""
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetContext:
    session: Session
    storage: Storage
    settings: Settings
    tenant_id: str
    hub: HubClient | None
    """None: the hub is not asked."""
    token: str | None


def check_dataset(data: DataConfig, training: TrainingConfig | None,
                  ctx: DatasetContext) -> DatasetFindings:
    """What is wrong with `data`'s source, and what is known of it. `training` (None when it
    did not pass the schema) says which columns the job reads."""
    url_policy = UrlPolicy.from_settings(ctx.settings.sources)
    try:
        source = classify_source(data.data_path, ctx.settings.sources.allowed_local_dirs,
                                 url_policy=url_policy)
    except SourceError as exc:
        return DatasetFindings(problems=[{"path": FIELD, "message": str(exc)}])
    if source.kind == "dataset":
        findings = _uploaded(data, training, ctx)
    elif source.kind == "url":
        findings = _url(source, url_policy)
    elif source.kind == "local":
        findings = _local(source)
    else:
        findings = _hub(source, ctx)
    try:
        check_source_type(source, data.data_source_type)
    except SourceError as exc:
        findings.problems.append({"path": "data_config.data_source_type", "message": str(exc)})
    if data.validation_data_path is not None:
        _check_validation(data, training, ctx, findings)
    return findings


def _ready_upload(ctx: DatasetContext, dataset_id: str) -> Dataset | str:
    """The caller's uploaded dataset `dataset_id` if a job can read it; else why not."""
    try:
        dataset = resolve_dataset(ctx.session, ctx.storage, ctx.settings, ctx.tenant_id,
                                  dataset_id)
    except datasets.DatasetNotFound:
        return f"no dataset with id {dataset_id}; GET /v1/datasets lists yours"
    except datasets.DatasetRejected as exc:
        return exc.message
    return datasets.not_ready_reason(dataset) or dataset


def _missing_columns(dataset: Dataset, data: DataConfig, training: TrainingConfig) -> str | None:
    return missing_job_columns_message(dataset.columns or [],
                                       prompt_template=data.prompt_template,
                                       preference_optimization=training.preference_optimization)


def _delimiter_warning(dataset: Dataset) -> str | None:
    if dataset.csv_delimiter in (None, ","):
        return None
    return (f"{dataset.name} is read as CSV with the delimiter {dataset.csv_delimiter!r} its "
            f"header suggests, not ','; its columns are {dataset.columns}")


def _uploaded(data: DataConfig, training: TrainingConfig | None,
              ctx: DatasetContext) -> DatasetFindings:
    dataset = _ready_upload(ctx, data.data_path)
    if isinstance(dataset, str):
        return _refused(dataset)
    train_rows, validation_rows = (split_sizes(dataset.rows, data.data_split_config)
                                   if dataset.rows is not None else (None, None))
    findings = DatasetFindings(PreflightDataset(
        kind="uploaded", data_path=dataset.id, checked=f"your uploaded dataset {dataset.name!r}",
        rows=dataset.rows, train_rows=train_rows, validation_rows=validation_rows,
        columns=dataset.columns, format=dataset.format, csv_delimiter=dataset.csv_delimiter,
    ), uploaded=dataset)
    warning = _delimiter_warning(dataset)
    if warning:
        findings.warnings.append(warning)
    if training is not None:
        message = _missing_columns(dataset, data, training)
        if message:
            path = ("training_config.preference_optimization"
                    if is_preference(training.preference_optimization)
                    else "data_config.prompt_template")
            findings.problems.append({"path": path, "message": message})
    return findings


def _check_validation(data: DataConfig, training: TrainingConfig | None, ctx: DatasetContext,
                      findings: DatasetFindings) -> None:
    """The validation dataset, checked as an uploaded data_path is: the caller's, ready, with
    the columns the job reads. Its problems name `VALIDATION_FIELD`; its rows go into the
    report's `validation_rows`."""
    assert data.validation_data_path is not None
    dataset = _ready_upload(ctx, data.validation_data_path)
    if isinstance(dataset, str):
        findings.problems.append({"path": VALIDATION_FIELD, "message": dataset})
        return
    findings.validation = dataset
    if findings.report is not None:
        findings.report.validation_rows = dataset.rows
        findings.report.checked += f"; validation: your uploaded dataset {dataset.name!r}"
    warning = _delimiter_warning(dataset)
    if warning:
        findings.warnings.append(f"{VALIDATION_FIELD}: {warning}")
    if dataset.id == data.data_path.strip():
        findings.warnings.append(
            f"{VALIDATION_FIELD} is data_path: the job evaluates on rows it trains on, so "
            "eval_loss says nothing of how it does on rows it has not seen")
    if training is not None:
        message = _missing_columns(dataset, data, training)
        if message:
            findings.problems.append({"path": VALIDATION_FIELD,
                                      "message": f"the validation dataset: {message}"})


def _url(source: Source, url_policy: UrlPolicy) -> DatasetFindings:
    try:
        check_url_source_resolves(source.value, url_policy)
    except SourceError as exc:
        return _refused(str(exc))
    return DatasetFindings(_unread(
        "url", redact_url(source.value),
        "the host resolves to addresses this server may fetch; the worker downloads the file",
        urlsplit(source.value).path.rsplit("/", 1)[-1],
    ))


def _local(source: Source) -> DatasetFindings:
    assert source.path is not None  # classify_source resolves local paths
    if source.path.is_file() or source.path.is_dir():
        return DatasetFindings(_unread(
            "local", source.value,
            f"the {'folder' if source.path.is_dir() else 'file'} exists in an allowed directory",
            source.path.name,
        ))
    # The worker may run on another host, where the path may exist.
    checked = f"not checked: {source.value!r} does not exist on the API's host"
    return DatasetFindings(_unread("local", source.value, checked),
                           warnings=[f"{FIELD}: {checked}; the worker looks for it on its own"])


def _hub(source: Source, ctx: DatasetContext) -> DatasetFindings:
    if ctx.hub is None:
        return DatasetFindings(_unread("hub", source.value, "not checked at submit"))
    answer = ctx.hub.lookup("datasets", source.value, ctx.token)
    if answer.status == "missing":
        detail = f" ({answer.detail})" if answer.detail else ""
        return _refused(f"no dataset {source.value!r} on the hub{detail}; check its spelling")
    if answer.status == "unchecked":
        checked = f"not checked: {answer.detail}"
        return DatasetFindings(_unread("hub", source.value, checked),
                               warnings=[f"{FIELD}: {checked}"])
    return DatasetFindings(_unread("hub", source.value, "found on the hub"))


def _unread(kind: Literal["local", "url", "hub"], shown: str, checked: str,
            file_name: str | None = None) -> PreflightDataset:
    """What is known of a dataset the worker has not read yet: where it is, perhaps the
    format its file name says."""
    return PreflightDataset(
        kind=kind, data_path=shown, checked=f"{checked}; {UNKNOWN_ROWS}", rows=None,
        train_rows=None, validation_rows=None, columns=None,
        format=format_of_name(file_name) if file_name else None, csv_delimiter=None,
    )


def _refused(message: str) -> DatasetFindings:
    return DatasetFindings(problems=[{"path": FIELD, "message": message}])
