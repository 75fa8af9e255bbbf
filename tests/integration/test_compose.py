"""The deployment files: valid for docker-compose, and the promises the design makes about them.

Needs Debian's `docker-compose` (1.29, Python) on PATH, not a Docker engine: `config` only
parses and validates. CI installs it; a missing binary fails the test rather than hiding it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "deploy" / "compose.cpu-worker.yml"
ONE_SHOT_SERVICES = {"minio-init"}


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not installed; install it with "
            "`apt-get update && apt-get install -y docker-compose` (CI does)"
        )
    return binary


def _compose_config(*files: Path, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    args = [_docker_compose()]
    for file in files:
        args += ["-f", str(file)]
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
