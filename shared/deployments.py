"""Deployments: a completed job's adapter bound to an endpoint, and every write to one.

A deployment id is `dep-` and a uuid4. Job ids are bare uuid4s (hex digits and dashes), so
no job id starts with `dep-`: the routes MonsterAPI's client shares between jobs and
deployments (`/v1/deploy/status|logs|terminate`) tell them apart by that prefix alone
(`is_deployment_id`), never by looking both up.

A deployment is LIVE from its creation: the engine serves every completed job's adapter by
name (`shared.served_models.adapter_name`), loading it from storage on its first request, so
nothing is built or started per deployment. Terminating one stops the endpoint answering;
the row and its log stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.deploy_schema import IGNORED_FIELDS, DeployRequest
from shared.models import (
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    Job,
    JobStatus,
    new_id,
    utcnow,
)
from shared.served_models import adapter_name, trained_whole_model, whole_model_not_served
from shared.tenancy import Scope, newest_first, visible_to

DEPLOYMENT_ID_PREFIX = "dep-"


class DeploymentNotFound(LookupError):
    """No deployment with this id that the scope sees (another tenant's reads the same)."""


class DeploymentTerminated(Exception):
    """The deployment exists but was terminated: its endpoint answers no more."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(deployment.id)
        self.deployment = deployment


class DeploymentRefused(Exception):
    """A deploy request this server will not carry out; `field` is the payload field at fault
    and `status` the HTTP status that says why (404 no such job, 409 not completed, 422 a
    value this server cannot deploy)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def is_deployment_id(value: str) -> bool:
    """Whether `value` names a deployment rather than a job (which it then may not exist as)."""
    return value.startswith(DEPLOYMENT_ID_PREFIX)


def create_deployment(
    session: Session, tenant_id: str, request: DeployRequest, job_id: str,
    base_aliases: Mapping[str, str],
) -> Deployment:
    """Insert a LIVE deployment of `job_id`'s adapter for `tenant_id`, with its first log
    lines; the caller commits.

    The job must be the tenant's own (an admin key deploys its own tenant's jobs, as it
    submits its own) and COMPLETED. `basemodel_path`, when given, must name the job's base,
    as the job submitted it or as a name `base_aliases` maps to it.
    """
    # Key-share locked, as an export's request is: a delete of the job under way finishes
    # first, and the job is then not found.
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
                         .with_for_update(read=True, key_share=True))
    if job is None:
        raise DeploymentRefused(404, "loramodel_path", f"no job with id {job_id}")
    if job.status != JobStatus.COMPLETED.value:
        raise DeploymentRefused(409, "loramodel_path", f"job {job_id} is {job.status}: only a "
                                "COMPLETED job's adapter can be deployed")
    if trained_whole_model(job.payload):
        raise DeploymentRefused(422, "loramodel_path", whole_model_not_served(job_id))
    if job.artifacts_removed_at is not None:
        raise DeploymentRefused(409, "loramodel_path", f"job {job_id}'s adapter was removed "
                                "by the retention policy (TUNERY_ARTIFACT_RETENTION_DAYS)")
    base = request.basemodel_path
    if base is not None and base != job.base_model and base_aliases.get(base) != job.base_model:
        raise DeploymentRefused(422, "basemodel_path", f"{base[:200]!r} is not the base model "
                                f"job {job_id} was trained on ({job.base_model!r}); name that "
                                "one, or leave basemodel_path out")
    deployment_id = DEPLOYMENT_ID_PREFIX + new_id()
    now = utcnow()
    deployment = Deployment(
        id=deployment_id, tenant_id=tenant_id, job_id=job_id,
        name=request.deployment_name or deployment_id, base_model=job.base_model,
        prompt_template=request.prompt_template, max_model_len=request.max_model_len,
        status=DeploymentStatus.LIVE.value, payload=request.stored(), requests_served=0,
        created_at=now, updated_at=now,
    )
    session.add(deployment)
    session.flush()
    ignored = sorted(name for name in request.model_fields_set if name in IGNORED_FIELDS)
    _log(session, deployment_id, f"created: the adapter of job {job_id} on {job.base_model}"
         + (f"; ignored on this server: {', '.join(ignored)}" if ignored else ""))
    _log(session, deployment_id, f"live: the engine serves it as {adapter_name(job_id)}, "
         "loading it on the first request")
    return deployment


def get_deployment(session: Session, scope: Scope, deployment_id: str) -> Deployment:
    """The deployment, if `scope` may see it; another tenant's reads as missing."""
    deployment = session.scalar(select(Deployment).where(
        Deployment.id == deployment_id, visible_to(scope, Deployment.tenant_id)))
    if deployment is None:
        raise DeploymentNotFound(deployment_id)
    return deployment


def live_deployment(session: Session, scope: Scope, deployment_id: str) -> Deployment:
    """The deployment a chat request is for: `DeploymentNotFound` as `get_deployment`,
    `DeploymentTerminated` once it was terminated."""
    deployment = get_deployment(session, scope, deployment_id)
    if deployment.status != DeploymentStatus.LIVE.value:
        raise DeploymentTerminated(deployment)
    return deployment


def list_deployments(session: Session, scope: Scope, limit: int,
                     offset: int) -> tuple[list[Deployment], int]:
    """One page of the deployments `scope` sees, newest first, and how many there are."""
    return newest_first(session, Deployment, scope, limit, offset)


def terminate_deployment(session: Session, scope: Scope, deployment_id: str) -> Deployment:
    """Terminate a live deployment; a terminated one is left as it is (a retried terminate
    succeeds). The caller commits."""
    deployment = get_deployment(session, scope, deployment_id)
    now = utcnow()
    # Fenced on LIVE: of two concurrent terminates, one writes the event.
    ended = session.execute(
        update(Deployment)
        .where(Deployment.id == deployment_id,
               Deployment.status == DeploymentStatus.LIVE.value)
        .values(status=DeploymentStatus.TERMINATED.value, terminated_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    if ended.rowcount == 1:  # type: ignore[attr-defined]
        _log(session, deployment_id, f"terminated: by the user after "
             f"{deployment.requests_served} requests served")
    session.refresh(deployment)
    return deployment


def record_request(session: Session, deployment_id: str) -> None:
    """Count one chat request the deployment answered. The caller commits."""
    session.execute(
        update(Deployment)
        .where(Deployment.id == deployment_id)
        .values(requests_served=Deployment.requests_served + 1, last_request_at=utcnow()),
        execution_options={"synchronize_session": False},
    )


def tail_events(session: Session, deployment_id: str, n_lines: int) -> list[DeploymentEvent]:
    """The last `n_lines` log lines, oldest first."""
    rows = session.scalars(
        select(DeploymentEvent)
        .where(DeploymentEvent.deployment_id == deployment_id)
        .order_by(DeploymentEvent.id.desc())
        .limit(n_lines)
    ).all()
    return list(reversed(rows))


def events_after(session: Session, deployment_id: str, after_id: int,
                 n_lines: int) -> Sequence[DeploymentEvent]:
    """The first `n_lines` log lines with an id above `after_id`, oldest first."""
    return session.scalars(
        select(DeploymentEvent)
        .where(DeploymentEvent.deployment_id == deployment_id, DeploymentEvent.id > after_id)
        .order_by(DeploymentEvent.id)
        .limit(n_lines)
    ).all()


def _log(session: Session, deployment_id: str, line: str) -> None:
    session.add(DeploymentEvent(deployment_id=deployment_id, line=line))
