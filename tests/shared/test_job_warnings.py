"""A job's warnings: given at submit time (`create_job`), added by the worker's attempt
(`add_warning`, fenced on the attempt, each sentence once), and the stored payload that lets the
worker tell a left-out prompt_template from a given one. On SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import jobs
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.models import Job, JobStatus
from shared.schema import FinetuneRequest
from tests.conftest import make_payload

SUBMIT_WARNING = "data_config: 2 training examples rarely teach a model anything it keeps"
WORKER_WARNING = "warm-up capped from 50 to 1 steps: ..."


def submit(session: Session, payload: dict | None = None, warnings: list[str] | None = None
           ) -> str:
    tenant_id = create_api_key(session, "tenant").tenant_id
    request = FinetuneRequest.model_validate(payload or make_payload())
    job_id = jobs.create_job(session, tenant_id, request, 2, warnings=warnings or [],
                             device_class="train").id
    session.commit()
    return job_id


def claim(session: Session, job_id: str) -> Claim:
    claimed = jobs.claim_job(session, job_id, "worker", 60)
    session.commit()
    assert claimed is not None
    return claimed


def warnings_of(session: Session, job_id: str) -> list[str] | None:
    session.expire_all()
    return session.scalar(select(Job.warnings).where(Job.id == job_id))


def test_create_job_stores_the_warnings_it_is_given(session: Session) -> None:
    warned = submit(session, warnings=[SUBMIT_WARNING])
    quiet = submit(session)

    assert warnings_of(session, warned) == [SUBMIT_WARNING]
    assert warnings_of(session, quiet) is None


def test_the_worker_adds_a_warning_once_after_the_submit_time_ones(session: Session) -> None:
    job_id = submit(session, warnings=[SUBMIT_WARNING])
    first = claim(session, job_id)

    assert jobs.add_warning(session, first, WORKER_WARNING)
    session.commit()
    # The lease expired: a second attempt runs the job again and says the same.
    assert jobs.transition(session, job_id, JobStatus.QUEUED, attempt=first.attempt)
    session.commit()
    second = claim(session, job_id)
    assert jobs.add_warning(session, second, WORKER_WARNING)
    session.commit()

    assert warnings_of(session, job_id) == [SUBMIT_WARNING, WORKER_WARNING]


def test_a_stale_attempt_adds_no_warning(session: Session) -> None:
    job_id = submit(session)
    first = claim(session, job_id)
    assert jobs.transition(session, job_id, JobStatus.QUEUED, attempt=first.attempt)
    session.commit()
    claim(session, job_id)

    assert not jobs.add_warning(session, first, "from the attempt that lost its lease")
    session.commit()

    assert warnings_of(session, job_id) is None


def test_a_left_out_prompt_template_stays_out_of_the_stored_payload(session: Session) -> None:
    left_out = make_payload()
    del left_out["data_config"]["prompt_template"]
    given = make_payload()

    for payload, kept in ((left_out, False), (given, True)):
        job_id = submit(session, payload)
        stored = session.get_one(Job, job_id).payload
        assert ("prompt_template" in stored["data_config"]) is kept
        # The worker reads it back through the schema: the default fills in, marked unset.
        read_back = FinetuneRequest.model_validate(stored).data_config
        assert ("prompt_template" in read_back.model_fields_set) is kept
        assert read_back.prompt_template == FinetuneRequest.model_validate(payload) \
            .data_config.prompt_template
