"""`tunery` command line. Heavy imports (uvicorn, celery worker, torch) happen inside the
subcommand that needs them, so `tunery keys create` works in the API image."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cli.client_commands import add_client_commands
from cli.key_commands import add_key_commands
from cli.process_commands import DEFAULT_ENGINE_PORT, worker_command
from shared.device_classes import worker_class_problem
from shared.private_files import restrict_umask
from shared.settings import get_settings, settings_problems


def _db_upgrade(_: argparse.Namespace) -> int:
    from shared.migrate import upgrade_database

    upgrade_database(get_settings().database.url)
    print("database schema is up to date")
    return 0


def _api(args: argparse.Namespace) -> int:
    from api.serve import serve

    serve(args.host, args.port, args.workers, quiet=args.quiet)
    return 0


def _worker_refused(command: str) -> bool:
    """Whether this host's worker must not start: its device class has more devices than it
    owns (said on stderr)."""
    settings = get_settings()
    problem = worker_class_problem(settings.broker.worker_class(),
                                   settings.training.worker_devices)
    if problem:
        print(f"tunery {command}: {problem}", file=sys.stderr)
    return problem is not None


def _worker(args: argparse.Namespace) -> int:
    if _worker_refused("worker"):
        return 2
    # Replaced by Celery, not its parent: a supervisor's SIGTERM (Docker, Kubernetes, systemd)
    # must reach the worker, which hands its job back on it. A parent would die of it at once
    # (or, as a container's PID 1, ignore it) and leave Celery to be killed without a word.
    command = worker_command()
    os.execv(command[0], command)


def _inference(args: argparse.Namespace) -> int:
    from inference.server import serve

    serve(args.host, args.port, quiet=args.quiet)
    return 0


def _up(args: argparse.Namespace) -> int:
    from cli.local_stack import EVERY_ADDRESS, LocalStack, StopRequested, stop_on_signals

    if _worker_refused("up"):
        return 2
    if args.host in EVERY_ADDRESS:
        print(f"tunery up: warning: --host {args.host} serves the API on every network this "
              "machine is on; an API key is all that stands between it and them",
              file=sys.stderr)
    with stop_on_signals():
        try:
            with LocalStack(env=os.environ.copy(), port=args.port, host=args.host,
                            quiet=not args.verbose, inference=not args.no_inference) as stack:
                serving = ("API, worker and inference engine" if stack.engine_url
                           else "API + worker")
                print(f"Tunery is up at {stack.base_url} ({serving}; the dashboard at "
                      f"{stack.base_url}/, the API reference at {stack.base_url}/docs); "
                      "a part that exits starts again; Ctrl-C stops them all", flush=True)
                if not args.verbose:
                    print("a job live: `tunery watch JOB` (with TUNERY_API_KEY) or GET "
                          "/v1/finetune/llm/{job_id}/stream; `tunery up --verbose` shows the "
                          "services' own output", flush=True)
                stack.supervise()
        except StopRequested:
            return 0
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
            print(f"tunery up: could not start: {exc}", file=sys.stderr)
            return 1


def _assets(args: argparse.Namespace) -> int:
    dest = Path(args.dest).resolve()
    if args.which == "tiny":
        from worker.assets.tiny_model import build_tiny_llama

        print(build_tiny_llama(dest))
    else:
        from worker.assets.smollm2 import prepare_smollm2

        print(prepare_smollm2(dest))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo
    from cli.local_stack import StopRequested, stop_on_signals

    with stop_on_signals():
        try:
            return run_demo(tiny=args.tiny)
        except StopRequested:
            print("tunery demo: stopped", file=sys.stderr)
            return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="run alembic upgrade head").set_defaults(func=_db_upgrade)

    add_key_commands(sub)
    # HTTP clients of a running API, from any machine: jobs, submit, watch, download.
    add_client_commands(sub)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1,
                     help="API processes sharing the port (default 1)")
    api.add_argument("--quiet", action="store_true",
                     help="no access log, only warnings and errors")
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="run a training worker (one job at a time) of the "
                            "device class TUNERY_WORKER_DEVICE_CLASS names (default: the first "
                            "of TUNERY_DEVICE_CLASSES), on that class's queue")
    worker.set_defaults(func=_worker)

    inference = sub.add_parser("inference", help="serve the embedded inference engine (the API "
                               "forwards /v1/chat/completions to it)")
    inference.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1: only the API, on "
                                "this machine, should reach it)")
    inference.add_argument("--port", type=int, default=DEFAULT_ENGINE_PORT)
    inference.add_argument("--quiet", action="store_true",
                           help="no access log, only warnings and errors")
    inference.set_defaults(func=_inference)

    up = sub.add_parser("up", help="run the API, one worker and the inference engine together")
    up.add_argument("--host", default="127.0.0.1",
                    help="address the API listens on (default 127.0.0.1, this machine only)")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--verbose", action="store_true",
                    help="show the services' own output: Celery's banner and INFO lines, "
                         "uvicorn's access log, every warning")
    up.add_argument("--no-inference", action="store_true",
                    help="do not start the embedded inference engine (the API still forwards "
                         "chat requests to TUNERY_INFERENCE_ENGINE_URL)")
    up.set_defaults(func=_up)

    assets = sub.add_parser("assets", help="build the bundled models for offline use")
    assets.add_argument("which", choices=["tiny", "smollm2"])
    assets.add_argument("--dest", required=True)
    assets.set_defaults(func=_assets)

    demo = sub.add_parser("demo", help="fine-tune SmolLM2 end to end through the HTTP API")
    demo.add_argument("--tiny", action="store_true", help="use the tiny random model (fast)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before anything is created: the data dir must not be readable by other users, whatever
    # umask the shell or service manager handed down.
    restrict_umask()
    args = build_parser().parse_args(argv)
    problems = settings_problems()
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print("tunery: fix the settings above (README.md, Configuration, lists each one)",
              file=sys.stderr)
        return 2
    return int(args.func(args) or 0)

