"""`tunery` command line. Heavy imports (uvicorn, celery worker, torch) happen inside the
subcommand that needs them, so `tunery keys create` works in the API image."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from cli.process_commands import worker_command
from shared.private_files import restrict_umask
from shared.settings import get_settings


def _db_upgrade(_: argparse.Namespace) -> int:
    from shared.migrate import upgrade_database

    upgrade_database(get_settings().database.url)
    print("database schema is up to date")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from shared.db import session_scope
    from shared.keys import create_api_key
    from shared.migrate import upgrade_database

    settings = get_settings()
    if settings.database.auto_migrate:
        upgrade_database(settings.database.url)
    with session_scope() as session:
        created = create_api_key(session, args.name, args.tenant, admin=args.admin)
    if args.quiet:
        print(created.plaintext)
    else:
        role = "admin key (sees every tenant)" if args.admin else "API key"
        print(f"{role} for tenant {args.tenant or args.name!r} (shown once, store it now):")
        print(created.plaintext)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from shared.db import session_scope
    from shared.keys import revoke_api_key

    prefix = args.key.split("_")[1] if args.key.startswith("tun_") else args.key
    with session_scope() as session:
        revoked = revoke_api_key(session, prefix)
    print("revoked" if revoked else "no live key with that prefix")
    return 0 if revoked else 1


def _api(args: argparse.Namespace) -> int:
    from api.serve import serve

    serve(args.host, args.port, args.workers)
    return 0


def _worker(args: argparse.Namespace) -> int:
    return subprocess.call(worker_command(args.queues))


def _up(args: argparse.Namespace) -> int:
    from cli.local_stack import LocalStack

    with LocalStack(port=args.port, env=os.environ.copy()) as stack:
        print(f"Tunery is up at {stack.base_url} (API + worker); Ctrl-C stops both")
        stack.wait()
    return 0


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

    return run_demo(tiny=args.tiny)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="run alembic upgrade head").set_defaults(func=_db_upgrade)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--tenant", help="tenant name (default: the key's name)")
    create.add_argument("--quiet", action="store_true", help="print only the key")
    create.add_argument("--admin", action="store_true",
                        help="an operator key: sees and cancels every tenant's jobs and datasets")
    create.set_defaults(func=_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key by its prefix or the key itself")
    revoke.add_argument("key")
    revoke.set_defaults(func=_keys_revoke)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1,
                     help="API processes sharing the port (default 1)")
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="run a training worker (one job at a time)")
    worker.add_argument("--queues", default=None)
    worker.set_defaults(func=_worker)

    up = sub.add_parser("up", help="run the API and one worker together")
    up.add_argument("--port", type=int, default=8000)
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
    return int(args.func(args) or 0)

