from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from cli.local_stack import free_port
from shared.db import get_engine, session_scope
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


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tunery_env: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Callable[[], int]]]:
    """The app behind a real uvicorn server in this process (so that its connection pool can
    be looked at), on SQLite or PostgreSQL; its base URL, and the count of connections
    checked out of its pool now."""
    if request.param == "postgresql":
        monkeypatch.setenv("TUNERY_DATABASE_URL", request.getfixturevalue("postgres_url"))
    from api.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", get_engine().pool.checkedout  # type: ignore[attr-defined]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
