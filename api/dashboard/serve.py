"""Serves the dashboard: its page at `/` and its scripts, styles and vendored uPlot under
`/dashboard/`. Nothing here is secret and nothing needs a key: the page asks for the key and
sends it with each call to the JSON routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PATH = "/dashboard"

# The key lives in the page's sessionStorage, so a script injected into the page could read
# it: only the dashboard's own files may run, and the page may call only this origin.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # The page is small and changes with each release; a stale one would call routes that moved.
    "Cache-Control": "no-cache",
}


def dashboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers=PAGE_HEADERS)


def install_dashboard(app: FastAPI) -> None:
    app.add_api_route("/", dashboard_page, methods=["GET"], include_in_schema=False)
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="dashboard")
