"""An upload for OpenAI fine-tuning (`check_openai`) stores what OpenAI's training file rules
find in it (`datasets.openai_check`), read in the same pass that validates the file; other
uploads store nothing there, and a file that does not parse stays refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import dataset_files, datasets
from shared.datasets import DatasetRejected, create_dataset, finish_upload, start_upload
from shared.db import make_engine
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Dataset, DatasetStatus
from shared.openai_training_file import TrainingFileCheck
from shared.storage import LocalStorage

LINE = {"messages": [{"role": "user", "content": "Capital of Peru?"},
                     {"role": "assistant", "content": "Lima.", "weight": 1}]}
MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture
def session(tunery_env: Path, tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'datasets.db'}"
    upgrade_database(url)  # the openai_check column comes from the migrations
    engine = make_engine(url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def jsonl(tmp_path: Path, rows: list[Any], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def upload(session: Session, storage: LocalStorage, path: Path, *,
           check_openai: bool = True) -> Dataset:
    tenant_id = create_api_key(session, "tenant").tenant_id
    dataset = create_dataset(session, storage, tenant_id, path, name=path.name,
                             content_type=None, max_bytes=MAX_BYTES, check_openai=check_openai)
    session.commit()
    return dataset


def stored_check(session: Session, dataset_id: str) -> dict[str, Any] | None:
    session.expire_all()
    return session.scalar(select(Dataset.openai_check).where(Dataset.id == dataset_id))


def test_a_valid_training_file_stores_its_check_read_in_the_one_validating_pass(
    session: Session, storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    real_rows = dataset_files._rows

    def counted_rows(path: Path, *args: Any) -> Any:
        opened.append(path)
        return real_rows(path, *args)

    monkeypatch.setattr(dataset_files, "_rows", counted_rows)

    dataset = upload(session, storage, jsonl(tmp_path, [LINE] * 12))

    assert len(opened) == 1
    assert stored_check(session, dataset.id) == TrainingFileCheck("chat", 12, None).to_json()
    assert dataset.status == DatasetStatus.READY.value


def test_a_file_breaking_openais_rules_is_stored_with_the_problem_naming_the_line(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo", "weight": 7}]}

    dataset = upload(session, storage, jsonl(tmp_path, [LINE, LINE, LINE, LINE, bad]))

    check = TrainingFileCheck.from_json(stored_check(session, dataset.id) or {})
    assert dataset.status == DatasetStatus.READY.value  # the job that names it fails
    assert (check.kind, check.examples) == ("chat", 4)
    assert check.problem is not None
    assert check.problem.message == "line 5: messages[1].weight must be 0 or 1, not 7"


def test_a_json_array_is_checked_like_json_lines(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([LINE] * 3), encoding="utf-8")

    dataset = upload(session, storage, path)

    check = TrainingFileCheck.from_json(stored_check(session, dataset.id) or {})
    assert check.problem is not None and check.problem.code == "invalid_n_examples"
    assert check.examples == 3


def test_a_csv_file_is_stored_with_a_problem_saying_it_is_not_json_lines(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\nhi,yo\n", encoding="utf-8")

    dataset = upload(session, storage, path)

    check = TrainingFileCheck.from_json(stored_check(session, dataset.id) or {})
    assert check.problem is not None
    assert check.problem.message.startswith("the training file is a csv file")


def test_an_upload_without_check_openai_stores_no_check(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    dataset = upload(session, storage, jsonl(tmp_path, [LINE] * 12), check_openai=False)

    assert stored_check(session, dataset.id) is None


def test_a_file_that_is_not_json_lines_at_all_stays_refused(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": []}\nnot json\n', encoding="utf-8")

    with pytest.raises(DatasetRejected, match="line 2: invalid JSON"):
        upload(session, storage, path)


def test_the_upload_flow_stores_the_check_when_the_file_arrives(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    tenant_id = create_api_key(session, "tenant").tenant_id
    dataset, _token, _url = start_upload(session, storage, tenant_id, "train.jsonl", 600)
    session.commit()

    finish_upload(storage, dataset, jsonl(tmp_path, [LINE] * 10), content_type=None,
                  max_bytes=MAX_BYTES, check_openai=True)
    session.commit()

    assert stored_check(session, dataset.id) == TrainingFileCheck("chat", 10, None).to_json()


def test_check_pending_passes_check_openai_on(
    session: Session, storage: LocalStorage, tmp_path: Path
) -> None:
    tenant_id = create_api_key(session, "tenant").tenant_id
    dataset, _token, _url = start_upload(session, storage, tenant_id, "train.jsonl", 600)
    session.commit()
    storage.put_file(dataset.storage_key, jsonl(tmp_path, [LINE] * 10))
    work = tmp_path / "work"
    work.mkdir()

    datasets.check_pending(storage, dataset, work, max_bytes=MAX_BYTES, check_openai=True)
    session.commit()

    assert stored_check(session, dataset.id) == TrainingFileCheck("chat", 10, None).to_json()
