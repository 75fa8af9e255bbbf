"""Does a hub model or dataset exist? One GET to the hub's metadata API, bounded in time.

Only the dry run asks: a plain submit does not wait on the network for it, and the worker
finds out anyway. A hub that cannot be reached, or answers with anything but yes or no, leaves
the id "not checked" (a warning), never refused: an outage of the hub is not the user's
mistake, and the worker may reach it later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import httpx

from shared.settings import SourceSettings

DEFAULT_ENDPOINT = "https://huggingface.co"

HubKind = Literal["models", "datasets"]


@dataclass(frozen=True)
class HubAnswer:
    """found: the hub has it; missing: no such repo that the caller can read (`detail` says
    what may be wrong); unchecked: no answer either way (`detail` says why)."""

    status: Literal["found", "missing", "unchecked"]
    detail: str = ""


class HubClient:
    """Asks `{endpoint}/api/{models|datasets}/{repo_id}`, as huggingface_hub does."""

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, sources: SourceSettings) -> HubClient:
        # The worker's huggingface_hub reads HF_ENDPOINT; ask the hub it will read from.
        endpoint = sources.hub_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        return cls(endpoint, sources.hub_check_timeout_s)

    def lookup(self, kind: HubKind, repo_id: str, token: str | None) -> HubAnswer:
        """Whether the hub has `repo_id`, as seen with `token` (the job's hf_token)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=True) as client:
                response = client.get(f"{self.endpoint}/api/{kind}/{repo_id}", headers=headers)
        except httpx.TimeoutException:
            return HubAnswer("unchecked", f"the hub ({self.endpoint}) could not be reached: "
                                          f"no answer within {self.timeout_s:g} s")
        except httpx.HTTPError as exc:
            return HubAnswer("unchecked", f"the hub ({self.endpoint}) could not be reached "
                                          f"({type(exc).__name__})")
        if response.status_code == 200:
            return HubAnswer("found")
        if response.status_code == 404:
            return HubAnswer("missing")
        if response.status_code in (401, 403):
            # The hub answers 401 for a repo that does not exist and for a private one alike,
            # so that nobody learns which private repos exist.
            return HubAnswer("missing", "hf_config.hf_token cannot read it" if token else
                             "or it is private: pass an hf_config.hf_token that can read it")
        return HubAnswer("unchecked", f"the hub ({self.endpoint}) answered HTTP "
                                      f"{response.status_code}")
