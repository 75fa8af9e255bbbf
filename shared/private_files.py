"""Files at rest readable by the Tunery user alone: the data dir holds job payloads, logs, key
hashes and sample rows of every dataset.

Two layers, so that neither a missed call nor an inherited umask leaves a file open to other
users: every Tunery process starts with `restrict_umask()`, and what Tunery creates itself
(the data dir, the SQLite files, local storage, the work dir) gets an explicit mode as well.
`tighten_tree` brings a data dir created by an older version (0644 files, 0755 dirs) in line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("tunery")

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def restrict_umask() -> None:
    """Files and directories this process creates from now on are 0600 / 0700 at most,
    including those libraries create (SQLite's -wal and -shm, caches, temp files)."""
    os.umask(PRIVATE_UMASK)


def make_private_dir(path: Path) -> Path:
    """Create `path` and any missing parents with mode 0700; an existing `path` is chmodded to
    0700 (its existing parents are left as they are: they may be /var or a home)."""
    path = Path(path)
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process created it just now
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        _chmod_if_owned(directory, PRIVATE_DIR_MODE)
    _chmod_if_owned(path, PRIVATE_DIR_MODE)
    return path


def create_private_file(path: Path) -> Path:
    """Create `path` empty with mode 0600 unless it exists; an existing one is chmodded to
    0600. For files a library would create with its own mode (SQLite creates a database
    0644 minus the umask): pre-created, they keep this mode."""
    path = Path(path)
    make_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE)
    os.close(fd)
    _chmod_if_owned(path, PRIVATE_FILE_MODE)
    return path


def tighten_tree(root: Path) -> list[Path]:
    """Take group and other permissions off every file and directory under `root` (itself
    included) that this user owns; symlinks are not followed. Returns what was changed."""
    root = Path(root)
    if not root.is_dir():
        return []
    changed = [root] if _tighten(root) else []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if _tighten(path):
                changed.append(path)
    if changed:
        log.info("took group/other permissions off %d paths under %s", len(changed), root)
    return changed


def _tighten(path: Path) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return False
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return False
    try:
        path.chmod(mode & ~0o077)
    except OSError as exc:
        log.warning("could not tighten the permissions of %s: %s", path, exc)
        return False
    return True


def _chmod_if_owned(path: Path, mode: int) -> None:
    try:
        info = path.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
            path.chmod(mode)
    except OSError as exc:
        log.warning("could not set mode %o on %s: %s", mode, path, exc)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (SQLAlchemy's `sqlite:///…` or kombu's
    `sqla+sqlite:///…`); None for other URLs and in-memory databases."""
    url = url.removeprefix("sqla+")
    for scheme in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(scheme):
            name = url[len(scheme):].split("?", 1)[0]
            return None if name in ("", ":memory:") else Path(name)
    return None


def create_private_sqlite_file(url: str) -> None:
    """Pre-create the database file of a SQLite `url` with mode 0600 (SQLite then creates its
    -wal, -shm and -journal files with the database's mode), and tighten those if they exist."""
    path = sqlite_file(url)
    if path is None:
        return
    create_private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            _chmod_if_owned(companion, PRIVATE_FILE_MODE)
