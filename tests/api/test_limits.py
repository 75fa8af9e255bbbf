"""Operator limits (issue 5, item 7): request body size, payload values, dataset rows,
compressed files, the per-key rate limit and the active-jobs cap. Real app, SQLite, local
storage; bodies that must arrive in pieces are driven through the ASGI interface directly,
because TestClient reads a streamed body whole before the app sees it."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import json
import lzma
import math
import threading
import tracemalloc
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from api.limits.rate import RateLimiter
from shared.db import get_engine, session_scope
from shared.models import Job, JobStatus
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.conftest import make_payload
from tests.fake_clock import FakeClock

URL = "/v1/finetune/llm"
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}
        for i in range(8)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
MiB = 1024 * 1024


@pytest.fixture
def make_client(tunery_env: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Builds the app with the given TUNERY_* settings, authenticated with a fresh key."""
    clients: list[TestClient] = []

    def build(**env: object) -> TestClient:
        for name, value in env.items():
            monkeypatch.setenv(f"TUNERY_{name.upper()}", str(value))
        get_settings.cache_clear()
        from api.main import create_app

        client = TestClient(create_app())
        client.__enter__()  # the lifespan runs the migrations
        clients.append(client)
        client.headers["Authorization"] = f"Bearer {new_key(f'tenant-{len(clients)}')}"
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"code", "message", "fields"}
    return error


@dataclass
class Streamed:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks_read: int

    def json(self) -> Any:
        return json.loads(self.body)


def stream_request(app: FastAPI, method: str, path: str, chunks: Iterable[bytes],
                   headers: dict[str, str], query: str = "") -> Streamed:
    """One request whose body the app pulls chunk by chunk, as uvicorn hands over a chunked
    or long body; `chunks_read` counts how many chunks the server asked for."""
    chunk_iter = iter(chunks)
    sent: dict[str, Any] = {"body": b"", "read": 0, "done": False}

    async def receive() -> dict[str, Any]:
        if sent["done"]:
            await asyncio.sleep(3600)  # the client waits for the response
        chunk = next(chunk_iter, None)
        if chunk is None:
            sent["done"] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        sent["read"] += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return Streamed(sent["status"], sent["headers"], sent["body"], sent["read"])


def multipart(name: str, parts: Iterable[bytes], boundary: str = "tunery-test") -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    yield from parts
    yield f"\r\n--{boundary}--\r\n".encode()


def multipart_headers(auth: str, boundary: str = "tunery-test") -> dict[str, str]:
    return {"authorization": auth,
            "content-type": f"multipart/form-data; boundary={boundary}"}


# Request body size ---------------------------------------------------------------------------

def test_a_json_body_over_max_request_bytes_is_413_in_the_error_shape(make_client: Any) -> None:
    client = make_client(max_request_bytes=4096)
    payload = make_payload()
    payload["data_config"]["prompt_template"] += "x" * 5000
    error = assert_error(client.post(URL, json=payload), 413, "payload_too_large")
    assert "4096 bytes" in error["message"]
    assert client.post(URL, json=make_payload()).status_code == 201


def test_a_body_longer_than_its_content_length_gets_no_more_through(make_client: Any) -> None:
    client = make_client(max_request_bytes=4096)
    auth = client.headers["Authorization"]
    chunks = [b" " * 1024 for _ in range(1000)]  # 1000 KiB after a declared 10 bytes
    answer = stream_request(client.app, "POST", URL, chunks,
                            {"authorization": auth, "content-type": "application/json",
                             "content-length": "10"})
    assert answer.status == 413
    assert answer.json()["error"]["code"] == "payload_too_large"
    assert answer.chunks_read == 5  # reading stopped at the first chunk past 4096 bytes


def test_a_chunked_body_is_cut_off_at_the_limit(make_client: Any) -> None:
    client = make_client(max_request_bytes=4096)
    chunks = (b" " * 1024 for _ in range(10**6))  # a 1 GiB body, never built
    answer = stream_request(client.app, "POST", URL, chunks,
                            {"authorization": client.headers["Authorization"],
                             "content-type": "application/json"})
    assert answer.status == 413
    assert answer.chunks_read == 5


def test_the_general_limit_leaves_dataset_uploads_their_own(make_client: Any) -> None:
    client = make_client(max_request_bytes=1024, max_dataset_bytes=64 * 1024)
    data = JSONL * 20  # about 2 KiB per copy: well over 1024 bytes, under 64 KiB
    posted = client.post("/v1/datasets", files={"file": ("train.jsonl", data)})
    assert posted.status_code == 201, posted.text
    urls = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()
    put = client.put(urls["upload_url"].removeprefix("http://testserver"), content=data)
    assert put.status_code == 200, put.text
    too_big = client.post("/v1/datasets", files={"file": ("big.jsonl", JSONL * 1000)})
    assert_error(too_big, 413, "payload_too_large")


def test_a_compressed_request_body_is_refused_unread(make_client: Any) -> None:
    client = make_client()
    auth = client.headers["Authorization"]
    bomb = gzip.compress(b" " * (10 * MiB))  # 10 MiB of JSON whitespace in about 10 KiB
    for path, content_type in ((URL, "application/json"),
                               ("/v1/datasets", "multipart/form-data; boundary=x")):
        answer = stream_request(client.app, "POST", path, [bomb],
                                {"authorization": auth, "content-type": content_type,
                                 "content-encoding": "gzip"})
        assert answer.status == 415
        assert "Content-Encoding 'gzip'" in answer.json()["error"]["message"]
        assert answer.chunks_read == 0


# Payload limits ------------------------------------------------------------------------------

def test_operator_limits_name_each_field_and_its_limit(make_client: Any) -> None:
    client = make_client()
    payload = make_payload(data_config={"cutoff_len": 9000},
                           training_config={"num_train_epochs": 25},
                           pretrainedmodel_config={"lora_r": 512})
    error = assert_error(client.post(URL, json=payload), 422, "invalid_request")
    assert error["fields"] == [
        {"path": "data_config.cutoff_len",
         "message": "9000 is above this server's limit of 8192 (TUNERY_MAX_CUTOFF_LEN)"},
        {"path": "training_config.num_train_epochs",
         "message": "25 is above this server's limit of 20 (TUNERY_MAX_EPOCHS)"},
        {"path": "pretrainedmodel_config.lora_r",
         "message": "512 is above this server's limit of 256 (TUNERY_MAX_LORA_R)"},
    ]


def test_operator_limits_come_from_settings_and_allow_the_limit_itself(
    make_client: Any,
) -> None:
    client = make_client(max_lora_r=16, max_cutoff_len=1024, max_epochs=2.5)
    at_limit = make_payload(data_config={"cutoff_len": 1024},
                            training_config={"num_train_epochs": 2.5},
                            pretrainedmodel_config={"lora_r": 16})
    assert client.post(URL, json=at_limit).status_code == 201
    over = make_payload(pretrainedmodel_config={"lora_r": 17})
    error = assert_error(client.post(URL, json=over), 422, "invalid_request")
    assert [f["path"] for f in error["fields"]] == ["pretrainedmodel_config.lora_r"]


def test_the_schema_bounds_still_hold_above_a_generous_operator(make_client: Any) -> None:
    client = make_client(max_lora_r=100_000)
    payload = make_payload(pretrainedmodel_config={"lora_r": 4096})
    error = assert_error(client.post(URL, json=payload), 422, "invalid_request")
    assert error["fields"][0]["path"] == "pretrainedmodel_config.lora_r"


# Dataset rows --------------------------------------------------------------------------------

def test_an_upload_over_max_dataset_rows_is_413_naming_the_limit(make_client: Any) -> None:
    client = make_client(max_dataset_rows=8)
    assert client.post("/v1/datasets", files={"file": ("ok.jsonl", JSONL)}).status_code == 201
    nine = JSONL + JSONL.splitlines(keepends=True)[0]
    error = assert_error(client.post("/v1/datasets", files={"file": ("nine.jsonl", nine)}),
                         413, "payload_too_large")
    assert "more than 8 rows" in error["message"]
    assert "TUNERY_MAX_DATASET_ROWS" in error["message"]


def test_an_upload_put_over_max_dataset_rows_is_413_and_the_dataset_fails(
    make_client: Any,
) -> None:
    client = make_client(max_dataset_rows=3)
    urls = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()
    put = client.put(urls["upload_url"].removeprefix("http://testserver"), content=JSONL)
    assert_error(put, 413, "payload_too_large")
    dataset = client.get(f"/v1/datasets/{urls['dataset_id']}").json()
    assert dataset["status"] == "failed"
    assert "more than 3 rows" in dataset["error"]


# Compressed files ----------------------------------------------------------------------------

def _zip(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train.jsonl", data)
    return out.getvalue()


COMPRESSORS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zip": _zip,
    # No zstd module in the standard library before 3.14: a frame header is what is sniffed.
    "zstd": lambda data: b"\x28\xb5\x2f\xfd" + data[:64],
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.compressed"])
def test_a_compressed_dataset_is_refused_by_its_magic_bytes(
    make_client: Any, kind: str, name: str
) -> None:
    client = make_client()
    data = COMPRESSORS[kind](JSONL)
    error = assert_error(client.post("/v1/datasets", files={"file": (name, data)}),
                         422, "invalid_dataset")
    assert f"is a {kind}-compressed file" in error["message"]
    assert "decompress it" in error["message"]


def test_a_gzip_bomb_upload_is_refused_without_decompressing(make_client: Any) -> None:
    client = make_client()
    bomb = gzip.compress(bytes(10 * MiB))  # 10 MiB of zeros
    assert len(bomb) < 20 * 1024
    error = assert_error(client.post("/v1/datasets", files={"file": ("z.jsonl.gz", bomb)}),
                         422, "invalid_dataset")
    assert "gzip-compressed" in error["message"]


def lazy_gzip_bomb(expanded: int) -> Iterator[bytes]:
    """A gzip stream that expands to `expanded` zero bytes, made of identical 1 MiB members
    (gzip readers decompress concatenated members as one stream): about 1 KiB per MiB."""
    member = gzip.compress(bytes(MiB))
    for _ in range(expanded // MiB):
        yield member


def test_a_1_gib_gzip_bomb_streamed_in_is_refused_with_flat_memory(make_client: Any) -> None:
    client = make_client()
    assert gzip.decompress(b"".join(lazy_gzip_bomb(3 * MiB))) == bytes(3 * MiB)
    tracemalloc.start()
    try:
        answer = stream_request(client.app, "POST", "/v1/datasets",
                                multipart("bomb.jsonl.gz", lazy_gzip_bomb(1024 * MiB)),
                                multipart_headers(client.headers["Authorization"]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 422
    assert "gzip-compressed" in answer.json()["error"]["message"]
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB while refusing a 1 GiB bomb"


# Rate limit ----------------------------------------------------------------------------------

def fake_limiter(client: TestClient, per_minute: int, read_per_minute: int = 0) -> FakeClock:
    clock = FakeClock()
    client.app.state.rate_limiter = RateLimiter(  # type: ignore[attr-defined]
        per_minute, read_per_minute, clock=clock)
    return clock


def test_a_key_over_its_rate_gets_429_with_retry_after_until_tokens_refill(
    make_client: Any,
) -> None:
    client = make_client()
    clock = fake_limiter(client, per_minute=3)  # one request per 20 s, bursts of 3
    assert [client.get(URL).status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/v1/deploy/list")
    error = assert_error(refused, 429, "rate_limited")
    assert refused.headers["Retry-After"] == "20"
    assert "3 per minute" in error["message"]
    clock.now += 19.5
    assert client.get(URL).headers["Retry-After"] == "1"
    clock.now += 0.5
    assert client.get(URL).status_code == 200
    assert client.get(URL).status_code == 429


def test_the_rate_limit_counts_each_key_apart(make_client: Any) -> None:
    client = make_client()
    fake_limiter(client, per_minute=2)
    assert [client.get(URL).status_code for _ in range(3)] == [200, 200, 429]
    other = {"Authorization": f"Bearer {new_key('another-tenant')}"}
    assert client.get(URL, headers=other).status_code == 200


def test_health_docs_and_unauthenticated_requests_are_not_rate_limited(
    make_client: Any,
) -> None:
    client = make_client()
    fake_limiter(client, per_minute=1)
    assert client.get("/v1/datasets").status_code == 200
    assert client.post(URL, json=make_payload()).status_code == 429
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 200, path
    assert client.get(URL, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_rate_limit_zero_turns_it_off(make_client: Any) -> None:
    client = make_client(rate_limit_per_minute=0)
    assert {client.get(URL).status_code for _ in range(50)} == {200}


@pytest.mark.parametrize("follow", [
    ("/v1/finetune/llm/{id}", "/v1/finetune/llm/{id}/logs"),
    # How the monsterapi client follows a job (tests/e2e/test_monsterapi_client.py).
    ("/v1/deploy/status/{id}", "/v1/deploy/logs/{id}"),
    ("/v1/fine_tuning/jobs/ftjob-{id}", "/v1/fine_tuning/jobs/ftjob-{id}/events"),
], ids=["monsterapi-dialect", "monsterapi-client", "openai-dialect"])
def test_polling_a_job_at_2_hz_for_a_minute_never_gets_429_while_a_burst_of_submits_does(
    make_client: Any, follow: tuple[str, str],
) -> None:
    client = make_client(max_active_jobs_per_tenant=0)
    limits = get_settings().limits
    assert (limits.rate_limit_per_minute, limits.read_rate_limit_per_minute) == (120, 600)
    clock = fake_limiter(client, limits.rate_limit_per_minute, limits.read_rate_limit_per_minute)
    job_id = client.post(URL, json=make_payload()).json()["job_id"]
    status_path, logs_path = (path.format(id=job_id) for path in follow)

    answers = []
    for _ in range(120):  # a simulated minute: status and logs, twice a second each
        answers += [client.get(status_path).status_code, client.get(logs_path).status_code]
        clock.now += 0.5
    assert answers == [200] * 240

    # The polling left the general budget whole: a burst of submits gets the old limit, and
    # the job's reads still answer once the submits are refused.
    burst = limits.rate_limit_per_minute
    submits = [client.post(URL, json=make_payload()) for _ in range(burst + 1)]
    assert [r.status_code for r in submits] == [201] * burst + [429]
    error = assert_error(submits[-1], 429, "rate_limited")
    assert "at most 120 per minute (TUNERY_RATE_LIMIT_PER_MINUTE)" in error["message"]
    assert client.get(status_path).status_code == 200


def test_every_read_of_one_job_draws_from_the_read_budget_and_its_429_names_it(
    make_client: Any,
) -> None:
    client = make_client()
    job_id = client.post(URL, json=make_payload()).json()["job_id"]
    assert client.post(f"{URL}/{job_id}/cancel").status_code == 200  # its stream ends at once
    reads = [f"{URL}/{job_id}", f"{URL}/{job_id}/logs", f"{URL}/{job_id}/metrics",
             f"{URL}/{job_id}/stream", f"/v1/deploy/status/{job_id}", f"/v1/deploy/logs/{job_id}",
             f"/v1/fine_tuning/jobs/ftjob-{job_id}", f"/v1/fine_tuning/jobs/ftjob-{job_id}/events",
             f"/v1/files/file-{'0' * 32}"]
    clock = fake_limiter(client, per_minute=2, read_per_minute=len(reads))
    assert [client.get(path).status_code for path in reads] == [200] * 8 + [404]

    refused = client.get(f"{URL}/{job_id}/logs")
    error = assert_error(refused, 429, "rate_limited")
    assert refused.headers["Retry-After"] == str(math.ceil(60 / len(reads)))
    assert (f"at most {len(reads)} per minute (TUNERY_READ_RATE_LIMIT_PER_MINUTE)"
            in error["message"])
    # The general budget is untouched by the reads, and spent apart from them.
    assert [client.get(URL).status_code for _ in range(3)] == [200, 200, 429]
    clock.now += math.ceil(60 / len(reads))
    assert client.get(f"{URL}/{job_id}").status_code == 200


def test_rate_limit_zero_turns_the_read_budget_off_too(make_client: Any) -> None:
    client = make_client(rate_limit_per_minute=0, read_rate_limit_per_minute=1)
    job_id = client.post(URL, json=make_payload()).json()["job_id"]
    assert {client.get(f"{URL}/{job_id}").status_code for _ in range(5)} == {200}


def test_the_token_bucket_refills_continuously_up_to_one_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)  # one per second
    assert [limiter.retry_after("k") for _ in range(60)] == [None] * 60
    assert limiter.retry_after("k") == 1
    clock.now += 3600  # an idle hour refills one burst, not 3600 requests
    assert sum(limiter.retry_after("k") is None for _ in range(100)) == 60


# Active jobs per tenant ----------------------------------------------------------------------

def set_status(job_id: str, status: JobStatus) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status.value  # test setup: a worker's transitions, skipped


def test_a_submit_beyond_the_active_jobs_cap_is_429_until_one_ends(make_client: Any) -> None:
    client = make_client(max_active_jobs_per_tenant=2)
    first, second = (client.post(URL, json=make_payload()).json()["job_id"] for _ in range(2))
    refused = client.post(URL, json=make_payload())
    error = assert_error(refused, 429, "too_many_active_jobs")
    assert refused.headers["Retry-After"].isdigit()
    assert "TUNERY_MAX_ACTIVE_JOBS_PER_TENANT=2" in error["message"]
    set_status(first, JobStatus.RUNNING)  # running jobs count too
    assert client.post(URL, json=make_payload()).status_code == 429
    set_status(second, JobStatus.COMPLETED)
    assert client.post(URL, json=make_payload()).status_code == 201
    other = {"Authorization": f"Bearer {new_key('another-tenant')}"}
    assert client.post(URL, json=make_payload(), headers=other).status_code == 201


def test_an_idempotent_replay_is_answered_even_at_the_cap(make_client: Any) -> None:
    client = make_client(max_active_jobs_per_tenant=1)
    headers = {"Idempotency-Key": "once"}
    first = client.post(URL, json=make_payload(), headers=headers)
    replay = client.post(URL, json=make_payload(), headers=headers)
    assert (first.status_code, replay.status_code) == (201, 201)
    assert replay.json() == first.json()


@contextmanager
def sql_and_commits() -> Iterator[list[str]]:
    """Every SQL statement the app's engine runs, and "COMMIT" for every commit, in order."""
    engine = get_engine()
    seen: list[str] = []

    def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        seen.append(" ".join(sql.split()))

    def commit(_conn: Any) -> None:
        seen.append("COMMIT")

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)


def test_a_submit_locks_its_tenant_only_for_the_count_and_the_commit(make_client: Any) -> None:
    client = make_client(max_active_jobs_per_tenant=5)
    with sql_and_commits() as seen:
        assert client.post(URL, json=make_payload(),
                           headers={"Idempotency-Key": "k1"}).status_code == 201
    locked = next(i for i, sql in enumerate(seen) if sql.startswith("UPDATE tenants"))
    # The job, its event and its idempotency record are written before the lock, so that
    # concurrent submits of the tenant wait for each other's count and commit only.
    written = " ".join(seen[:locked])
    for table in ("jobs", "job_events", "idempotency_keys"):
        assert f"INSERT INTO {table} " in written, table
    count, commit = seen[locked + 1:]
    assert count.startswith("SELECT count(*)") and "FROM jobs" in count
    assert commit == "COMMIT"


def submit_concurrently(client: TestClient, n: int) -> list[int]:
    barrier = threading.Barrier(n)
    statuses = [0] * n

    def submit(i: int) -> None:
        barrier.wait()
        statuses[i] = client.post(URL, json=make_payload()).status_code

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def active_job_count() -> int:
    with session_scope() as session:
        return len(session.scalars(select(Job.id).where(Job.status == "QUEUED")).all())


def test_twenty_concurrent_submits_on_sqlite_never_pass_the_cap(make_client: Any) -> None:
    client = make_client(max_active_jobs_per_tenant=10)
    statuses = submit_concurrently(client, 20)
    assert sorted(statuses) == [201] * 10 + [429] * 10
    assert active_job_count() == 10
