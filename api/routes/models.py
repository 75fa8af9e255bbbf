"""OpenAI's `/v1/models`: the base models this server offers for inference and the caller's
fine-tuned ones, which the caller may delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from api.inference.served import (
    ModelNotFound,
    ServedModel,
    fine_tuned_models,
    offered_bases,
    resolve_model,
)
from api.openai.schemas import ModelDeleted
from api.session_route import SessionRoute
from shared import job_deletion
from shared.models import Job

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/models", tags=["openai: inference"],
                   responses=OPENAI_AUTHENTICATED)

ModelName = Annotated[str, Path(min_length=1, max_length=512)]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def _model(served: ServedModel, session: SessionDep) -> Model:
    created = 0
    if served.job_id is not None:
        job = session.get(Job, served.job_id)
        moment = job.finished_at or job.created_at if job is not None else None
        created = int(moment.timestamp()) if moment is not None else 0
    return Model(id=served.name, created=created, owned_by=served.owner)


@router.get("", summary="The offered base models and this key's fine-tuned models")
def list_models(caller: TenantDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    bases = [ServedModel(name=name, base=base, engine_model=base)
             for name, base in offered_bases(settings).items()]
    tuned = fine_tuned_models(session, caller.scope)
    return ModelList(data=[_model(served, session) for served in bases + tuned])


@router.get("/{model:path}", summary="One model, by the name a request would call it",
            responses=openai_error_responses(404))
def retrieve_model(model: ModelName, caller: TenantDep, session: SessionDep,
                   settings: SettingsDep) -> Model:
    try:
        served = resolve_model(session, caller.scope, model, settings)
    except ModelNotFound as exc:
        raise ApiError(404, "model_not_found", str(exc),
                       [{"path": "model", "message": str(exc)}]) from None
    return _model(served, session)


@router.delete("/{model:path}",
               summary="Delete a fine-tuned model: its job, with its adapter, checkpoints, "
                       "exports, logs and metrics (as DELETE /v1/finetune/llm/{job_id})",
               responses=openai_error_responses(403, 404, 409))
def delete_model(model: ModelName, caller: TenantDep, session: SessionDep,
                 settings: SettingsDep, storage: StorageDep) -> ModelDeleted:
    try:
        served = resolve_model(session, caller.scope, model, settings)
    except ModelNotFound as exc:
        raise ApiError(404, "model_not_found", str(exc),
                       [{"path": "model", "message": str(exc)}]) from None
    if served.job_id is None:
        message = (f"'{model}' is a base model this server offers; only fine-tuned models "
                   "can be deleted")
        raise ApiError(403, "forbidden", message, [{"path": "model", "message": message}])
    job_deletion.delete_job(session, storage, caller.scope, served.job_id)
    session.commit()
    return ModelDeleted(id=model, deleted=True)
