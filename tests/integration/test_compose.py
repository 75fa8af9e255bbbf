"""The deployment files: valid for docker-compose, and the promises the design makes about them.

Needs Debian's `docker-compose` (1.29, Python) on PATH, not a Docker engine: `config` only
parses and validates. CI installs it; a missing binary fails the test rather than hiding it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "deploy" / "compose.cpu-worker.yml"
ONE_SHOT_SERVICES = {"minio-init"}
VLLM_DIR = ROOT / "deploy" / "vllm"


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not installed; install it with "
            "`apt-get update && apt-get install -y docker-compose` (CI does)"
        )
    return binary


def _compose_config(
    *files: Path, quiet: bool = False, profiles: tuple[str, ...] = (),
    env_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [_docker_compose()]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    for file in files:
        args += ["-f", str(file)]
    for profile in profiles:
        args += ["--profile", profile]
    args += ["config", "-q"] if quiet else ["config"]
    # A clean environment: defaults in the files must be enough, whatever the CI shell holds.
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}
    )


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu-stack", "cpu-override"]
)
def test_compose_files_pass_docker_compose_config(files: tuple[Path, ...]) -> None:
    result = _compose_config(*files, quiet=True)
    assert result.returncode == 0, result.stderr


def test_api_image_never_installs_torch_or_the_worker_extra() -> None:
    dockerfile = (ROOT / "Dockerfile.api").read_text().lower()
    assert "torch" not in dockerfile
    assert "[worker" not in dockerfile and ",worker" not in dockerfile
    assert '".[api]"' in dockerfile
    api = _load(COMPOSE)["services"]["api"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"


def test_api_image_runs_as_non_root_with_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile.api").read_text()
    assert "\nUSER tunery\n" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "tunery db upgrade" in dockerfile and "api.main:app" in dockerfile


def test_worker_reserves_one_nvidia_gpu() -> None:
    worker = _load(COMPOSE)["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"


def test_every_service_has_a_healthcheck_or_is_a_one_shot() -> None:
    for files in [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)]:
        result = _compose_config(*files)
        assert result.returncode == 0, result.stderr
        services = yaml.safe_load(result.stdout)["services"]
        for name, service in services.items():
            if name in ONE_SHOT_SERVICES:
                assert service.get("restart") == "no", f"{name} is a one-shot; it must not restart"
                continue
            assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"


def test_services_start_only_after_their_dependencies_are_ready() -> None:
    services = _load(COMPOSE)["services"]
    allowed = {"service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec["condition"] in allowed, f"{name} -> {dependency}"
            if dependency in ONE_SHOT_SERVICES:
                assert spec["condition"] == "service_completed_successfully"
    assert services["api"]["environment"]["TUNERY_STORAGE_URL"] == "s3://tunery/"
    assert services["api"]["environment"]["TUNERY_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_cpu_override_drops_the_gpu_worker_from_the_default_set() -> None:
    result = _compose_config(COMPOSE, CPU_OVERRIDE)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["worker"]["profiles"] == ["gpu"]
    assert "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_the_vllm_profile_passes_docker_compose_config() -> None:
    result = _compose_config(COMPOSE, quiet=True, profiles=("vllm",))
    assert result.returncode == 0, result.stderr


def _vllm_and_api() -> tuple[dict[str, Any], dict[str, Any]]:
    result = _compose_config(COMPOSE, profiles=("vllm",))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    return services["vllm"], services["api"]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_vllm_serves_adapters_by_name_for_the_api_and_only_for_it() -> None:
    vllm, api = _vllm_and_api()
    command = vllm["command"]
    assert vllm["profiles"] == ["vllm"]
    assert vllm["build"]["dockerfile"] == "deploy/vllm/Dockerfile"
    assert "--enable-lora" in command
    assert _flag(command, "--max-lora-rank") == "64"
    assert int(_flag(command, "--max-cpu-loras")) >= int(_flag(command, "--max-loras")) >= 1
    # The API calls the engine with the token vLLM requires, at the port vLLM listens on.
    assert _flag(command, "--api-key") == api["environment"]["TUNERY_INFERENCE_ENGINE_TOKEN"]
    assert api["environment"]["TUNERY_INFERENCE_ENGINE_URL"] == (
        f"http://vllm:{_flag(command, '--port')}"
    )
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_vllm_reads_the_api_s_storage_and_holds_no_other_secret() -> None:
    vllm, api = _vllm_and_api()
    storage = ["TUNERY_STORAGE_URL", "TUNERY_S3_ENDPOINT_URL", "TUNERY_S3_ACCESS_KEY_ID",
               "TUNERY_S3_SECRET_ACCESS_KEY", "TUNERY_S3_REGION"]
    assert {name: vllm["environment"][name] for name in storage} == {
        name: api["environment"][name] for name in storage
    }
    assert not {"TUNERY_DATABASE_URL", "TUNERY_BROKER_URL", "TUNERY_SECRET_KEY"} & set(
        vllm["environment"]
    )
    # The adapter cache survives restarts in a volume, at the folder the image names.
    cache_dir = re.search(r"TUNERY_VLLM_CACHE_DIR=(\S+)", (VLLM_DIR / "Dockerfile").read_text())
    assert cache_dir is not None
    assert any(volume.split(":")[1] == cache_dir[1] for volume in vllm["volumes"])


def test_vllm_image_pins_the_official_image_and_turns_the_resolver_on() -> None:
    dockerfile = (VLLM_DIR / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+$", dockerfile, re.M)
    assert "\nFROM ${VLLM_IMAGE}\n" in dockerfile
    entry_points = tomllib.loads((VLLM_DIR / "pyproject.toml").read_text())["project"][
        "entry-points"
    ]["vllm.general_plugins"]
    assert f"VLLM_PLUGINS={next(iter(entry_points))}" in dockerfile
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in dockerfile
    # Tunery itself without its dependencies: vLLM's packages are left as they are.
    assert "pip install --no-deps ." in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored.index("!deploy/vllm") > ignored.index("deploy")


PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu-stack", "cpu-override"]
)
def test_the_metrics_profile_scrapes_the_api_with_its_token_and_every_worker(
    files: tuple[Path, ...],
) -> None:
    result = _compose_config(*files, profiles=("metrics",))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["metrics"]
    jobs = {job["job_name"]: job for job in _load(PROMETHEUS_CONFIG)["scrape_configs"]}

    api_job = jobs["tunery-api"]
    assert api_job["static_configs"][0]["targets"] == ["api:8000"]
    # The token Prometheus sends is the one the API requires: the same variable, written to
    # the file the scrape reads.
    token = services["api"]["environment"]["TUNERY_METRICS_TOKEN"]
    assert token and services["prometheus"]["environment"]["TUNERY_METRICS_TOKEN"] == token
    credentials = api_job["authorization"]["credentials_file"]
    assert f"> {credentials}" in services["prometheus"]["command"][0]

    worker_job = jobs["tunery-worker"]["dns_sd_configs"][0]
    workers = [name for name in ("worker", "worker-cpu") if name in services
               and "gpu" not in services[name].get("profiles", [])]
    assert workers and set(workers) <= set(worker_job["names"])
    for name in workers:
        environment = services[name]["environment"]
        assert int(environment["TUNERY_WORKER_METRICS_PORT"]) == worker_job["port"]
        assert environment["TUNERY_WORKER_METRICS_HOST"] == "0.0.0.0"
        assert "ports" not in services[name]  # scraped inside the compose network only


def test_grafana_loads_the_dashboard_from_prometheus() -> None:
    grafana = _load(COMPOSE)["services"]["grafana"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
    dashboards = mounts["./deploy/grafana/tunery.json"]
    provider = _load(ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "tunery.yml")
    assert Path(dashboards).parent == Path(provider["providers"][0]["options"]["path"])
    source = _load(ROOT / "deploy" / "grafana" / "provisioning" / "datasources" /
                   "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


ENV_EXAMPLE = ROOT / ".env.example"
TUNERY_SERVICES = ("api", "worker", "worker-cpu", "vllm")


def _services(*files: Path, env_file: Path | None = None) -> dict[str, Any]:
    result = _compose_config(*files, profiles=("vllm", "metrics", "gpu"), env_file=env_file)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu-stack", "cpu-override"]
)
def test_published_ports_listen_on_loopback_unless_asked(files: tuple[Path, ...]) -> None:
    for name, service in _services(*files).items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def _settings_problems_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What Tunery's settings say about a service's environment, as its process would read it."""
    from shared.settings import settings_problems

    environment = {str(k): str(v) for k, v in service["environment"].items()}
    # The images set the data dir; TUNERY_DATA_DIR here keeps the check off the checkout.
    environment.setdefault("TUNERY_DATA_DIR", str(ROOT / "build" / "compose-check"))
    for name in list(os.environ):
        if name.upper().startswith("TUNERY_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return settings_problems()


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu-stack", "cpu-override"]
)
def test_development_secrets_start_only_with_the_env_example_s_flag(
    files: tuple[Path, ...], monkeypatch: pytest.MonkeyPatch,
) -> None:
    bare, developer = _services(*files), _services(*files, env_file=ENV_EXAMPLE)
    names = [name for name in TUNERY_SERVICES if name in bare]
    assert {"api", "worker", "vllm"} <= set(names)
    for name in names:
        problems = _settings_problems_of(bare[name], monkeypatch)
        assert len(problems) == 1 and "a development default" in problems[0], (name, problems)
        assert _settings_problems_of(developer[name], monkeypatch) == [], name
    assert "TUNERY_SECRET_KEY" in _settings_problems_of(bare["api"], monkeypatch)[0]


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu-stack", "cpu-override"]
)
def test_api_and_workers_share_a_models_volume_they_may_read_local_models_from(
    files: tuple[Path, ...],
) -> None:
    services = _services(*files)
    for name in ("api", "worker", "worker-cpu"):
        if name not in services:
            continue
        allowed = json.loads(services[name]["environment"]["TUNERY_ALLOWED_LOCAL_DIRS"])
        mounts = [volume.split(":") for volume in services[name]["volumes"]]
        models = [mount for mount in mounts if mount[0] == "models"]
        assert len(models) == 1 and models[0][1] in allowed, name
    # The worker writes it (`tunery assets ... --dest`), the API only reads it.
    assert _volume_mode(services["api"], "models") == "ro"
    assert _volume_mode(services["worker"], "models") == "rw"


def _volume_mode(service: dict[str, Any], volume: str) -> str:
    mount = next(v.split(":") for v in service["volumes"] if v.startswith(f"{volume}:"))
    return mount[2] if len(mount) > 2 else "rw"
