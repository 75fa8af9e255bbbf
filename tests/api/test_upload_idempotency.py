"""`Idempotency-Key` on dataset uploads (`POST /v1/datasets`, OpenAI's `POST /v1/files`): a
client that retries after a timeout gets the first upload back, one row and one stored object;
the same key with another file is refused as for a submit."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Dataset

ROWS = b'{"instruction": "Say 1.", "input": "", "output": "1"}\n' * 4
OTHER = b'{"instruction": "Say 2.", "input": "", "output": "2"}\n' * 4
# Form fields, the status of an upload, the status of a key reused with another file (OpenAI's
# face answers an invalid request 400, as OpenAI does).
ROUTES = {"/v1/datasets": ({}, 201, 422), "/v1/files": ({"purpose": "fine-tune"}, 200, 400)}


def upload(client: TestClient, route: str, content: bytes, key: str):  # type: ignore[no-untyped-def]
    data = ROUTES[route][0]
    return client.post(route, files={"file": ("rows.jsonl", content)}, data=data,
                       headers={"Idempotency-Key": key})


def stored_objects(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "storage").rglob("*")
            if p.is_file() and ".partial" not in p.parts]


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_retried_upload_with_the_same_key_returns_the_same_dataset_and_stores_it_once(
    client: TestClient, tunery_env: Path, route: str
) -> None:
    first = upload(client, route, ROWS, "upload-1")
    again = upload(client, route, ROWS, "upload-1")

    status = ROUTES[route][1]
    assert (first.status_code, again.status_code) == (status, status), again.text
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1
    assert len(stored_objects(tunery_env)) == 1

    other_key = upload(client, route, ROWS, "upload-2")
    assert other_key.json()["id"] != first.json()["id"]  # a new key is a new upload


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_same_key_with_another_file_is_refused_and_stores_nothing(
    client: TestClient, tunery_env: Path, route: str
) -> None:
    assert upload(client, route, ROWS, "upload-1").status_code == ROUTES[route][1]

    other = upload(client, route, OTHER, "upload-1")

    assert other.status_code == ROUTES[route][2], other.text
    assert "already used with a different request body" in other.text
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1
    assert len(stored_objects(tunery_env)) == 1
