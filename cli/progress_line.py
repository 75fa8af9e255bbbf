"""One status line at the bottom of the output, redrawn in place with `\\r` on a terminal
and printed as a line of its own per change elsewhere (a log file, a CI job), with lines of
text printed above it. Plain stdout, no terminal library."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

_CLEAR = "\r\x1b[K"


class ProgressLine:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.live = self.out.isatty()
        self._shown = ""

    def print(self, text: str) -> None:
        """`text` as a line of its own above the status line."""
        if self.live and self._shown:
            self.out.write(f"{_CLEAR}{text}\n{self._fit(self._shown)}")
        else:
            self.out.write(f"{text}\n")
        self.out.flush()

    def update(self, status: str) -> None:
        """Show `status` as the status line; nothing is written when it has not changed."""
        if status == self._shown:
            return
        self._shown = status
        self.out.write(f"{_CLEAR}{self._fit(status)}" if self.live else f"{status}\n")
        self.out.flush()

    def close(self) -> None:
        """Leave the status line as it is, ended by a newline."""
        if self.live and self._shown:
            self.out.write("\n")
            self.out.flush()
        self._shown = ""

    def _fit(self, text: str) -> str:
        # A line wider than the terminal wraps, and `\r` would then redraw only its last part.
        width = shutil.get_terminal_size().columns - 1
        return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def bar(fraction: float | None, width: int = 24) -> str:
    """`[######------]`, or a bar of `?` when the fraction is unknown."""
    if fraction is None:
        return "[" + "?" * width + "]"
    done = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * done + "-" * (width - done) + "]"


def format_duration(seconds: float) -> str:
    """`42s`, `4m05s`, `1h02m`."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(count: float) -> str:
    """`512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while count >= 1024 and index < len(units) - 1:
        count /= 1024
        index += 1
    return f"{count:.0f} B" if index == 0 else f"{count:.1f} {units[index]}"
