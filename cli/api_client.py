"""The `tunery` client commands' way to a Tunery API: HTTP only, with httpx, at
`TUNERY_API_URL` with the key in `TUNERY_API_KEY`. Any machine can run them; nothing of the
server is imported.

A refusal from the API is an `ApiRefused` carrying the API's own message (its one error
shape, `{"error": {"code", "message", "fields"}}`); an API that cannot be reached is an
`ApiUnreachable`. Commands print either in one line, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

API_URL_VARIABLE = "TUNERY_API_URL"
API_KEY_VARIABLE = "TUNERY_API_KEY"
DEFAULT_API_URL = "http://127.0.0.1:8000"

# Connecting should be quick; an answer may take long (a dataset check on submit), and a
# stream is read for as long as it is quiet between pings (15 s by default on the server).
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class ApiRefused(Exception):
    """The API answered with an error status; `message` is what it said."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    @property
    def transient(self) -> bool:
        """Worth asking again later: too many requests, or the server or a service behind it
        unavailable."""
        return self.status == 429 or self.status >= 500


class ApiUnreachable(Exception):
    """No answer from the API: nothing listens at its URL, the network, a timeout."""


def refusal(response: httpx.Response) -> ApiRefused:
    """The error `response` carries, with the API's message when it sent one."""
    message = ""
    try:
        error = response.json().get("error")
        if isinstance(error, Mapping):
            message = str(error.get("message") or "")
    except ValueError:
        pass
    if not message:
        text = response.text.strip()[:200] if not response.is_stream_consumed else ""
        message = f"HTTP {response.status_code} {response.reason_phrase}: {text}".rstrip(": ")
    return ApiRefused(response.status_code, message)


class ApiClient:
    """An httpx client for the API the environment names; use as a context manager."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.base_url = (env.get(API_URL_VARIABLE) or DEFAULT_API_URL).rstrip("/")
        key = env.get(API_KEY_VARIABLE, "").strip()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=TIMEOUT)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._json(self._send("GET", path, params=params))

    def post_json(self, path: str, body: Any) -> Any:
        return self._json(self._send("POST", path, json=body))

    @contextmanager
    def stream(self, path: str, headers: Mapping[str, str] | None = None,
               params: Mapping[str, Any] | None = None) -> Iterator[httpx.Response]:
        """A GET whose body is read as it arrives; an error status is raised as
        `ApiRefused` before the body is handed over. `path` may be an absolute URL (a
        presigned download), which is sent without the API key."""
        try:
            if path.startswith(("http://", "https://")) and not path.startswith(self.base_url):
                request = httpx.Request("GET", path, headers=headers, params=params)
            else:
                request = self.http.build_request("GET", path, headers=headers, params=params)
            response = self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        try:
            if response.is_error:
                response.read()
                raise refusal(response)
            yield response
        finally:
            response.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.is_error:
            raise refusal(response)
        return response

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ApiRefused(response.status_code, f"{self.base_url} answered with something "
                             f"that is not JSON; is {API_URL_VARIABLE} a Tunery API?") from None

    def _unreachable(self, exc: httpx.HTTPError) -> ApiUnreachable:
        reason = str(exc) or type(exc).__name__
        return ApiUnreachable(f"cannot reach the Tunery API at {self.base_url} ({reason}); "
                              f"is it running, and is {API_URL_VARIABLE} its URL?")
