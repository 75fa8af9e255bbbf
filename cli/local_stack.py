"""Start the API, a worker and the embedded inference engine as child processes: `tunery up`
(which keeps them running, `cli.supervisor`), the demo and e2e tests."""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn
from urllib.parse import urlsplit

import httpx

from cli.process_commands import DEFAULT_ENGINE_PORT, tunery_command, worker_command
from cli.supervisor import Backoff, Child, Supervisor, describe_exit, stop_processes
from shared.maintenance import release_dead_worker

# What a quiet stack sets in its children's environment, unless the environment already says:
# the services' own INFO lines, Python's warnings more than once each (the worker imports and
# trains the same code for every job), transformers' advice and progress bars.
QUIET_ENV = {
    "TUNERY_LOG_LEVEL": "WARNING",
    # The last entry is applied first: deprecations stay as silent as Python keeps them.
    "PYTHONWARNINGS": "once,ignore::DeprecationWarning,ignore::PendingDeprecationWarning,"
                      "ignore::ImportWarning,ignore::ResourceWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
EVERY_ADDRESS = ("0.0.0.0", "::")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ENGINE_URL_VARIABLE = "TUNERY_INFERENCE_ENGINE_URL"
ENGINE_TOKEN_VARIABLE = "TUNERY_INFERENCE_ENGINE_TOKEN"
# How long a stopping child may take: a worker hands its job back, with a last checkpoint.
STOP_GRACE_S = 20.0


def wait_until_answers(url: str, process: subprocess.Popen[bytes], *, name: str,
                       timeout_s: float, interval_s: float = 0.2) -> None:
    """Until GET `url` answers 200. RuntimeError when `process` (`name`, which serves it)
    exits first; TimeoutError past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{name} did not answer on {url} in {timeout_s:g} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `port`. SO_REUSEADDR as uvicorn binds: a port that only
    has connections of an earlier server in TIME_WAIT is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def local_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches an API bound to `host` at."""
    if host in EVERY_ADDRESS:
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class StopRequested(Exception):
    """SIGTERM or SIGINT reached `tunery up`: leave the `with LocalStack` block, stopping it."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `StopRequested` once; later ones are ignored,
    so the stack's own shutdown runs to its end instead of leaving children behind."""
    caught = (signal.SIGTERM, signal.SIGINT)

    def request_stop(signum: int, _: FrameType | None) -> None:
        for sig in caught:
            signal.signal(sig, signal.SIG_IGN)
        raise StopRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def embedded_engine_port(env: dict[str, str]) -> int | None:
    """The port to start the embedded engine on, from the engine URL the environment names
    (its default port when unset); None when that URL points at another machine, whose engine
    (vLLM, say) the API uses instead."""
    url = env.get(ENGINE_URL_VARIABLE)
    if not url:
        return DEFAULT_ENGINE_PORT
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK_HOSTS:
        return None
    return parts.port or 80


class LocalStack:
    """API + worker processes sharing one environment (and so one database, broker, storage),
    and with `inference` the embedded inference engine beside them.

    Output goes to `log_dir` when given (tests read it on failure), else to this terminal.
    A `quiet` stack leaves out the banners, the access log and the INFO lines (`QUIET_ENV`).
    `engine_port` starts the engine there (tests take a free one) and points the API at it;
    otherwise the engine takes the port of the configured engine URL, or is not started when
    that URL names another machine.
    """

    def __init__(self, env: dict[str, str], port: int | None = None,
                 log_dir: Path | None = None, start_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", quiet: bool = False, inference: bool = False,
                 engine_port: int | None = None) -> None:
        env = dict(env)
        self.engine_port = engine_port if engine_port else (
            embedded_engine_port(env) if inference else None)
        if inference and engine_port:
            env[ENGINE_URL_VARIABLE] = f"http://127.0.0.1:{engine_port}"
        if self.engine_port is not None and not env.get(ENGINE_TOKEN_VARIABLE):
            # The engine trusts whoever calls it to have checked the tenant: without a token,
            # any local user could ask it for another tenant's adapter by name. The API and
            # the engine share this one, made for this run.
            env[ENGINE_TOKEN_VARIABLE] = secrets.token_urlsafe(32)
        self.env = {**QUIET_ENV, **env} if quiet else env
        self.port = port or free_port()
        self.host = host
        self.quiet = quiet
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.base_url = local_url(host, self.port)
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.engine: subprocess.Popen[bytes] | None = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        if self.log_dir is None:
            return subprocess.Popen(argv, env=self.env, start_new_session=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Appended to: a restarted child's output follows the output of the one that exited.
        with (self.log_dir / f"{name}.log").open("ab") as out:
            return subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def start_api(self) -> None:
        # Migrations run once here, before the worker starts, so the two never race on them.
        subprocess.run(tunery_command("db", "upgrade"), env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        api = self._spawn_api()
        wait_until_answers(f"{self.base_url}/healthz", api, name="the API",
                           timeout_s=self.start_timeout_s)

    def _spawn_api(self) -> subprocess.Popen[bytes]:
        quiet = ["--quiet"] if self.quiet else []
        self.api = self._spawn("api", tunery_command("api", "--host", self.host,
                                                     "--port", str(self.port), *quiet))
        return self.api

    def start_worker(self) -> None:
        self._spawn_worker()

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        self.worker = self._spawn("worker", worker_command(quiet=self.quiet))
        return self.worker

    def start_engine(self) -> None:
        """The embedded inference engine, on this machine only: the API is its one client.
        It loads models on first use, so it is ready as soon as it answers."""
        if self.engine_port is None:
            return
        engine = self._spawn_engine()
        wait_until_answers(f"http://127.0.0.1:{self.engine_port}/health", engine,
                           name="the inference engine", timeout_s=self.start_timeout_s)

    def _spawn_engine(self) -> subprocess.Popen[bytes]:
        assert self.engine_port is not None
        # A program already listening there would answer the health check, and then get the
        # engine's token and every tenant's prompts: the port must be free, not merely answer.
        if not port_is_free(self.engine_port):
            raise RuntimeError(
                f"127.0.0.1:{self.engine_port}, the inference engine's port, is taken by another "
                f"program; stop it, or point {ENGINE_URL_VARIABLE} at a free port")
        quiet = ["--quiet"] if self.quiet else []
        self.engine = self._spawn("inference", tunery_command(
            "inference", "--host", "127.0.0.1", "--port", str(self.engine_port), *quiet))
        return self.engine

    @property
    def engine_url(self) -> str | None:
        return None if self.engine_port is None else f"http://127.0.0.1:{self.engine_port}"

    def __enter__(self) -> LocalStack:
        try:
            self.start_engine()
            self.start_api()
            self.start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def supervise(self, backoff: Backoff | None = None) -> NoReturn:
        """Keep the started stack running until an exception (SIGTERM or Ctrl-C through
        `stop_on_signals`) ends it: a child that exits starts again after `backoff`
        (`cli.supervisor.Backoff`'s defaults unless given). The jobs of a worker that exits
        are handed back at once instead of when their lease expires.

        That hand-back writes through this process's settings: the stack's environment must
        be this process's own, as in `tunery up`.
        """
        children = [
            Child("API", self._spawn_api, self.api),
            Child("worker", self._spawn_worker, self.worker, on_exit=release_jobs_of),
        ]
        if self.engine_port is not None:
            children.append(Child("inference engine", self._spawn_engine, self.engine))
        Supervisor(children, backoff or Backoff()).run()

    def stop_worker(self) -> None:
        """Stop the worker alone, as `stop` stops every child: SIGTERM (the worker hands its
        job back), then SIGKILL after `STOP_GRACE_S`."""
        stop_processes([self.worker], STOP_GRACE_S)
        self.worker = None

    def stop(self) -> None:
        """Stop every child: SIGTERM, then SIGKILL what is left after `STOP_GRACE_S`."""
        stop_processes([self.worker, self.api, self.engine], STOP_GRACE_S)
        self.worker = self.api = self.engine = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def engine_alone(env: dict[str, str], log_dir: Path, *, timeout_s: float) -> Iterator[str]:
    """The embedded inference engine by itself, on a free loopback port, for the tests and the
    inference bench that talk to it directly; yields its URL. Its output is `log_dir`'s
    inference.log. Callers that call it set TUNERY_INFERENCE_ENGINE_TOKEN in `env`, since
    they must know it."""
    stack = LocalStack(env, log_dir=log_dir, start_timeout_s=timeout_s, engine_port=free_port())
    try:
        stack.start_engine()
        assert stack.engine_url is not None
        yield stack.engine_url
    finally:
        stack.stop()


def release_jobs_of(worker: subprocess.Popen[bytes]) -> None:
    """The worker process exited: move its jobs on now (`release_dead_worker`), saying so."""
    assert worker.returncode is not None
    death = f"worker pid {worker.pid} {describe_exit(worker.returncode)}"
    for job_id, status in release_dead_worker(worker.pid, death):
        print(f"tunery up: job {job_id} of the worker that exited: {status.value}",
              file=sys.stderr, flush=True)
