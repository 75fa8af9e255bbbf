"""Running the engine: uvicorn serving the engine's app in this process."""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.settings import get_settings


def default_address() -> tuple[str, int]:
    """Host and port of `settings.inference.engine_url`, where the API looks for the engine."""
    url = urlsplit(get_settings().inference.engine_url)
    return url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)


def serve(host: str, port: int, quiet: bool = False) -> None:
    """Serve the engine until interrupted (blocking). One process: the engine's thread owns
    the models, so more uvicorn workers would each load them. `quiet`: no access log and
    only uvicorn's warnings and errors."""
    import logging

    import uvicorn

    from inference.app import create_app

    # As the API does: the engine's own lines (models loaded and unloaded, failed batches).
    logging.basicConfig(level=get_settings().log_level)
    uvicorn.run(create_app(), host=host, port=port, log_level="warning" if quiet else "info",
                access_log=not quiet)
