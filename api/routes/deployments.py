"""`/v1/deployments/{id}`: a deployment's endpoint, an OpenAI base URL.

`OpenAI(base_url=<the deployment's URL>, api_key=<a key of its tenant>)` reaches
`chat.completions.create` here: whatever `model` the request names, the deployment's adapter
answers. Errors take OpenAI's shape (`api.errors.OPENAI_PATHS`); a terminated deployment is a
410 `deployment_terminated`, another tenant's or an unknown one a 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path

from api.deps import SessionDep, TenantDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from shared import deployments, jobs

router = APIRouter(prefix="/v1/deployments", tags=["openai: deployments"],
                   responses=OPENAI_AUTHENTICATED)

DeploymentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


@router.post("/{deployment_id}/chat/completions",
             summary="OpenAI chat completion with the deployment's adapter (any `model`)",
             responses=openai_error_responses(404, 410))
def deployment_chat_completion(deployment_id: DeploymentId,
                               body: Annotated[dict[str, Any], Body()], caller: TenantDep,
                               session: SessionDep) -> Any:
    deployment = deployments.live_deployment(session, caller.scope, deployment_id)
    jobs.get_job(session, caller.scope, deployment.job_id)
    raise ApiError(503, "inference_unavailable",
                   "chat completions are not served by this build of the API yet")
