"""`tunery keys create | list | revoke`: the API keys of the database the settings name.

A key belongs to one database: with the embedded default, to one data dir. Every command says
which one it read, so a key created under another `TUNERY_DATA_DIR` is not a mystery.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.settings import Settings, get_settings

KeyCommand = Callable[[argparse.Namespace, str], int]


def add_key_commands(sub: Any) -> None:
    """The `keys` command and its subcommands, on `sub` (the parser's subparsers)."""
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--tenant", help="tenant name (default: the key's name)")
    create.add_argument("--quiet", action="store_true", help="print only the key")
    create.add_argument("--admin", action="store_true",
                        help="an operator key: sees and cancels every tenant's jobs and datasets")
    create.set_defaults(func=_with_database(_create))
    listing = keys.add_parser("list", help="every key (never its secret), revoked ones too")
    listing.set_defaults(func=_with_database(_list))
    revoke = keys.add_parser("revoke", help="revoke a key by its id, its prefix or the key itself")
    revoke.add_argument("key", metavar="ID")
    revoke.set_defaults(func=_with_database(_revoke))


def key_store(settings: Settings) -> str:
    """Where the keys live, in the words a user sets it with."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database.url)
    if url.get_backend_name() == "sqlite" and url.database and \
            Path(url.database).resolve().parent == settings.data_dir:
        return f"data dir {settings.data_dir} (TUNERY_DATA_DIR)"
    return f"database {url.render_as_string(hide_password=True)} (TUNERY_DATABASE_URL)"


def _with_database(command: KeyCommand) -> Callable[[argparse.Namespace], int]:
    """`command` run once the database has its schema (migrated first where the settings
    allow it), and answered in one line when the database cannot be used."""

    def run(args: argparse.Namespace) -> int:
        from sqlalchemy import inspect
        from sqlalchemy.exc import OperationalError

        from shared.db import get_engine
        from shared.migrate import upgrade_database

        settings = get_settings()
        where = key_store(settings)
        try:
            if settings.database.auto_migrate:
                upgrade_database(settings.database.url)
            elif not inspect(get_engine()).has_table("api_keys"):
                print(f"tunery keys: the {where} has no schema yet: run `tunery db upgrade`",
                      file=sys.stderr)
                return 1
            return command(args, where)
        except OperationalError as exc:
            print(f"tunery keys: cannot use the {where}: {exc.orig}", file=sys.stderr)
            return 1

    return run


def _create(args: argparse.Namespace, where: str) -> int:
    from shared.db import session_scope
    from shared.keys import create_api_key

    with session_scope() as session:
        created = create_api_key(session, args.name, args.tenant, admin=args.admin)
    if args.quiet:
        print(created.plaintext)
        return 0
    role = "admin key (sees every tenant)" if args.admin else "API key"
    print(f"{role} {created.key_id} for tenant {args.tenant or args.name!r} in the {where}")
    print("(shown once, store it now; an API started with another data dir or database "
          "does not know it):")
    print(created.plaintext)
    return 0


def _list(_: argparse.Namespace, where: str) -> int:
    from shared.db import session_scope
    from shared.keys import list_api_keys

    with session_scope() as session:
        keys = list_api_keys(session)
    if not keys:
        print(f"no keys yet in the {where}; create one with `tunery keys create --name NAME`")
        return 0
    print(f"keys in the {where}:")
    rows = [("id", "prefix", "name", "role", "tenant", "created", "last used", "revoked")]
    rows += [(k.key_id, k.prefix, k.name, k.role, k.tenant, _when(k.created_at),
              _when(k.last_used_at), _when(k.revoked_at)) for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0


def _revoke(args: argparse.Namespace, where: str) -> int:
    from shared.db import session_scope
    from shared.keys import find_api_key, revoke_api_key

    with session_scope() as session:
        key = find_api_key(session, args.key)
        if key is None:
            print(f"tunery keys: no key with id or prefix {args.key!r} in the {where} "
                  "(`tunery keys list` shows them)", file=sys.stderr)
            return 1
        if not revoke_api_key(session, key):
            print(f"key {key.id} ({key.name}) was already revoked on {_when(key.revoked_at)}")
            return 1
        print(f"revoked key {key.id} ({key.name}, prefix {key.prefix})")
    return 0


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M")
