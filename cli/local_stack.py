"""Start the API, a worker and the embedded inference engine as child processes: `tunery up`,
the demo and e2e tests."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from urllib.parse import urlsplit

import httpx

from cli.process_commands import DEFAULT_ENGINE_PORT, tunery_command, worker_command

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
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen(argv, env=self.env, stdout=out,
                                stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)

    def start_api(self) -> None:
        # Migrations run once here, before the worker starts, so the two never race on them.
        subprocess.run(tunery_command("db", "upgrade"), env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        quiet = ["--quiet"] if self.quiet else []
        self.api = self._spawn("api", tunery_command("api", "--host", self.host,
                                                     "--port", str(self.port), *quiet))
        wait_until_answers(f"{self.base_url}/healthz", self.api, name="the API",
                           timeout_s=self.start_timeout_s)

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", worker_command(quiet=self.quiet))

    def start_engine(self) -> None:
        """The embedded inference engine, on this machine only: the API is its one client.
        It loads models on first use, so it is ready as soon as it answers."""
        if self.engine_port is None:
            return
        # A program already listening there would answer the health check, and then get the
        # engine's token and every tenant's prompts: the port must be free, not merely answer.
        if not port_is_free(self.engine_port):
            raise RuntimeError(
                f"127.0.0.1:{self.engine_port}, the inference engine's port, is taken by another "
                f"program; stop it, or point {ENGINE_URL_VARIABLE} at a free port")
        quiet = ["--quiet"] if self.quiet else []
        self.engine = self._spawn("inference", tunery_command(
            "inference", "--host", "127.0.0.1", "--port", str(self.engine_port), *quiet))
        wait_until_answers(f"http://127.0.0.1:{self.engine_port}/health", self.engine,
                           name="the inference engine", timeout_s=self.start_timeout_s)

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

    def wait(self) -> tuple[str, int | None]:
        """Block until a child exits; which one ("API", "worker" or "inference engine") and
        its exit code."""
        children = [("API", self.api), ("worker", self.worker)]
        if self.engine_port is not None:
            children.append(("inference engine", self.engine))
        while True:
            for name, proc in children:
                if proc is None or proc.poll() is not None:
                    return name, proc.returncode if proc else None
            time.sleep(0.5)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.worker, sig)
        self.worker = None

    def stop(self) -> None:
        self.stop_worker()
        _stop(self.api, signal.SIGTERM)
        self.api = None
        _stop(self.engine, signal.SIGTERM)
        self.engine = None

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


def _stop(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
