"""A job's id in OpenAI's dialect: `ftjob-{id}`, where `{id}` is the Tunery (MonsterAPI)
job id. The API's OpenAI routes and the webhooks' event bodies both name jobs this way."""

from __future__ import annotations

JOB_PREFIX = "ftjob-"


def openai_job_id(job_id: str) -> str:
    return JOB_PREFIX + job_id


def job_id_of(openai_id: str) -> str:
    """The Tunery job id in `ftjob-{id}`; a bare Tunery id is taken as it is, so that a job
    created through the MonsterAPI dialect reads here too."""
    return openai_id.removeprefix(JOB_PREFIX)
