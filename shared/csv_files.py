"""The delimiter of a CSV file, told from its header line.

Excel writes semicolons between fields wherever the decimal separator is a comma, and
spreadsheets export tab-separated files as readily as comma-separated ones. Read with the
wrong delimiter, such a file becomes one column named after the whole header line
(`instruction;output`), which nothing reports until a template asks for its columns. So
`shared.dataset_files` reads each CSV with the delimiter its header line uses, the API records
it on the dataset and the worker logs it.

Pure standard library, no I/O: `shared.dataset_files` reads the line.
"""

from __future__ import annotations

COMMA = ","
DELIMITER_NAMES = {COMMA: "comma", ";": "semicolon", "\t": "tab"}
"""The delimiters a CSV header line may use, the default first."""


def sniff_delimiter(header_line: str) -> str:
    """The delimiter (one of `DELIMITER_NAMES`) that occurs most often outside quotes in
    `header_line`; a comma when none occurs or two occur equally often, since a comma is
    what most files use and a header like `a;b,c` says nothing for sure."""
    counts = dict.fromkeys(DELIMITER_NAMES, 0)
    quoted = False
    for char in header_line:
        if char == '"':
            # A doubled quote inside a quoted field toggles twice: still inside.
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    most = max(counts.values())
    winners = [delimiter for delimiter, count in counts.items() if count == most]
    return winners[0] if most and len(winners) == 1 else COMMA


def describe_delimiter(delimiter: str) -> str:
    """How messages name a delimiter: `semicolon (';')`, `tab ('\\t')`."""
    return f"{DELIMITER_NAMES.get(delimiter, 'delimiter')} ({delimiter!r})"
