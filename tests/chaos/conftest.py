"""Chaos fixtures: real worker and API processes on PostgreSQL (behind a proxy a test can cut),
a private Redis a test can kill, and a report of each scenario's figures.

Every process a test starts is killed in the fixture's teardown, failed test or not; the logs
of all of them are printed when a test fails.
"""

from __future__ import annotations

import os

# Before huggingface_hub is imported anywhere: no hub lookups on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import uuid  # noqa: E402
from collections.abc import Generator, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402

from tests.chaos.chaos_report import ScenarioReport  # noqa: E402
from tests.chaos.job_records import JobsDatabase  # noqa: E402
from tests.chaos.redis_server import RedisServer  # noqa: E402
from tests.chaos.s3_server import S3Server  # noqa: E402
from tests.chaos.stack import ChaosStack, Timings  # noqa: E402
from tests.chaos.tcp_proxy import TcpProxy  # noqa: E402
from tests.conftest import POSTGRES_ADMIN_URL  # noqa: E402

POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL; its name. Dropped WITH (FORCE) after."""
    name = f"tunery_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "logs" / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def jobs_db(postgres_database: str) -> Iterator[JobsDatabase]:
    db = JobsDatabase(
        f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{postgres_database}"
    )
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """A moto S3 server process behind a cuttable proxy, with the chaos bucket created."""
    server = S3Server(tmp_path / "logs" / "s3.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def timings() -> Timings:
    return Timings()


@pytest.fixture
def chaos_stack(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_database: str,
    postgres_proxy: TcpProxy,
    redis_server: RedisServer,
    jobs_db: JobsDatabase,
    tiny_model_dir: Path,
    timings: Timings,
) -> Iterator[ChaosStack]:
    """The services reach PostgreSQL through `postgres_proxy`; the test reads it directly."""
    stack = ChaosStack(
        work_dir=tmp_path,
        database_url=(f"postgresql+psycopg://postgres@127.0.0.1:{postgres_proxy.port}/"
                      f"{postgres_database}"),
        proxy=postgres_proxy,
        redis=redis_server,
        db=jobs_db,
        model_dir=tiny_model_dir,
        timings=timings,
    )
    try:
        yield stack
    finally:
        stack.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            stack.dump_logs()


@pytest.fixture
def scenario_report(
    request: pytest.FixtureRequest, jobs_db: JobsDatabase, timings: Timings
) -> Iterator[ScenarioReport]:
    """The scenario's figures; written at teardown if the test did not write them (a failed
    run still reports what it saw)."""
    report = ScenarioReport(request.node.name, timings.checkpoint_every_steps)
    yield report
    if report.written is None and report.job_ids:
        report.extra["test_failed_before_report"] = True
        report.write(jobs_db)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Lets fixtures see whether the test body failed (to print the process logs).
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
