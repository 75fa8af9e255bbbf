"""The pieces `tunery watch` and `tunery download` draw and read with: the status line on a
terminal and elsewhere, the bar and the units, and the SSE reader."""

from __future__ import annotations

import io

import pytest

from cli.progress_line import ProgressLine, bar, format_bytes, format_duration
from cli.sse import ServerSentEvent, read_events


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_status_line_is_redrawn_in_place_under_printed_lines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = Terminal()
    line = ProgressLine(out)
    line.update("[#---] step 1/4")
    line.update("[#---] step 1/4")  # unchanged: nothing written
    line.print("a log line")
    line.update("[##--] step 2/4")
    line.close()
    assert out.getvalue() == ("\r\x1b[K[#---] step 1/4"
                              "\r\x1b[Ka log line\n[#---] step 1/4"
                              "\r\x1b[K[##--] step 2/4\n")


def test_a_status_wider_than_the_terminal_is_cut_so_that_it_never_wraps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "20")
    out = Terminal()
    ProgressLine(out).update("x" * 50)
    assert out.getvalue() == "\r\x1b[K" + "x" * 18 + "…"


def test_elsewhere_each_change_is_a_line_of_its_own() -> None:
    out = io.StringIO()
    line = ProgressLine(out)
    line.update("step 1")
    line.print("log")
    line.update("step 1")
    line.update("step 2")
    line.close()
    assert out.getvalue() == "step 1\nlog\nstep 2\n"


@pytest.mark.parametrize(("fraction", "drawn"), [
    (0.0, "[----]"), (0.5, "[##--]"), (1.0, "[####]"), (1.7, "[####]"), (None, "[????]")])
def test_bar(fraction: float | None, drawn: str) -> None:
    assert bar(fraction, width=4) == drawn


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.4, "0s"), (42, "42s"), (65, "1m05s"), (3725, "1h02m")])
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(("count", "shown"), [
    (512, "512 B"), (1536, "1.5 KiB"), (3 * 1024**2 + 1, "3.0 MiB"), (1024**5, "1024.0 TiB")])
def test_format_bytes(count: int, shown: str) -> None:
    assert format_bytes(count) == shown


def test_events_are_read_as_an_eventsource_reads_them() -> None:
    stream = ("event: log\nid: s1.l2.m0\ndata: {\"line\": \"a\"}\n\n"
              ": ping\n\n"
              "data: first\ndata: second\n\n"
              "data:no space\nid\n\n"
              "event: end\ndata: {}\n")  # cut before its blank line: never dispatched
    assert list(read_events(stream.splitlines())) == [
        ServerSentEvent("log", '{"line": "a"}', "s1.l2.m0"),
        ServerSentEvent("message", "first\nsecond"),
        ServerSentEvent("message", "no space", ""),
    ]
