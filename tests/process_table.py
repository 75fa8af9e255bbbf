"""The live processes of this machine, read from /proc: what a test sees of the process tree
a command left behind, whatever its parents did."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    parent: int
    session: int


def live_processes() -> list[ProcessEntry]:
    """Every process that is not a zombie."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name is in parentheses and may hold spaces: the fields after it count.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            found.append(ProcessEntry(int(entry.name), int(fields[1]), int(fields[3])))
    return found


def in_session(sid: int) -> set[int]:
    """Every live process of session `sid`, wherever its parent went."""
    return {p.pid for p in live_processes() if p.session == sid}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    parents = {p.pid: p.parent for p in live_processes()}
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found
