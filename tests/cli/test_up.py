"""`tunery up` as a user runs it, a real process with real children: a quiet console, SIGTERM
stops the whole stack, a child that dies is started again (a worker's job resumes at once),
`--host`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cli.local_stack import free_port, wait_until_answers
from cli.process_commands import tunery_command
from tests.chaos.chaos_report import ScenarioReport
from tests.chaos.expectations import assert_every_step_trained
from tests.chaos.job_records import TERMINAL, JobsDatabase, JobTrace
from tests.chaos.polling import wait_until
from tests.chaos.stack import chaos_payload
from tests.cli.conftest import clean_env
from tests.conftest import ASSETS_DIR
from tests.process_table import descendants


class RunningUp:
    """A `tunery up` process, its console in a file."""

    def __init__(self, tmp_path: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        # The engine on a port of its own, not the default one another stack may hold.
        self.engine_url = (env.pop("TUNERY_INFERENCE_ENGINE_URL", "")
                           or f"http://127.0.0.1:{free_port()}")
        self.env = clean_env(tmp_path / "data", TUNERY_INFERENCE_ENGINE_URL=self.engine_url,
                             **env)
        self.console = tmp_path / "console.txt"
        with self.console.open("wb") as out:
            self.proc = subprocess.Popen(tunery_command("up", "--port", str(self.port), *args),
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.children: set[int] = set()
        """Every process seen below `tunery up`: the teardown ends those a failure left."""

    def wait_ready(self, timeout_s: float = 120) -> None:
        try:
            wait_until_answers(f"{self.base_url}/readyz", self.proc, name="tunery up",
                               timeout_s=timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{self.console_text()}") from None

    def wait_console_settled(self, quiet_s: float = 3.0, timeout_s: float = 90) -> None:
        """Until the console has not grown for `quiet_s`: the worker has started."""
        deadline = time.monotonic() + timeout_s
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.console.stat().st_size
            if now != size:
                size, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s and len(self.current_children()) >= 2:
                return
            time.sleep(0.2)

    def current_children(self) -> set[int]:
        found = descendants(self.proc.pid)
        self.children |= found
        return found

    def console_text(self) -> str:
        return self.console.read_text(errors="replace")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[type[RunningUp]]:
    started: list[RunningUp] = []

    class Started(RunningUp):
        def __init__(self, *args: str, **env: str) -> None:
            super().__init__(tmp_path, *args, **env)
            started.append(self)

    yield Started
    for up in started:  # whatever a failed test left running
        if up.proc.poll() is None:
            up.current_children()
        up.proc.kill()
        up.proc.wait()
        for pid in up.children:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_sigterm_to_tunery_up_stops_the_api_the_worker_and_the_engine(
        start_up: type[RunningUp]) -> None:
    up = start_up()
    up.wait_ready()
    up.wait_console_settled()
    children = up.current_children()
    assert len(children) >= 3, up.console_text()  # the API, the worker and the engine
    assert httpx.get(f"{up.engine_url}/health", timeout=5).status_code == 200
    # The engine wants the token tunery up made for this run: no local user can ask it for a
    # tenant's adapter around the API.
    refused = httpx.post(f"{up.engine_url}/v1/chat/completions", timeout=5,
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401

    up.proc.send_signal(signal.SIGTERM)

    assert up.proc.wait(timeout=30) == 0, up.console_text()
    assert wait_gone(children, timeout_s=5) == set(), up.console_text()


# A lease far longer than the default, so that a job back in the queue within seconds can only
# be tunery up's doing, never the lease's.
LEASE_S = 120


def celery_worker(pids: set[int]) -> int:
    (worker,) = [pid for pid in pids if alive(pid)
                 and b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return worker


def child_named(pids: set[int], argument: bytes) -> int:
    """The live process among `pids` whose command line has `argument` (the subcommand of
    `tunery`: b"api", b"inference") right after `-m cli`."""
    (found,) = [pid for pid in pids if alive(pid)
                and b"\0-m\0cli\0" + argument + b"\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return found


class ApiPoller(threading.Thread):
    """GETs /readyz (the API, its database and its broker; no rate limit) every 0.1 s until
    stopped; counts the answers that were not 200 (a refused connection included) and the
    longest wait for one."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=base_url, timeout=10)
        self.answered, self.failures, self.slowest_s = 0, [], 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            started = time.monotonic()
            try:
                status = self.client.get("/readyz").status_code
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            if status == 200:
                self.answered += 1
            else:
                self.failures.append(str(status))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)
        self.client.close()


def test_a_killed_worker_is_restarted_and_its_job_resumes_within_seconds_while_the_api_answers(
        start_up: type[RunningUp], tiny_model_dir: Path) -> None:
    # A long lease on purpose: the job comes back because tunery up saw its worker die, not
    # because the lease ran out.
    up = start_up("--no-inference", TUNERY_ALLOWED_LOCAL_DIRS=json.dumps(
        [str(tiny_model_dir), str(ASSETS_DIR)]), TUNERY_CHECKPOINT_EVERY_STEPS="2",
        TUNERY_LEASE_SECONDS=str(LEASE_S),
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    up.wait_ready()
    up.wait_console_settled()
    db = JobsDatabase(f"sqlite:///{up.env['TUNERY_DATA_DIR']}/tunery.db")
    key = subprocess.run(tunery_command("keys", "create", "--name", "k", "--quiet"),
                         env=up.env, capture_output=True, text=True, check=True).stdout.strip()
    client = httpx.Client(base_url=up.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {key}"})
    try:
        submitted = client.post("/v1/finetune/llm", json=chaos_payload(tiny_model_dir))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]

        def past_a_checkpoint() -> bool:
            trace = db.trace(job_id)
            steps = trace.trained_steps(1)
            return (trace.status == "RUNNING" and bool(trace.checkpoints_saved(1))
                    and bool(steps) and max(steps) >= 15)

        wait_until(past_a_checkpoint, timeout_s=120, what="step 15 after a checkpoint",
                   interval_s=0.05, on_timeout=lambda: db.trace(job_id).summary())
        first_worker = celery_worker(up.current_children())
        poller = ApiPoller(up.base_url)
        poller.start()
        # What the kernel's out-of-memory killer does to a training process.
        report = ScenarioReport("oom-killer: SIGKILL to the worker under tunery up",
                                checkpoint_every=2)
        report.submitted(job_id)
        report.fault("SIGKILL to the worker mid-epoch", [job_id])
        os.kill(first_worker, signal.SIGKILL)
        killed_at = time.monotonic()

        def seconds_until(what: str, condition: Callable[[JobTrace], bool]) -> float:
            wait_until(lambda: condition(db.trace(job_id)), timeout_s=120, what=what,
                       interval_s=0.05,
                       on_timeout=lambda: f"{db.trace(job_id).summary()}\n{up.console_text()}")
            return time.monotonic() - killed_at

        requeued_s = seconds_until("re-queued", lambda t: len(t.events_to("QUEUED")) == 2)
        claimed_s = seconds_until("claimed again", lambda t: len(t.claims()) == 2)
        stepped_s = seconds_until("a step of attempt 2", lambda t: bool(t.trained_steps(2)))
        poller.stop()
        trace = db.trace(job_id)
        wait_until(lambda: db.trace(job_id).status in TERMINAL, timeout_s=120,
                   what="the job to end", on_timeout=lambda: db.trace(job_id).summary())
        trace = db.trace(job_id)
        children = up.current_children()
        report.extra.update(requeued_s=round(requeued_s, 2), claimed_s=round(claimed_s, 2),
                            api_polls_answered=poller.answered,
                            api_polls_failed=len(poller.failures),
                            # Those past the last checkpoint: what a kill without warning costs.
                            steps_trained_twice=len(set(trace.trained_steps(1))
                                                    & set(trace.trained_steps(2))))
        report.write(db)
        print(f"worker kill -9 under tunery up: job re-queued after {requeued_s:.2f} s, claimed "
              f"by the restarted worker after {claimed_s:.2f} s, training again after "
              f"{stepped_s:.2f} s; the API answered {poller.answered} polls meanwhile, "
              f"slowest {poller.slowest_s:.2f} s")

        detail = f"{trace.summary()}\n{up.console_text()}"
        assert poller.failures == [] and poller.answered > 0, (poller.failures, detail)
        assert trace.status == "COMPLETED" and trace.attempt == 2, detail
        requeue = trace.events_to("QUEUED")[1]
        assert requeue.reason == (f"worker pid {first_worker} exited by SIGKILL; attempt 1 "
                                  "lost, re-queued"), detail
        assert trace.resumed_from(2) is not None, detail  # from its checkpoint, not afresh
        assert_every_step_trained(trace, trace.planned_steps() or 0)
        # A SIGKILL is what the out-of-memory killer sends: the next attempt trains one rung
        # lower on the memory ladder, and says so.
        assert trace.row["memory_rung"] == 1, detail
        assert any(line.startswith("memory ladder: ") and "next: rung 1" in line
                   for line in trace.log_lines(2)), detail
        # Back in the queue within seconds; claimed again once the new worker has started
        # (it imports the training stack first, much slower on a busy machine), and long before
        # the lease alone would have let another attempt take the job.
        assert requeued_s <= 10, f"re-queued {requeued_s:.1f} s after the kill\n{detail}"
        assert claimed_s < LEASE_S / 2, f"claimed again {claimed_s:.1f} s after the kill\n{detail}"
        console = up.console_text()
        assert f"tunery up: the worker (pid {first_worker}) exited by SIGKILL" in console
        assert f"tunery up: restarted the worker (pid {celery_worker(children)})" in console
    finally:
        client.close()
        db.dispose()

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0, up.console_text()
    assert wait_gone(children, timeout_s=5) == set(), up.console_text()


def test_a_killed_api_and_engine_come_back_and_ctrl_c_then_stops_everything(
        start_up: type[RunningUp]) -> None:
    up = start_up()
    up.wait_ready()
    up.wait_console_settled()
    children = up.current_children()
    api, engine = child_named(children, b"api"), child_named(children, b"inference")
    worker = celery_worker(children)

    os.kill(api, signal.SIGKILL)
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: api not in up.current_children(), timeout_s=10, what="the API reaped")

    up.wait_ready(timeout_s=60)
    wait_until_answers(f"{up.engine_url}/health", up.proc, name="the engine", timeout_s=60)
    now = up.current_children()
    assert api not in now and engine not in now
    assert worker in now  # the others' deaths left the worker alone
    console = up.console_text()
    assert f"tunery up: the API (pid {api}) exited by SIGKILL" in console
    assert f"tunery up: the inference engine (pid {engine}) exited by SIGKILL" in console

    up.proc.send_signal(signal.SIGINT)  # Ctrl-C

    assert up.proc.wait(timeout=30) == 0, up.console_text()
    assert wait_gone(children | now, timeout_s=5) == set(), up.console_text()


def test_the_console_stays_quiet_while_clients_poll(start_up: type[RunningUp]) -> None:
    up = start_up("--host", "127.0.0.1")
    up.wait_ready()
    up.wait_console_settled()
    key = subprocess.run(tunery_command("keys", "create", "--name", "poller", "--quiet"),
                         env=up.env, capture_output=True, text=True, check=True).stdout.strip()
    before = up.console_text().splitlines()

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=up.base_url, headers=headers, timeout=10) as client:
        for _ in range(10):
            assert client.get("/v1/finetune/llm").status_code == 200
            assert client.get("/readyz").status_code == 200
        assert client.get("/v1/finetune/llm/no-such-job").status_code == 404
    time.sleep(1.0)

    after = up.console_text().splitlines()
    assert len(after) - len(before) <= 2, "\n".join(after[len(before):])
    assert not any('"GET /' in line for line in after)  # uvicorn's access log
    assert not any("celery@" in line for line in after)  # Celery's banner
    assert len(after) <= 12, "\n".join(after)


def test_up_on_every_address_warns_and_a_start_failure_is_one_line(
        start_up: type[RunningUp]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = start_up("--host", "0.0.0.0", "--port", str(port))  # the last --port wins

        assert up.proc.wait(timeout=60) == 1

    console = up.console_text()
    assert "tunery up: warning: --host 0.0.0.0 serves the API on every network" in console
    assert "address already in use" in console
    assert "tunery up: could not start: the API exited with code" in console
    assert "Traceback" not in console


def test_tunery_up_answers_chat_completions_through_its_engine(
        start_up: type[RunningUp], tiny_model_dir: Path) -> None:
    up = start_up(TUNERY_ALLOWED_LOCAL_DIRS=json.dumps([str(tiny_model_dir)]),
                  TUNERY_INFERENCE_BASE_MODELS=json.dumps([str(tiny_model_dir)]))
    up.wait_ready()
    key = subprocess.run(tunery_command("keys", "create", "--name", "chat", "--quiet"),
                         env=up.env, capture_output=True, text=True, check=True).stdout.strip()
    answer = httpx.post(f"{up.base_url}/v1/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": str(tiny_model_dir), "max_tokens": 4,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
    assert "inference engine" in up.console_text()


def test_no_inference_leaves_the_engine_out(start_up: type[RunningUp]) -> None:
    up = start_up("--no-inference")
    up.wait_ready()
    up.wait_console_settled()
    assert not any(b"inference" in Path(f"/proc/{pid}/cmdline").read_bytes()
                   for pid in up.current_children())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{up.engine_url}/health", timeout=2)


def test_a_program_on_the_engines_port_stops_tunery_up_before_it_gets_a_prompt(
        start_up: type[RunningUp]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        up = start_up(TUNERY_INFERENCE_ENGINE_URL=f"http://127.0.0.1:{port}")
        assert up.proc.wait(timeout=60) == 1
    console = up.console_text()
    assert f"127.0.0.1:{port}" in console and "taken by another program" in console
