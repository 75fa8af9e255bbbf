"""Settings: every flat `TUNERY_*` name still lands in its group, the nested names work, the
embedded defaults hold, and the README documents every setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from shared.device_classes import DeviceClass
from shared.settings import (
    GROUPS,
    LEGACY_NAMES,
    PROJECT_ROOT,
    Settings,
    settings_error_lines,
    settings_problems,
)

TOP_LEVEL = ("data_dir", "secret_key", "dev_secrets", "log_level")

# Flat environment value -> the value the grouped field must hold. Every flat name has a row
# (test_every_legacy_name_has_a_row), so a new setting cannot skip this test.
LEGACY_ENV: dict[str, tuple[str, Any]] = {
    "database_url": ("postgresql+psycopg://u:p@db/tunery", "postgresql+psycopg://u:p@db/tunery"),
    "db_pool_size": ("7", 7),
    "db_max_overflow": ("3", 3),
    "auto_migrate": ("false", False),
    "broker_url": ("redis://redis:6379/0", "redis://redis:6379/0"),
    "queue_name": ("gpu", "gpu"),
    # Named "train", so that the worker's class below is one of them alone or all at once.
    "device_classes": ('[{"name": "train", "devices": 1}, '
                       '{"name": "gpu-x2", "devices": 2, "memory_gb": 80}]',
                       [DeviceClass(name="train", devices=1),
                        DeviceClass(name="gpu-x2", devices=2, memory_gb=80.0)]),
    "worker_device_class": ("train", "train"),
    "storage_url": ("s3://bucket/prefix", "s3://bucket/prefix"),
    "s3_endpoint_url": ("http://minio:9000", "http://minio:9000"),
    "s3_access_key_id": ("key-id", "key-id"),
    "s3_secret_access_key": ("key-secret", "key-secret"),
    "s3_public_endpoint_url": ("https://files.example", "https://files.example"),
    "s3_region": ("eu-west-3", "eu-west-3"),
    "s3_presign_expiry_s": ("600", 600),
    "storage_connect_timeout_s": ("1.5", 1.5),
    "storage_read_timeout_s": ("7", 7.0),
    "storage_retry_deadline_s": ("60", 60.0),
    "allowed_local_dirs": ('["/srv/data"]', [Path("/srv/data").resolve()]),
    "allow_http_urls": ("true", True),
    "allowed_private_url_hosts": ('["minio"]', ["minio"]),
    "hub_endpoint": ("http://hub.internal:8080/", "http://hub.internal:8080"),
    "hub_check_timeout_s": ("0.5", 0.5),
    "max_dataset_bytes": ("1000", 1000),
    "max_request_bytes": ("2000", 2000),
    "max_dataset_rows": ("30", 30),
    "max_row_bytes": ("4096", 4096),
    "max_tenant_dataset_bytes": ("0", 0),
    "max_tenant_datasets": ("5", 5),
    "max_cutoff_len": ("512", 512),
    "max_epochs": ("1.5", 1.5),
    "max_lora_r": ("8", 8),
    "rate_limit_per_minute": ("0", 0),
    "read_rate_limit_per_minute": ("300", 300),
    "max_active_jobs_per_tenant": ("2", 2),
    "auth_failures_per_minute": ("4", 4),
    "idempotency_ttl_s": ("60", 60),
    "lease_seconds": ("10", 10),
    "heartbeat_seconds": ("0.5", 0.5),
    "reaper_interval_s": ("1.5", 1.5),
    "max_attempts": ("5", 5),
    "release_dead_local_workers": ("false", False),
    "job_soft_time_limit_s": ("100", 100),
    "job_hard_time_limit_s": ("90000", 90000),
    "work_dir": ("/srv/work", Path("/srv/work")),
    "checkpoint_every_steps": ("0", 0),
    "checkpoints_to_keep": ("4", 4),
    "training_memory_gb": ("12.5", 12.5),
    "cpu_bf16": ("off", "off"),
    "worker_devices": ("2", 2),
    "process_group_timeout_s": ("60", 60),
    "base_model_cache": ("false", False),
    "wandb_init_timeout_s": ("5", 5.0),
    "wandb_finish_timeout_s": ("7.5", 7.5),
    "eval_compute_share": ("0.2", 0.2),
    "eval_max_examples": ("64", 64),
    "openai_cutoff_len": ("1024", 1024),
    "openai_wandb_api_key": ("wandb-secret", SecretStr("wandb-secret")),
    "openai_result_files_base64": ("false", False),
    "openai_model_aliases": ('{"gpt-4o-mini": "Qwen/Qwen2.5-7B-Instruct"}',
                             {"gpt-4o-mini": "Qwen/Qwen2.5-7B-Instruct"}),
    "inference_engine_url": ("http://10.0.0.5:8000", "http://10.0.0.5:8000"),
    "inference_engines": ('{"Qwen/Qwen2.5-7B-Instruct": "http://vllm:8000"}',
                          {"Qwen/Qwen2.5-7B-Instruct": "http://vllm:8000"}),
    "inference_engine_token": ("engine-secret", SecretStr("engine-secret")),
    "inference_base_models": ('["Qwen/Qwen2.5-7B-Instruct"]', ["Qwen/Qwen2.5-7B-Instruct"]),
    "inference_max_prompt_tokens": ("2048", 2048),
    "inference_max_tokens": ("64", 64),
    "inference_max_n": ("2", 2),
    "inference_timeout_s": ("30", 30.0),
    "inference_max_adapters": ("3", 3),
    "inference_adapter_memory_mb": ("256", 256),
    "inference_max_bases": ("2", 2),
    "inference_max_batch_size": ("16", 16),
    "metrics_token": ("scrape-secret", SecretStr("scrape-secret")),
    "worker_metrics_port": ("9101", 9101),
    "worker_metrics_host": ("0.0.0.0", "0.0.0.0"),
    "webhook_timeout_s": ("2.5", 2.5),
    "webhook_retry_window_s": ("3600", 3600),
    "webhook_retry_base_s": ("0.5", 0.5),
    "webhook_retry_max_interval_s": ("60", 60.0),
    "webhook_secret_rotation_window_s": ("0", 0),
    "webhook_sender_threads": ("2", 2),
    "webhook_max_in_flight_per_tenant": ("3", 3),
    "webhook_poll_interval_s": ("0.2", 0.2),
    "webhook_history_days": ("7", 7),
    "stream_poll_s": ("0.25", 0.25),
    "stream_heartbeat_s": ("5", 5.0),
    "stream_max_per_key": ("3", 3),
    "stream_read_threads": ("2", 2),
    "retention_days": ("30", 30),
    "artifact_retention_days": ("90", 90),
    "retention_batch": ("10", 10),
}


def grouped(settings: Settings, flat: str) -> Any:
    group, field = LEGACY_NAMES[flat]
    return getattr(getattr(settings, group), field)


def test_the_table_maps_every_grouped_field_once() -> None:
    targets = list(LEGACY_NAMES.values())
    assert len(targets) == len(set(targets))
    assert set(targets) == {(g, f) for g, model in GROUPS.items() for f in model.model_fields}
    assert set(Settings.model_fields) == set(TOP_LEVEL) | set(GROUPS)
    assert not set(LEGACY_NAMES) & (set(GROUPS) | set(TOP_LEVEL))


def test_every_legacy_name_has_a_row() -> None:
    assert set(LEGACY_ENV) == set(LEGACY_NAMES)


@pytest.mark.parametrize("flat", sorted(LEGACY_ENV))
def test_legacy_env_name_lands_in_its_group(clean_env: pytest.MonkeyPatch, flat: str) -> None:
    raw, expected = LEGACY_ENV[flat]
    clean_env.setenv(f"TUNERY_{flat.upper()}", raw)
    assert grouped(Settings(), flat) == expected


def test_all_legacy_env_names_at_once(clean_env: pytest.MonkeyPatch) -> None:
    for flat, (raw, _) in LEGACY_ENV.items():
        clean_env.setenv(f"TUNERY_{flat.upper()}", raw)
    settings = Settings()
    for flat, (_, expected) in LEGACY_ENV.items():
        assert grouped(settings, flat) == expected, flat


@pytest.mark.parametrize("flat", sorted(LEGACY_ENV))
def test_flat_keyword_lands_in_its_group(clean_env: pytest.MonkeyPatch, flat: str) -> None:
    _, expected = LEGACY_ENV[flat]
    assert grouped(Settings(**{flat: expected}), flat) == expected


def test_nested_env_name_works_and_wins_over_the_flat_one(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUNERY_LIMITS__MAX_DATASET_ROWS", "11")
    assert Settings().limits.max_dataset_rows == 11
    clean_env.setenv("TUNERY_MAX_DATASET_ROWS", "22")
    clean_env.setenv("TUNERY_DATABASE__POOL_SIZE", "4")
    settings = Settings()
    assert settings.limits.max_dataset_rows == 11
    assert settings.database.pool_size == 4
    assert settings.limits.max_lora_r == 256  # the rest of the group keeps its defaults


def test_keyword_wins_over_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUNERY_MAX_DATASET_ROWS", "22")
    clean_env.setenv("TUNERY_MAX_LORA_R", "16")
    settings = Settings(max_dataset_rows=5)
    assert (settings.limits.max_dataset_rows, settings.limits.max_lora_r) == (5, 16)


def test_model_copy_refuses_a_flat_name(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="cpu_bf16"):
        settings.model_copy(update={"cpu_bf16": "off"})
    copied = settings.model_copy(
        update={"training": settings.training.model_copy(update={"cpu_bf16": "off"})})
    assert copied.training.cpu_bf16 == "off"


def test_no_environment_gives_the_embedded_stack(clean_env: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    clean_env.delenv("TUNERY_DATA_DIR")
    settings = Settings()
    data = (PROJECT_ROOT / "data").resolve()
    assert settings.data_dir == data
    assert settings.database.url == f"sqlite:///{data / 'tunery.db'}"
    assert settings.broker.url == f"sqla+sqlite:///{data / 'broker.db'}"
    assert settings.storage.url == (data / "storage").as_uri()
    assert settings.training.work_dir == data / "work"
    assert settings.sources.allowed_local_dirs == []
    assert settings.limits.max_dataset_rows == 10_000_000
    assert settings.leases.lease_seconds == 30
    assert settings.leases.release_dead_local_workers is True
    assert settings.secret_key is None


@pytest.mark.parametrize("env", [
    {"TUNERY_HEARTBEAT_SECONDS": "60"},
    {"TUNERY_JOB_SOFT_TIME_LIMIT_S": "100", "TUNERY_JOB_HARD_TIME_LIMIT_S": "100"},
])
def test_inconsistent_leases_are_refused(clean_env: pytest.MonkeyPatch,
                                         env: dict[str, str]) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("variable", ["TUNERY_ALLOWED_LOCAL_DIRS",
                                      "TUNERY_SOURCES__ALLOWED_LOCAL_DIRS"])
def test_a_list_that_is_not_json_is_reported_under_the_variable_set(
        clean_env: pytest.MonkeyPatch, variable: str) -> None:
    clean_env.setenv(variable, "/some/dir")

    assert settings_problems() == [
        f"{variable}: expected a JSON list such as '[\"/data/models\", \"/data/datasets\"]', "
        "got '/some/dir'"
    ]


def test_valid_settings_have_no_problems(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUNERY_ALLOWED_LOCAL_DIRS", '["/srv/data"]')
    assert settings_problems() == []


def test_a_secret_setting_is_never_repeated_in_its_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(secret_key=987654321)

    assert settings_error_lines(caught.value, {}) == ["TUNERY_SECRET_KEY: expected a valid string"]


def readme_rows() -> dict[str, list[str]]:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text[text.index("## Configuration"):]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `TUNERY_") and len(cells) == 4:
            rows[cells[0]] = cells
    return rows


def test_readme_documents_every_setting() -> None:
    rows = readme_rows()
    expected = {f"`TUNERY_{name.upper()}`": name for name in TOP_LEVEL}
    expected |= {f"`TUNERY_{flat.upper()}`": ".".join(path) for flat, path in LEGACY_NAMES.items()}
    assert sorted(set(expected) - set(rows)) == []
    for variable, path in expected.items():
        _, setting, default, meaning = rows[variable]
        assert setting == f"`{path}`", variable
        assert default and meaning, f"{variable}: a default and a meaning, please"
    assert sorted(set(rows) - set(expected)) == [], "README lists a setting the code lacks"


def test_every_field_has_a_description() -> None:
    fields = [(name, f) for name, f in Settings.model_fields.items() if name in TOP_LEVEL]
    fields += [(f"{g}.{n}", f) for g, m in GROUPS.items() for n, f in m.model_fields.items()]
    assert [name for name, field in fields if not field.description] == []


def test_readme_shows_the_nested_form() -> None:
    text = (PROJECT_ROOT / "README.md").read_text()
    assert "`TUNERY_LIMITS__MAX_DATASET_ROWS`" in text


def test_an_empty_metrics_token_is_no_token(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUNERY_METRICS_TOKEN", "")
    assert Settings().metrics.token is None
    clean_env.setenv("TUNERY_METRICS_TOKEN", "  ")
    assert Settings().metrics.token is None


SERVERS = {
    "TUNERY_DATABASE_URL": "postgresql+psycopg://tunery:pw@db/tunery",
    "TUNERY_BROKER_URL": "redis://redis:6379/0",
    "TUNERY_STORAGE_URL": "s3://tunery/",
}


def test_a_stack_on_servers_uses_no_data_dir_and_scratches_in_the_cache_dir(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.delenv("TUNERY_DATA_DIR")
    for name, value in SERVERS.items():
        clean_env.setenv(name, value)
    clean_env.setenv("TUNERY_SECRET_KEY", "k")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    settings = Settings()

    assert not settings.uses_data_dir()
    assert settings.training.work_dir == tmp_path / "cache" / "tunery" / "work"
    assert settings.local_files_dir() == tmp_path / "cache" / "tunery"


@pytest.mark.parametrize("change", [
    {"TUNERY_DATABASE_URL": None},  # the SQLite default
    {"TUNERY_BROKER_URL": None},  # the embedded broker
    {"TUNERY_STORAGE_URL": None},  # local storage
    {"TUNERY_DATA_DIR": "/srv/tunery"},  # asked for
])
def test_an_embedded_part_or_a_data_dir_asked_for_keeps_the_data_dir(
        clean_env: pytest.MonkeyPatch, change: dict[str, str | None]) -> None:
    clean_env.delenv("TUNERY_DATA_DIR")
    for name, value in {**SERVERS, "TUNERY_SECRET_KEY": "k", **change}.items():
        if value is None:
            clean_env.delenv(name, raising=False)
        else:
            clean_env.setenv(name, value)

    settings = Settings()

    assert settings.uses_data_dir()
    assert settings.training.work_dir == settings.data_dir / "work"


def test_a_stack_on_servers_without_a_secret_key_is_refused_in_one_line(
        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.delenv("TUNERY_DATA_DIR")
    for name, value in SERVERS.items():
        clean_env.setenv(name, value)

    problems = settings_problems()

    assert len(problems) == 1
    assert problems[0].startswith("TUNERY_SECRET_KEY: must be set when the database, broker "
                                  "and storage are all servers")
    assert "Fernet.generate_key()" in problems[0]
