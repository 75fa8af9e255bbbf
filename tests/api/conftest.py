from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared.db import session_scope
from shared.keys import create_api_key


@pytest.fixture
def app_client(tunery_env: Path) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as client:  # the lifespan runs the migrations
        yield client


def new_key(name: str) -> str:
    with session_scope() as session:
        return create_api_key(session, name).plaintext


@pytest.fixture
def api_key(app_client: TestClient) -> str:
    return new_key("tenant-a")


@pytest.fixture
def client(app_client: TestClient, api_key: str) -> TestClient:
    app_client.headers["Authorization"] = f"Bearer {api_key}"
    return app_client
