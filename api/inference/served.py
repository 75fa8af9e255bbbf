"""Which model a request names, for whom: the one place a model name becomes something an
engine serves.

A caller may name a base model the operator offers (`inference.base_models`, or an OpenAI
name `openai.model_aliases` maps to one), one of its completed jobs by the `fine_tuned_model`
name (`ft:{base}:{org}:{suffix}:{short id}`), or a job by its id (`ftjob-{id}` or the bare
Tunery id). Another tenant's model is not found, exactly like one that does not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.openai import ids
from api.openai.job_view import fine_tuned_model
from shared import jobs
from shared.models import Job, JobStatus, Tenant
from shared.served_models import adapter_name, trained_whole_model, whole_model_not_served
from shared.settings import Settings
from shared.tenancy import Scope

_FINE_TUNED = re.compile(r"ft:.+:([0-9a-f]{8})")


class ModelNotFound(LookupError):
    """No model of that name for this caller; `args[0]` says why, for the caller."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    """As the caller named it; every answer echoes it."""
    base: str
    """The base model as jobs name it: it picks the engine."""
    engine_model: str
    """What the engine is asked for: the base itself, or the job's adapter name."""
    job_id: str | None = None
    owner: str = "system"
    not_served: str | None = None
    """Why no engine can answer for it (a full fine-tune's whole model); None: it can."""


def offered_bases(settings: Settings) -> dict[str, str]:
    """Name a caller may use -> the base model it runs: the offered bases, and the OpenAI
    names aliased to one of them."""
    offered = {base: base for base in settings.inference.base_models}
    offered |= {alias: base for alias, base in settings.openai.model_aliases.items()
                if base in offered}
    return offered


def resolve_model(session: Session, scope: Scope, name: str, settings: Settings) -> ServedModel:
    """The model `name` stands for, as `scope` sees it; `ModelNotFound` otherwise."""
    bases = offered_bases(settings)
    if name in bases:
        return ServedModel(name=name, base=bases[name], engine_model=bases[name])
    job = _job_named(session, scope, name)
    if job is None:
        raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.")
    if job.status != JobStatus.COMPLETED.value:
        raise ModelNotFound(f"The model '{name}' is not ready: its job is {job.status}, and only "
                            "a COMPLETED job's model can be called.")
    return ServedModel(name=name, base=job.base_model, engine_model=adapter_name(job.id),
                       job_id=job.id, owner=organization(session, job),
                       not_served=(whole_model_not_served(job.id)
                                   if trained_whole_model(job.payload) else None))


def fine_tuned_models(session: Session, scope: Scope) -> list[ServedModel]:
    """Every model `scope`'s completed jobs trained, by their `fine_tuned_model` names."""
    models = []
    for job in jobs.completed_jobs(session, scope):
        owner = organization(session, job)
        models.append(ServedModel(name=fine_tuned_model(job, owner), base=job.base_model,
                                  engine_model=adapter_name(job.id), job_id=job.id,
                                  owner=owner))
    return models


def organization(session: Session, job: Job) -> str:
    tenant = session.get(Tenant, job.tenant_id)
    return tenant.name if tenant is not None else job.tenant_id


def _job_named(session: Session, scope: Scope, name: str) -> Job | None:
    match = _FINE_TUNED.fullmatch(name)
    if match is not None:
        for job in jobs.completed_jobs(session, scope, id_prefix=match.group(1), limit=100):
            if fine_tuned_model(job, organization(session, job)) == name:
                return job
        return None
    job_id = ids.job_id_of(name)
    if not ids.is_job_uuid(job_id):
        return None
    try:
        return jobs.get_job(session, scope, job_id)
    except jobs.JobNotFound:
        return None
