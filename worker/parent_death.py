"""A process that must not outlive the one that started it: a job's process group is killed
with its worker, whichever way the worker dies (`kill -9` included).

`python -m worker.parent_death COMMAND ARGS...` runs COMMAND with that guarantee: the kernel
signals it (SIGTERM) when its parent exits, and the setting survives the exec. torchrun runs
this way, and each of its ranks calls `die_with_parent` for itself, since torchrun starts them
in sessions of their own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux); a parent
    already gone (the process was re-parented before this ran) ends it at once."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1:
        os._exit(128 + int(sig))


def main(argv: list[str]) -> None:
    die_with_parent(signal.SIGTERM)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
