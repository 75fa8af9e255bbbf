"""`tunery jobs | submit | watch | download` as a user runs them: real processes, with only
TUNERY_API_URL and TUNERY_API_KEY in their environment, against a real stack (API and worker
processes, the tiny model) that the tests of this module share."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.api_client import API_KEY_VARIABLE, API_URL_VARIABLE
from cli.client_commands import EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from cli.local_stack import LocalStack, free_port
from cli.process_commands import tunery_command
from shared.settings import settings_problems
from tests.chaos.tcp_proxy import TcpProxy
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env, tiny_payload


@dataclass(frozen=True)
class Served:
    base_url: str
    key: str
    model_dir: Path
    work: Path

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {self.key}"})

    def env(self, api_url: str | None = None) -> dict[str, str]:
        return client_env(api_url or self.base_url, self.key)


def client_env(api_url: str, key: str) -> dict[str, str]:
    # A client machine: no server setting at all, only where the API is and the key.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")},
            API_URL_VARIABLE: api_url, API_KEY_VARIABLE: key}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("client")
    env = stack_env(work / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0", TUNERY_STREAM_POLL_S="0.2")
    stack = LocalStack(env=env, log_dir=work / "logs")
    with stack:
        yield Served(stack.base_url, create_key(env), tiny_model_dir, work)
    for log in sorted((work / "logs").glob("*.log")):
        print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")


def tunery(env: dict[str, str], *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(tunery_command(*args), env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def submit(served: Served, tmp_path: Path, payload: dict[str, Any]) -> str:
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))
    done = tunery(served.env(), "submit", str(path))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def job_log_lines(served: Served, job_id: str) -> list[str]:
    with served.api() as api:
        return api.get(f"/v1/finetune/llm/{job_id}/logs",
                       params={"after": 0, "n_lines": 10000}).json()["logs"]


def printed_log_lines(stdout: str) -> list[str]:
    """Watch's output less its own lines: progress ('[###---] ...'), status changes, notices
    and the closing line."""
    own = ("[", "status: ", "tunery watch: ", "job ")
    return [line for line in stdout.splitlines() if not line.startswith(own)]


def submit_paused(served: Served, tmp_path: Path) -> str:
    """A job submitted with `tunery submit` and paused at once (or at its first step if a
    worker took it first): a watch started now is surely connected before it trains, however
    slowly this machine runs today. `resume` lets it go on."""
    job_id = submit(served, tmp_path, tiny_payload(served.model_dir))
    with served.api() as api:
        assert api.post(f"/v1/finetune/llm/{job_id}/pause").status_code == 200
    return job_id


def resume(served: Served, job_id: str) -> None:
    with served.api() as api:
        assert api.post(f"/v1/finetune/llm/{job_id}/resume").status_code == 200


def start_watch(env: dict[str, str], job_id: str, console: Path) -> subprocess.Popen[str]:
    """`tunery watch JOB` in the background, its output (not a terminal) into `console`,
    once it has shown the job paused."""
    with console.open("w") as out:
        watch = subprocess.Popen(tunery_command("watch", job_id), env=env, stdout=out,
                                 stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while "-> PAUSED" not in console.read_text():
        assert watch.poll() is None and time.monotonic() < deadline, console.read_text()
        time.sleep(0.1)
    return watch


def test_submit_then_watch_to_completion_then_download_and_find_it_in_jobs(
        served: Served, tmp_path: Path) -> None:
    job_id = submit_paused(served, tmp_path)
    assert len(job_id) == 36

    console = tmp_path / "watch.txt"
    watch = start_watch(served.env(), job_id, console)
    resume(served, job_id)
    try:
        assert watch.wait(timeout=300) == 0, console.read_text()
    finally:
        if watch.poll() is None:
            watch.kill()
    output = console.read_text()
    lines = output.splitlines()
    assert lines[-1] == f"job {job_id} COMPLETED"
    # Every log line of the job, each once, in order; not a terminal: a line per update.
    assert printed_log_lines(output) == job_log_lines(served, job_id)
    with served.api() as api:
        job = api.get(f"/v1/finetune/llm/{job_id}").json()
    steps = job["result"]["steps"]
    progress = [line for line in lines if line.startswith("[")]
    assert any(f"step {steps}/{steps}" in line and "loss " in line for line in progress)
    assert any("eta " in line and "| training" in line for line in progress)
    assert progress[-1].startswith("[" + "#" * 24 + "]")
    assert "status: QUEUED -> RUNNING" in output
    assert "tunery watch:" not in output  # nothing to say about the connection

    archive_dir = tmp_path / "archive"
    fetched = tunery(served.env(), "download", job_id, "--to", str(archive_dir))
    assert fetched.returncode == 0, fetched.stderr
    path = Path(fetched.stdout.splitlines()[-1])
    assert path == archive_dir / f"{job_id}-adapter.tar.gz"
    with served.api() as api:
        assert path.read_bytes() == api.get(
            f"/v1/finetune/llm/{job_id}/artifacts/archive").content
        listing = api.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"]
    with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as tar:
        assert f"{job_id}-adapter/adapter_model.safetensors" in tar.getnames()
    assert list(archive_dir.iterdir()) == [path]  # no partial file left behind

    each_dir = tmp_path / "each"
    fetched = tunery(served.env(), "download", job_id, "--to", str(each_dir), "--each")
    assert fetched.returncode == 0, fetched.stderr
    for artifact in listing:
        assert (each_dir / artifact["name"]).stat().st_size == artifact["size"], artifact
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {a["name"] for a in listing}

    listed = tunery(served.env(), "jobs")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "BASE", "MODEL", "PROGRESS", "AGE"]
    row = next(row for row in rows if row.startswith(job_id))
    assert row.split()[1:2] == ["COMPLETED"] and " 100% " in row
    assert "tiny-llama" in row


def test_watch_of_a_failed_job_prints_its_reason_and_exits_1(
        served: Served, tmp_path: Path) -> None:
    payload = tiny_payload(served.model_dir)
    payload["data_config"]["prompt_template"] = "Q: {question}\nA: {output}"
    job_id = submit(served, tmp_path, payload)
    watched = tunery(served.env(), "watch", job_id)
    assert watched.returncode == 1, watched.stderr
    last = watched.stdout.splitlines()[-1]
    assert last.startswith(f"job {job_id} FAILED: ") and "question" in last


def test_watch_of_an_unknown_job_prints_the_apis_404_message(served: Served) -> None:
    watched = tunery(served.env(), "watch", "0000-no-such-job")
    assert watched.returncode == EXIT_REFUSED
    assert watched.stderr == "tunery watch: no job with id 0000-no-such-job\n"
    assert watched.stdout == ""


def test_a_wrong_key_and_a_refused_payload_print_the_apis_message(
        served: Served, tmp_path: Path) -> None:
    wrong = tunery(client_env(served.base_url, "tun_wrong_key"), "jobs")
    assert wrong.returncode == EXIT_REFUSED
    assert wrong.stderr.startswith("tunery jobs: invalid or revoked API key")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pretrainedmodel_config": {"model_path": "x/y", "lora_r": -1}}))
    refused = tunery(served.env(), "submit", str(bad))
    assert refused.returncode == EXIT_REFUSED
    assert "lora_r" in refused.stderr and "Traceback" not in refused.stderr


def test_watch_resumes_where_it_was_when_its_connection_drops(
        served: Served, tmp_path: Path) -> None:
    job_id = submit_paused(served, tmp_path)
    proxy = TcpProxy("127.0.0.1", int(served.base_url.rsplit(":", 1)[1]))
    proxy.start()
    console = tmp_path / "watch.txt"
    watch = start_watch(served.env(f"http://127.0.0.1:{proxy.port}"), job_id, console)
    try:
        proxy.cut()  # resets the open stream, and refuses new connections for a while
        time.sleep(1.5)
        proxy.restore()
        resume(served, job_id)
        assert watch.wait(timeout=300) == 0, console.read_text()
    finally:
        proxy.stop()
        if watch.poll() is None:
            watch.kill()
    output = console.read_text()
    assert "tunery watch: connection lost" in output
    assert printed_log_lines(output) == job_log_lines(served, job_id)
    assert output.splitlines()[-1] == f"job {job_id} COMPLETED"
    assert proxy.connections_accepted >= 2


def test_without_an_api_the_commands_say_so_and_exit_4(tmp_path: Path) -> None:
    nowhere = client_env(f"http://127.0.0.1:{free_port()}", "tun_x")
    listed = tunery(nowhere, "jobs")
    assert listed.returncode == EXIT_UNREACHABLE
    assert listed.stderr.startswith("tunery jobs: cannot reach the Tunery API at http://127.0.0.1:")
    watched = tunery(nowhere, "watch", "some-job", "--give-up-after", "1")
    assert watched.returncode == EXIT_UNREACHABLE
    assert "no answer from" in watched.stderr and "Traceback" not in watched.stderr


def test_a_payload_that_is_not_json_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "payload.json"
    path.write_text("{not json")
    done = tunery(client_env("http://127.0.0.1:9", "tun_x"), "submit", str(path))
    assert done.returncode == EXIT_USAGE
    assert done.stderr.startswith(f"tunery submit: {path} is not JSON")


def test_the_client_variables_are_no_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_URL_VARIABLE, "not even a URL")
    monkeypatch.setenv(API_KEY_VARIABLE, "tun_anything")
    assert settings_problems() == []


@pytest.mark.parametrize("command", ["jobs", "submit", "watch", "download"])
def test_help_documents_the_environment_and_the_exit_codes(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert API_URL_VARIABLE in text and API_KEY_VARIABLE in text
    for code in range(5):
        assert f"\n  {code}  " in text
