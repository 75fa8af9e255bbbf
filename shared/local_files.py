"""Opening local files so that what is read is what was checked.

A path that `shared.sources.classify_source` accepted only says where reading starts: a file
inside an allowed directory may be a symlink to a file outside it, and a link can be swapped
between a check by path and the open. So every local file is opened first and checked after,
on the open descriptor: its real path (what the kernel says the descriptor is, Linux's
`/proc/self/fd/N`) must lie inside an allowed root, and it must be a regular file. The data
is then read through `/proc/self/fd/N`, a "magic" link that re-opens that very inode without
resolving any path again.

A refused file is named as the user gave it (the data_path or model_path and the entry below
it), never by the target a link points at. Linux only (the worker's platform); where
`/proc/self/fd` is missing every local file is refused. Pure standard library.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ALLOWED_SETTING = "TUNERY_ALLOWED_LOCAL_DIRS"
# A model or dataset directory is a handful of files; these bound what one job can make the
# worker open and walk.
MAX_FILES = 4096
MAX_DEPTH = 8


class LocalFileRefused(ValueError):
    """A local file or directory that may not be read; the message names it as given."""


@dataclass(frozen=True)
class OpenedFile:
    """A verified open file: `name` as the user would call it, `reopen` the path that reads
    this same file (`/proc/self/fd/N`) while it stays open."""

    name: str
    fd: int

    @property
    def reopen(self) -> Path:
        return Path(f"/proc/self/fd/{self.fd}")


def resolved_roots(allowed_dirs: Iterable[Path]) -> list[Path]:
    return [Path(d).resolve() for d in allowed_dirs]


def descriptor_path(fd: int) -> Path:
    """The real path of an open descriptor, as the kernel records it."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def open_checked(
    path: str | Path,
    roots: list[Path],
    *,
    shown: str,
    dir_fd: int | None = None,
    directory: bool = False,
) -> int:
    """Open `path` (relative to `dir_fd` if given) for reading and return the descriptor,
    once its real path is inside one of `roots` (resolved) and it is a directory (with
    `directory`) or else a regular file, directories also accepted. The caller closes it.

    Raises `LocalFileRefused` naming `shown`.
    """
    # O_NONBLOCK: opening a FIFO must not hang the worker; it is refused below anyway.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if directory:
        flags |= os.O_DIRECTORY
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise LocalFileRefused(f"{shown!r} does not exist") from None
    except OSError as exc:
        kind = "directory" if directory else "file"
        raise LocalFileRefused(f"{shown!r}: cannot open this {kind} ({exc.strerror})") from None
    try:
        try:
            real = descriptor_path(fd)
        except OSError:
            raise LocalFileRefused(
                f"{shown!r}: local files cannot be checked on this worker (no /proc/self/fd)"
            ) from None
        if not any(real.is_relative_to(root) for root in roots):
            raise LocalFileRefused(
                f"{shown!r} leads outside the directories this server allows ({ALLOWED_SETTING})"
            )
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and not directory)):
            raise LocalFileRefused(f"{shown!r} is not a regular file or directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class OpenedTree:
    """Every regular file under a directory, opened and verified; `files` in name order,
    names relative to the directory."""

    files: list[OpenedFile] = field(default_factory=list)

    def revision(self) -> str:
        """Each file's relative name, size and modification time, one line each: a new,
        rewritten, replaced or removed file changes it."""
        lines = []
        for opened in self.files:
            st = os.fstat(opened.fd)
            lines.append(f"{opened.name}\0{st.st_size}\0{st.st_mtime_ns}")
        return "\n".join(lines)


@contextmanager
def open_file(path: Path, allowed_dirs: Iterable[Path], *, shown: str) -> Iterator[OpenedFile]:
    """One regular file, verified; closed on leaving the block."""
    fd = open_checked(path, resolved_roots(allowed_dirs), shown=shown)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise LocalFileRefused(f"{shown!r} is a directory, not a file")
        yield OpenedFile(Path(shown).name, fd)
    finally:
        os.close(fd)


@contextmanager
def open_tree(
    directory: Path,
    allowed_dirs: Iterable[Path],
    *,
    shown: str,
    recursive: bool,
    wanted: Callable[[str], bool] | None = None,
) -> Iterator[OpenedTree]:
    """Open every regular file under `directory` (its subdirectories too with `recursive`)
    whose name `wanted` accepts (default: all); names starting with "." are skipped. Every
    entry is verified as `open_checked` says, so a link inside the directory that leads
    outside the allowed roots refuses the whole directory, naming the entry. The descriptors
    stay open for the block."""
    roots = resolved_roots(allowed_dirs)
    tree = OpenedTree()
    with ExitStack() as stack:
        top = open_checked(directory, roots, shown=shown, directory=True)
        stack.callback(os.close, top)
        walk = _Walk(roots, shown, recursive, wanted or (lambda name: True), tree, stack)
        walk.directory(top, "", depth=0)
        tree.files.sort(key=lambda f: f.name)
        yield tree


@dataclass
class _Walk:
    roots: list[Path]
    shown: str
    recursive: bool
    wanted: Callable[[str], bool]
    tree: OpenedTree
    stack: ExitStack

    def directory(self, dir_fd: int, prefix: str, depth: int) -> None:
        for entry in sorted(os.listdir(dir_fd)):
            if entry.startswith("."):
                continue
            name = prefix + entry
            shown = f"{self.shown.rstrip('/')}/{name}"
            fd = open_checked(entry, self.roots, shown=shown, dir_fd=dir_fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                if self.recursive and depth < MAX_DEPTH:
                    self.stack.callback(os.close, fd)
                    self.directory(fd, name + "/", depth + 1)
                else:
                    os.close(fd)
                continue
            if not self.wanted(entry):
                os.close(fd)
                continue
            self.stack.callback(os.close, fd)
            self.tree.files.append(OpenedFile(name, fd))
            if len(self.tree.files) > MAX_FILES:
                raise LocalFileRefused(f"{self.shown!r} has more than {MAX_FILES} files")


@contextmanager
def linked_view(tree: OpenedTree) -> Iterator[Path]:
    """A private temporary directory mirroring `tree`, each file a link to its open
    descriptor (`/proc/self/fd/N`), for loaders that open files by path themselves
    (transformers, safetensors, tokenizers): whatever they open is the verified file. Valid
    while `tree`'s descriptors stay open; removed on leaving the block."""
    view = Path(tempfile.mkdtemp(prefix="tunery-local-"))
    try:
        for opened in tree.files:
            link = view / opened.name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(opened.reopen, link)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)
