"""Secrets in job payloads: encrypted at rest, decrypted only by a worker holding the same
key, and dropped from the row in the transaction that ends the job."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from shared.keys import create_api_key
from shared.models import Base, Job, JobStatus
from shared.payload_secrets import (
    ENCRYPTED_PREFIX,
    REDACTED,
    SecretsUnreadable,
    drop_secrets,
    key_file,
    open_secrets,
    redact_secrets,
    seal_secrets,
    secret_values,
)
from shared.schema import FinetuneRequest
from shared.settings import Settings
from tests.conftest import make_payload

HF_TOKEN = "hf_" + "T" * 34
WANDB_KEY = "wandb-" + "W" * 34
SESSION_TOKEN = "session-" + "S" * 24


def secret_payload() -> dict:
    payload = make_payload(logging_config={"wandb_login_key": WANDB_KEY})
    payload["hf_config"] = {"hf_token": HF_TOKEN}
    payload["user_session_token"] = SESSION_TOKEN
    return FinetuneRequest.model_validate(payload).model_dump(mode="json")


@pytest.fixture
def keyed(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "a", secret_key=Fernet.generate_key().decode())


def test_sealed_payload_holds_no_plaintext_and_opens_to_the_original(keyed: Settings) -> None:
    payload = secret_payload()
    sealed = seal_secrets(payload, keyed)

    assert sealed["hf_config"]["hf_token"].startswith(ENCRYPTED_PREFIX)
    assert sealed["logging_config"]["wandb_login_key"].startswith(ENCRYPTED_PREFIX)
    assert sealed["user_session_token"].startswith(ENCRYPTED_PREFIX)
    for secret in (HF_TOKEN, WANDB_KEY, SESSION_TOKEN):
        assert secret not in repr(sealed)
    assert payload["hf_config"]["hf_token"] == HF_TOKEN  # the caller's dict is left alone
    assert open_secrets(sealed, keyed) == payload
    assert seal_secrets(sealed, keyed) == sealed  # sealing twice does not double-encrypt
    assert drop_secrets(sealed)["hf_config"]["hf_token"] == "***"


def test_payload_without_secrets_needs_no_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "none")
    payload = FinetuneRequest.model_validate(make_payload()).model_dump(mode="json")
    assert seal_secrets(payload, settings) == payload
    assert not key_file(settings).exists()


def test_worker_with_another_key_fails_clearly_without_showing_the_ciphertext(
    keyed: Settings, tmp_path: Path
) -> None:
    sealed = seal_secrets(secret_payload(), keyed)
    other = Settings(data_dir=tmp_path / "b", secret_key=Fernet.generate_key().decode())

    with pytest.raises(SecretsUnreadable) as info:
        open_secrets(sealed, other)

    message = str(info.value)
    assert "TUNERY_SECRET_KEY" in message and "hf_token" in message
    assert ENCRYPTED_PREFIX not in message
    assert sealed["hf_config"]["hf_token"].removeprefix(ENCRYPTED_PREFIX)[:20] not in message
    assert HF_TOKEN not in message


def test_old_key_still_decrypts_after_a_rotation(keyed: Settings, tmp_path: Path) -> None:
    sealed = seal_secrets(secret_payload(), keyed)
    assert keyed.secret_key is not None
    rotated = Settings(
        data_dir=tmp_path / "c",
        secret_key=f"{Fernet.generate_key().decode()},{keyed.secret_key.get_secret_value()}",
    )
    assert open_secrets(sealed, rotated)["hf_config"]["hf_token"] == HF_TOKEN


def test_bad_secret_key_setting_names_the_variable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secret_key="not-a-fernet-key")
    with pytest.raises(ValueError, match="TUNERY_SECRET_KEY"):
        seal_secrets(secret_payload(), settings)


def test_without_a_setting_a_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    api = Settings(data_dir=tmp_path / "shared-data")
    worker = Settings(data_dir=tmp_path / "shared-data")

    sealed = seal_secrets(secret_payload(), api)

    path = key_file(api)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Fernet(path.read_text().strip().encode())  # a valid key
    before = path.read_text()
    assert open_secrets(sealed, worker)["logging_config"]["wandb_login_key"] == WANDB_KEY
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_threads_that_make_the_key_file_at_once_all_get_the_one_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "shared-data")
    threads_n = 16
    start = threading.Barrier(threads_n)
    sealed: list[dict[str, object]] = []
    errors: list[BaseException] = []

    def seal() -> None:
        start.wait()
        try:
            sealed.append(seal_secrets(secret_payload(), settings))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    for _ in range(20):  # the race is narrow: make it many times, each from no file
        key_file(settings).unlink(missing_ok=True)
        sealed.clear()
        threads = [threading.Thread(target=seal) for _ in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert all(open_secrets(s, settings) == secret_payload() for s in sealed)
    assert [p.name for p in key_file(settings).parent.iterdir()] == [key_file(settings).name]


def test_payload_stored_before_encryption_still_opens(keyed: Settings) -> None:
    assert open_secrets(secret_payload(), keyed) == secret_payload()


def test_dropped_payload_keeps_no_secret_and_still_validates() -> None:
    payload = make_payload()
    payload["hf_config"] = {"hf_token": HF_TOKEN, "hf_model_path": "me/adapter"}
    dropped = drop_secrets(FinetuneRequest.model_validate(payload).model_dump(mode="json"))
    assert dropped["hf_config"]["hf_token"] == REDACTED
    FinetuneRequest.model_validate(dropped)


def test_redact_secrets_replaces_every_occurrence() -> None:
    secrets = secret_values(secret_payload())
    assert sorted(secrets) == sorted([HF_TOKEN, WANDB_KEY, SESSION_TOKEN])
    text = f"401 for token {HF_TOKEN} (key {WANDB_KEY}); again {HF_TOKEN}"
    assert redact_secrets(text, secrets) == "401 for token *** (key ***); again ***"


@pytest.fixture
def session(tmp_path: Path, keyed: Settings, monkeypatch: pytest.MonkeyPatch) -> Session:
    import shared.payload_secrets

    monkeypatch.setattr(shared.payload_secrets, "get_settings", lambda: keyed)
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    return Session(engine)


@pytest.mark.parametrize("end", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_job_is_stored_encrypted_and_its_secrets_are_dropped_when_it_ends(
    session: Session, keyed: Settings, end: JobStatus
) -> None:
    tenant_id = create_api_key(session, "owner").tenant_id
    request = FinetuneRequest.model_validate(secret_payload())
    job = jobs.create_job(session, tenant_id, request, max_attempts=3, device_class="train")
    session.commit()
    stored = session.scalar(select(Job.payload).where(Job.id == job.id))
    assert stored is not None
    assert stored["hf_config"]["hf_token"].startswith(ENCRYPTED_PREFIX)
    assert open_secrets(stored, keyed) == request.model_dump(mode="json")

    claim = jobs.claim_job(session, job.id, "worker-1", lease_seconds=60)
    assert claim is not None
    # Re-queued after a lost lease, the job still needs its secrets.
    assert jobs.transition(session, job.id, JobStatus.QUEUED, attempt=claim.attempt)
    session.commit()
    requeued = session.scalar(select(Job.payload).where(Job.id == job.id))
    assert requeued == stored

    claim = jobs.claim_job(session, job.id, "worker-2", lease_seconds=60)
    assert claim is not None
    session.commit()
    assert jobs.transition(session, job.id, end, attempt=claim.attempt, reason="done")
    session.rollback()  # the drop belongs to the transition's transaction: undone with it
    assert session.scalar(select(Job.payload).where(Job.id == job.id)) == stored

    assert jobs.transition(session, job.id, end, attempt=claim.attempt, reason="done")
    session.commit()
    final = session.scalar(select(Job.payload).where(Job.id == job.id))
    assert final is not None
    assert final["hf_config"]["hf_token"] == REDACTED
    assert final["logging_config"]["wandb_login_key"] == REDACTED
    assert final["user_session_token"] == REDACTED
    assert final["training_config"] == stored["training_config"]


def test_queued_job_cancelled_drops_its_secrets(session: Session) -> None:
    tenant_id = create_api_key(session, "owner").tenant_id
    request = FinetuneRequest.model_validate(secret_payload())
    job = jobs.create_job(session, tenant_id, request, max_attempts=3, device_class="train")
    session.commit()
    jobs.request_cancel(session, tenant_id, job.id)
    session.commit()
    final = session.scalar(select(Job.payload).where(Job.id == job.id))
    assert final is not None and secret_values(final) == []
    assert final["hf_config"]["hf_token"] == REDACTED
