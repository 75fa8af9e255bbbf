"""`POST /v1/fine_tuning/jobs`: an OpenAI job-creation body checked and stored as a Tunery
job.

The files were checked by OpenAI's rules when they arrived (`shared.openai_training_file`),
so the job is validated here at once: a bad training or validation file makes a job that is
`failed` from the start with OpenAI's error code and the line at fault, as OpenAI's validation
would end; anything else wrong with the request is a 400 naming its field, and no job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.openai import ids
from api.openai.job_request import (
    Resolved,
    method_of,
    new_seed,
    openai_param,
    resolve,
    training_payload,
)
from api.openai.schemas import JobCreate
from api.preflight.checks import Preflight
from shared import datasets, jobs
from shared.device_classes import JobNeeds, NoDeviceClass, route
from shared.jobs import NewJob
from shared.models import Dataset, DatasetStatus, JobStatus
from shared.openai_training_file import (
    FileProblem,
    TrainingFileCheck,
    method_mismatch,
    validation_file_problem,
)
from shared.schema import FinetuneRequest
from shared.settings import Settings
from shared.storage import Storage

# Names of OpenAI's own models, which only OpenAI trains.
_OPENAI_MODEL = re.compile(r"(gpt-|o[0-9]|davinci|babbage|ft:)", re.IGNORECASE)
# Which columns make a dataset uploaded through `/v1/datasets` one of OpenAI's kinds.
_KIND_COLUMNS = (("chat", {"messages"}), ("prompt_completion", {"prompt", "completion"}),
                 ("preference", {"input", "preferred_output", "non_preferred_output"}))


@dataclass(frozen=True)
class Created:
    job: NewJob
    queued: bool
    """False when the training file failed validation: the job was created `failed`."""


def create_openai_job(session: Session, storage: Storage, settings: Settings, tenant_id: str,
                      body: JobCreate) -> Created:
    method, asked = method_of(body)
    if method == "reinforcement":
        _refuse("method.type", "reinforcement fine-tuning is not supported; use 'supervised' "
                               "or 'dpo'")
    model = settings.openai.model_aliases.get(body.model, body.model)
    if model == body.model and _OPENAI_MODEL.match(model):
        _refuse("model", f"{model!r} is one of OpenAI's models, which only OpenAI trains; name "
                         "an open model (a hub id such as 'Qwen/Qwen2.5-7B-Instruct', or one "
                         "your operator allows), or ask your operator for an alias "
                         "(TUNERY_OPENAI_MODEL_ALIASES)")
    wandb_key = ""
    if body.integrations:
        key = settings.openai.wandb_api_key
        if key is None:
            _refuse("integrations", "this server has no W&B key for integrations (its "
                                    "operator sets TUNERY_OPENAI_WANDB_API_KEY)")
        wandb_key = key.get_secret_value()
    training = _uploaded_file(session, tenant_id, body.training_file, "training_file")
    check = _file_check(training)
    problem = check.problem or method_mismatch(
        check, "dpo" if method == "dpo" else "supervised", file_id=body.training_file)
    failure = None if problem is None else _Failure(problem, "training_file")
    validation = None
    if body.validation_file is not None:
        validation = _uploaded_file(session, tenant_id, body.validation_file, "validation_file")
        problem = validation_file_problem(_file_check(validation), check,
                                          file_id=body.validation_file)
        if failure is None and problem is not None:
            failure = _Failure(problem, "validation_file")
    resolved = resolve(asked, check.examples)
    seed = body.seed if body.seed is not None else new_seed()
    payload = training_payload(
        body.model_copy(update={"model": model}), dataset_id=training.id, kind=check.kind,
        method=method, resolved=resolved, seed=seed, cutoff_len=settings.openai.cutoff_len,
        wandb_key=wandb_key, validation_dataset_id=validation.id if validation else None)
    preflight = Preflight(session, storage, settings, tenant_id, dry_run=False)
    try:
        request = preflight.parse(payload)
        if failure is None:
            preflight.check(request)
    except ApiError as exc:
        raise _in_openai_terms(exc) from None
    job = jobs.create_job(session, tenant_id, request, settings.leases.max_attempts,
                          device_class=_device_class(preflight, request, settings),
                          warnings=preflight.job_warnings,
                          openai=_fields(body, method, asked.model_dump(), resolved, failure))
    if failure is not None:
        jobs.transition(session, job.id, JobStatus.FAILED, reason=failure.problem.message,
                        error_code=failure.problem.code)
    return Created(job, queued=failure is None)


def _device_class(preflight: Preflight, request: FinetuneRequest, settings: Settings) -> str:
    """The class `preflight.check` routed the job to; for a job created failed, which never
    runs and was not checked, the class it would have gone to, or the first when none fits."""
    if preflight.routing is not None:
        return preflight.device_class
    try:
        return route(settings.broker.device_classes, JobNeeds(
            devices=request.training_config.devices, strategy=request.training_config.strategy,
            quantized=request.pretrainedmodel_config.use_quantization, size=None,
            full_finetune=not request.pretrainedmodel_config.use_lora)
        ).device_class.name
    except NoDeviceClass:
        return settings.broker.device_classes[0].name


@dataclass(frozen=True)
class _Failure:
    """Why the job fails at once, and the body field (`error.param`) at fault."""

    problem: FileProblem
    param: str


def _refuse(param: str, message: str) -> NoReturn:
    raise ApiError(422, "invalid_request", message, [{"path": param, "message": message}])


def _uploaded_file(session: Session, tenant_id: str, file_id: str, param: str) -> Dataset:
    """The caller's ready file `file_id`, named by the body field `param`; a 400 naming it
    otherwise."""
    dataset_id = ids.dataset_id(file_id)
    try:
        if dataset_id is None:
            raise datasets.DatasetNotFound(file_id)
        dataset = datasets.get_dataset(session, tenant_id, dataset_id)
    except datasets.DatasetNotFound:
        _refuse(param, f"no file with id {file_id}; upload it with "
                       "client.files.create(file=..., purpose='fine-tune')")
    if dataset.status != DatasetStatus.READY.value:
        _refuse(param, f"file {file_id} is not ready: {dataset.error or dataset.status}")
    return dataset


def _file_check(dataset: Dataset) -> TrainingFileCheck:
    """The check made when the file arrived; a dataset uploaded through `/v1/datasets` had
    none, and is classified by its columns (the worker checks its rows as it reads them)."""
    if dataset.openai_check is not None:
        return TrainingFileCheck.from_json(dataset.openai_check)
    columns = set(dataset.columns or [])
    kind = next((k for k, needed in _KIND_COLUMNS if needed <= columns), None)
    problem = None if kind else FileProblem(
        "invalid_training_file", "the file has none of OpenAI's formats: no 'messages', "
        "'prompt' and 'completion', or 'input' and 'preferred_output' columns", None)
    return TrainingFileCheck(kind=kind, examples=dataset.rows or 0,  # type: ignore[arg-type]
                             problem=problem)


def _fields(body: JobCreate, method: str, asked: dict, resolved: Resolved,
            failure: _Failure | None) -> dict:
    fields = {
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "suffix": body.suffix,
        "metadata": body.metadata,
        "method": method,
        "asked": asked,
        "resolved": resolved.to_json(),
        "integrations": [i.model_dump() for i in body.integrations or []] or None,
    }
    if failure is not None:
        fields["error_param"] = failure.param
    return fields


def _in_openai_terms(exc: ApiError) -> ApiError:
    """The preflight's refusal, its field paths those of OpenAI's body."""
    fields = [{"path": openai_param(f["path"]), "message": f["message"]} for f in exc.fields]
    message = "; ".join(f"{f['path']}: {f['message']}" for f in fields) or exc.message
    return ApiError(exc.status, exc.code, message, fields, exc.headers)
