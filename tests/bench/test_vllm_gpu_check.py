"""The GPU check of the vLLM path (bench/gpu) is ready to run where no GPU is: the script
parses, refuses missing inputs before installing anything, the client fails loudly when no
engine answers, and the job it trains its adapter with is a valid Tunery request. The check
itself needs a GPU and vLLM (bench/gpu/vllm_serve.sh says what it needs)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from bench.gpu.prepare_vllm_inputs import adapter_request
from shared.settings import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "bench" / "gpu" / "vllm_serve.sh"


def test_the_script_parses_and_refuses_missing_inputs_before_installing(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0

    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "VLLM_VENV": str(tmp_path / "venv")},
    )

    assert result.returncode == 1
    assert "base/config.json is missing" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_the_client_fails_when_no_engine_answers(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    result = subprocess.run(
        [sys.executable, "bench/gpu/vllm_client.py", "--url", f"http://127.0.0.1:{port}",
         "--token", "t", "--adapter", "tunery-job-1", "--base", "b",
         "--out", str(tmp_path / "out.json")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_the_adapter_is_trained_by_a_valid_tunery_job_on_the_given_base(tmp_path: Path) -> None:
    request = adapter_request(tmp_path / "base")

    assert request.pretrainedmodel_config.model_path == str(tmp_path / "base")
    assert request.pretrainedmodel_config.lora_r <= 64  # vllm_serve.sh's --max-lora-rank
