"""The dashboard's files as the API serves them, and the vendored uPlot as recorded."""

from __future__ import annotations

import hashlib
import re
import tomllib
from fnmatch import fnmatch

from fastapi.testclient import TestClient

from api.dashboard.serve import STATIC_DIR
from shared.settings import PROJECT_ROOT

UPLOT = STATIC_DIR / "vendor" / "uplot"


def test_the_page_at_the_root_is_the_dashboard_under_a_strict_content_security_policy(
    app_client: TestClient,
) -> None:
    response = app_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>Tunery</title>" in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy


def test_every_file_the_page_names_is_served(app_client: TestClient) -> None:
    page = app_client.get("/").text
    named = re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page)
    assert len(named) == 4, named
    for path in named:
        assert app_client.get(path).status_code == 200, path
    for module in sorted((STATIC_DIR / "js").rglob("*.js")):
        path = "/dashboard/" + module.relative_to(STATIC_DIR).as_posix()
        response = app_client.get(path)
        assert response.status_code == 200, path
        assert "javascript" in response.headers["content-type"]


def test_a_missing_dashboard_file_is_a_404_in_the_api_error_shape(app_client: TestClient) -> None:
    response = app_client.get("/dashboard/js/nothing-here.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_the_vendored_uplot_files_are_those_of_the_recorded_npm_tarball() -> None:
    record = (UPLOT / "VERSION.md").read_text()
    recorded = dict(re.findall(r"\| `([^`]+)` \| `([0-9a-f]{64})` \|", record))
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    assert {p.name for p in UPLOT.iterdir()} == {*recorded, "VERSION.md"}
    for name, sha256 in recorded.items():
        assert hashlib.sha256((UPLOT / name).read_bytes()).hexdigest() == sha256, name
    version = re.search(r"- version: `([0-9.]+)`", record)
    assert version is not None
    assert f"(v{version[1]})" in (UPLOT / "uPlot.iife.min.js").read_text()[:200]


def test_the_wheel_carries_every_dashboard_file() -> None:
    # setuptools' package-data globs, as pyproject.toml lists them.
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api.dashboard"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(STATIC_DIR.parent).as_posix()
            assert any(fnmatch(relative, p) and relative.count("/") == p.count("/")
                       for p in patterns), relative
