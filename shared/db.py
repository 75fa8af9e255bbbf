"""Engine and sessions. One engine per process, built from settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from shared.private_files import create_private_sqlite_file
from shared.settings import get_settings


def make_engine(url: str, pool_size: int = 15, max_overflow: int = 0) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # The embedded default shares one SQLite file between the API and worker processes:
        # WAL lets readers run beside the writer, and the busy timeout makes a writer wait
        # for the lock instead of failing with "database is locked".
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["connect_args"] = {"connect_timeout": 5}
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    if url.startswith("sqlite"):
        # SQLite would create the file 0644 (less the umask): it holds payloads, logs and key
        # hashes, so it is created 0600 first, and SQLite gives its -wal/-shm the same mode.
        create_private_sqlite_file(url)
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


@lru_cache(maxsize=4)
def _engine_for(url: str, pool_size: int, max_overflow: int) -> Engine:
    return make_engine(url, pool_size, max_overflow)


def get_engine() -> Engine:
    database = get_settings().database
    return _engine_for(database.url, database.pool_size, database.max_overflow)


def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (worker and CLI use)."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_engines() -> None:
    """Forget cached engines (tests that switch databases between cases)."""
    _engine_for.cache_clear()
