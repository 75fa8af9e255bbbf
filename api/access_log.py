"""The access log without credentials: query values that are secrets become `***`.

`PUT /v1/upload/{id}?token=…` carries its upload token in the query (the token is the auth),
and uvicorn logs every request's path with its query string.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode

SECRET_QUERY_NAMES = frozenset({
    "token", "api_key", "key", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token",
})


def redact_query(path: str) -> str:
    """`path` with the value of every secret-named query parameter replaced by `***`."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    pairs = [
        (name, "***" if name.lower() in SECRET_QUERY_NAMES else value)
        for name, value in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{base}?{urlencode(pairs, safe='*')}"


class RedactQueryFilter(logging.Filter):
    """For uvicorn's access logger, whose record args are (client, method, path, version,
    status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


_FILTER = RedactQueryFilter()


def install_access_log_filter() -> None:
    logging.getLogger("uvicorn.access").addFilter(_FILTER)
