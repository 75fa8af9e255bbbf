"""README.md renders as written: every code fence closes, and every link inside the repository
(`#a-heading`, `bench/README.md`) leads somewhere. Parsed with markdown-it-py, a CommonMark
parser, as GitHub parses it."""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

from shared.settings import PROJECT_ROOT

# A fence's info string is a language, optionally with attributes: ```python, ```sh {.x}.
# Prose after a fence (``` The bundled model...) is a fence that was meant to close.
INFO_STRING = re.compile(r"[\w+#.-]+(\s*\{[^}]*\})?")
SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")

# The README before dc09237: a closing fence with text after it is no closing fence, so the
# code block ran to the end of the document and nothing below it rendered.
UNCLOSED_SAMPLE = '''# Tunery

```bash
curl -H "Authorization: Bearer tun_..." -F file=@train.jsonl http://127.0.0.1:8000/v1/datasets
# {"id": "ds_…", "format": "jsonl", "rows": 1200, "columns": [...], "first_rows": [...], ...}
``` The bundled tiny model and dataset exist for machines with no
hub access (tests, the demo).

### Routes (Bearer API key on every `/v1` route)

| route | what |
|---|---|
'''


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def heading_anchors(tokens: list[Token]) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type != "heading_open":
            continue
        title = "".join(child.content for child in inline.children or ()
                        if child.type in ("text", "code_inline"))
        slug = github_slug(title)
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def readme_problems(text: str, root: Path) -> list[str]:
    """What keeps `text` (a README in `root`) from rendering as meant, one line each."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    lines = text.splitlines()
    problems = []
    for token in tokens:
        if token.type != "fence" or token.map is None:
            continue
        start, end = token.map
        closing = lines[end - 1].lstrip(" >") if end - 1 > start else ""
        fence_char, length = token.markup[0], len(token.markup)
        if not re.fullmatch(re.escape(fence_char) + f"{{{length},}}\\s*", closing):
            problems.append(f"line {start + 1}: this code block never closes (it runs to line "
                            f"{end}); a closing fence has nothing after it")
        if token.info.strip() and not INFO_STRING.fullmatch(token.info.strip()):
            problems.append(f"line {start + 1}: text after the fence is not a language: "
                            f"{token.info.strip()[:40]!r}")
    anchors = heading_anchors(tokens)
    for token in tokens:
        for child in token.children or ():
            target = child.attrGet("href") if child.type == "link_open" else \
                child.attrGet("src") if child.type == "image" else None
            if not isinstance(target, str) or SCHEME.match(target):
                continue
            line = token.map[0] + 1 if token.map else 0
            path, _, fragment = target.partition("#")
            if not path:
                if fragment not in anchors:
                    problems.append(f"line {line}: no heading has the anchor #{fragment}")
            elif not (root / path.split("?")[0].lstrip("/")).exists():
                problems.append(f"line {line}: {path} does not exist")
    return problems


def test_the_readme_renders_its_code_blocks_and_links_as_written() -> None:
    readme = PROJECT_ROOT / "README.md"

    assert readme_problems(readme.read_text(), PROJECT_ROOT) == []


def test_a_fence_with_text_after_it_is_caught() -> None:
    problems = readme_problems(UNCLOSED_SAMPLE, PROJECT_ROOT)

    assert problems == [
        f"line 3: this code block never closes (it runs to line "
        f"{len(UNCLOSED_SAMPLE.splitlines())}); a closing fence has nothing after it"
    ]


def test_an_opening_fence_followed_by_prose_is_caught() -> None:
    text = "# T\n\n``` The bundled tiny model\nhub access\n```\n"

    assert readme_problems(text, PROJECT_ROOT) == [
        "line 3: text after the fence is not a language: 'The bundled tiny model'"
    ]


def test_links_to_a_missing_heading_or_file_are_caught() -> None:
    text = ("# Quick start\n\n## Using `tunery up`, offline\n\n"
            "[ok](#quick-start) [ok](#using-tunery-up-offline) [ok](bench/README.md#x) "
            "[web](https://example.org/nowhere)\n\n"
            "[bad](#configuration) [bad](docs/missing.md)\n")

    assert readme_problems(text, PROJECT_ROOT) == [
        "line 7: no heading has the anchor #configuration",
        "line 7: docs/missing.md does not exist",
    ]
