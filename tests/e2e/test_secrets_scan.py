"""After a real job with an hub token and a W&B key has run on the embedded stack (API and
worker processes), nothing on disk holds a secret in plaintext: every table and column of every
database (jobs, idempotency records, the broker's messages), every log file, every stored file;
and no API response echoes one."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import MetaData, create_engine, select

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env, tiny_payload, wait_for_terminal
from tests.webhook_receiver import receiver


def database_cells(db_file: Path) -> Iterator[tuple[str, str]]:
    """(table.column, text) of every non-null cell of every table, found by reflection."""
    engine = create_engine(f"sqlite:///{db_file}")
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                for row in conn.execute(select(table)):
                    for column, value in zip(table.columns, row, strict=True):
                        if value is None:
                            continue
                        if isinstance(value, bytes):
                            text = value.decode("utf-8", "replace")
                        elif isinstance(value, dict | list):
                            text = json.dumps(value)
                        else:
                            text = str(value)
                        yield f"{db_file.name}:{table.name}.{column.name}", text
    finally:
        engine.dispose()


def scan(tmp_path: Path, data_dir: Path, secret_values: dict[str, str]) -> dict[str, list[str]]:
    """Where each secret was found: database cells, then the bytes of every file under
    tmp_path (log files, storage, the database files themselves, free pages included)."""
    hits: dict[str, list[str]] = {name: [] for name in secret_values}
    cells = 0
    for db_file in sorted(data_dir.glob("*.db")):
        for where, text in database_cells(db_file):
            cells += 1
            for name, value in secret_values.items():
                if value in text:
                    hits[name].append(where)
    assert cells > 50, "the scan read almost nothing: wrong data dir?"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in secret_values.items():
            if value.encode() in data:
                hits[name].append(str(path.relative_to(tmp_path)))
    return {name: where for name, where in hits.items() if where}


def test_no_secret_reaches_the_database_the_logs_or_a_response(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    data_dir = tmp_path / "data"
    # DEBUG: whatever a library logs only at debug level is scanned too.
    env = stack_env(data_dir, [ASSETS_DIR, tiny_model_dir], WANDB_MODE="offline",
                    TUNERY_LOG_LEVEL="DEBUG", TUNERY_ALLOW_HTTP_URLS="true",
                    TUNERY_ALLOWED_PRIVATE_URL_HOSTS='["127.0.0.1"]',
                    TUNERY_WEBHOOK_POLL_INTERVAL_S="0.2")
    stack = start_stack(env)
    api_key = create_key(env)
    hf_token = "hf_" + secrets.token_hex(17)
    wandb_key = secrets.token_hex(20)
    payload: dict[str, Any] = tiny_payload(tiny_model_dir, num_train_epochs=0.1)
    payload["hf_config"] = {"hf_token": hf_token}
    payload["logging_config"] = {"use_wandb": True, "wandb_project": "tunery-secrets",
                                 "wandb_login_key": wandb_key}
    secret_values = {"api key": api_key, "api key secret": api_key.split("_")[2],
                     "hf_token": hf_token, "wandb_login_key": wandb_key}

    responses = []
    with receiver() as hooks, httpx.Client(base_url=stack.base_url, timeout=30,
                                           headers={"Authorization": f"Bearer {api_key}"}
                                           ) as client:
        # Webhook signing secrets: shown in these two answers only, then signing deliveries.
        created = client.post("/v1/webhook_endpoints", json={"url": hooks.url}).json()
        rotated = client.post(f"/v1/webhook_endpoints/{created['id']}/rotate_secret").json()
        for n, secret in enumerate((created["signing_secret"], rotated["signing_secret"])):
            secret_values[f"webhook secret {n}"] = secret
            secret_values[f"webhook secret {n} key"] = secret.removeprefix("whsec_")
        submitted = client.post("/v1/finetune/llm", json=payload,
                                headers={"Idempotency-Key": "scan-1"})
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        job = wait_for_terminal(client, job_id)
        assert job["status"] == "COMPLETED", job
        delivered = hooks.wait_for(3)  # queued, started, ... signed with both secrets
        assert len(delivered[0].headers["webhook-signature"].split(" ")) == 2
        webhook_responses = [client.get(f"/v1/webhook_endpoints/{created['id']}"),
                             client.get(f"/v1/webhook_endpoints/{created['id']}/attempts"),
                             client.get("/v1/webhook_endpoints")]
        responses += [submitted, client.get(f"/v1/finetune/llm/{job_id}"),
                      client.get("/v1/finetune/llm"),
                      client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 1000}),
                      client.post("/v1/finetune/llm", json=payload,
                                  headers={"Idempotency-Key": "scan-1"})]
        # A wrong key, logged nowhere either.
        wrong = api_key[:-6] + "zzzzzz"
        secret_values["wrong key"] = wrong
        refused = httpx.get(f"{stack.base_url}/v1/finetune/llm",
                            headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401
    stack.stop()  # flushes the processes' logs

    assert responses[-1].headers.get("Idempotent-Replayed") == "true"
    shown = responses[1].json()["payload"]
    assert shown["hf_config"]["hf_token"] == "***"
    assert shown["logging_config"]["wandb_login_key"] == "***"
    for response in [*responses, *webhook_responses, refused]:
        for name, value in secret_values.items():
            assert value not in response.text, f"{name} in {response.request.url}"

    assert scan(tmp_path, data_dir, secret_values) == {}
