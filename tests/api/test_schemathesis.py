"""schemathesis against the app's own OpenAPI document, in process (ASGI): every documented
operation is called with generated valid and invalid data under a real API key, through the
examples, coverage, fuzzing and stateful phases, and every response must be a non-5xx that
matches the schema: status code, content type, headers and body.

Bounded for CI: a fixed seed and `MAX_EXAMPLES` per operation and phase (about 35 s on two
cores). It prints how many cases it ran.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.engine import Status, from_schema
from schemathesis.engine.events import (
    EngineFinished,
    FatalError,
    FuzzScenarioFinished,
    NonFatalError,
    ScenarioFinished,
)

from tests.api.conftest import new_key
from tests.conftest import SAMPLE_DATASET, make_payload

MAX_EXAMPLES = 60

CHECKS = {
    "not_a_server_error": {"enabled": True},
    "status_code_conformance": {"enabled": True},
    "content_type_conformance": {"enabled": True},
    "response_schema_conformance": {"enabled": True},
    "response_headers_conformance": {"enabled": True},
    "negative_data_rejection": {"enabled": True},
    # A payload valid by the schema is still refused when it names a dataset or model the
    # server cannot use (SSRF guard, missing dataset, unsafe path): a 422 there is correct.
    "positive_data_acceptance": {"enabled": False},
    "use_after_free": {"enabled": True},
    "ensure_resource_availability": {"enabled": True},
    "missing_required_header": {"enabled": True},
    "ignored_auth": {"enabled": True},
    "unsupported_method": {"enabled": True},
    "allow_header_conformance": {"enabled": True},
    # Object-level authorization needs a second tenant: tests/api/test_tenant_isolation.py.
}


def _config(api_key: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": 20261126,
        "workers": 1,
        "cache": {"enabled": False},
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "headers": {"Authorization": f"Bearer {api_key}"},
        # A job's event stream lasts as long as the job: a queued job's opens with two events
        # (the job, its creation) and then only pings. Two are read and checked, no waiting.
        "max-stream-events": 2,
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
        "checks": CHECKS,
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": True, "max-steps": 20},
        },
    })


@pytest.fixture
def fuzzed_client(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app with the per-key rate and active-job limits off: thousands of cases from one key
    would otherwise be answered 429 after the first hundred, and test nothing else."""
    from api.main import create_app
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_RATE_LIMIT_PER_MINUTE", "0")
    monkeypatch.setenv("TUNERY_MAX_ACTIVE_JOBS_PER_TENANT", "0")
    # The fuzzer sends hundreds of unauthenticated requests from one address on purpose; the
    # limit on failed authentications has its own tests (test_auth_failures.py).
    monkeypatch.setenv("TUNERY_AUTH_FAILURES_PER_MINUTE", "0")
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        yield client


def _seed_objects(client: TestClient, headers: dict[str, str]) -> None:
    """A dataset and a job to find, so ids taken from responses lead somewhere."""
    with SAMPLE_DATASET.open("rb") as fh:
        up = client.post("/v1/datasets", files={"file": ("alpaca.jsonl", fh)}, headers=headers)
    assert up.status_code == 201, up.text
    job = client.post("/v1/finetune/llm", json=make_payload(), headers=headers)
    assert job.status_code == 201, job.text


def _failures(recorder: Any) -> list[str]:
    found = []
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status == Status.FAILURE and check.failure_info is not None:
                failure = check.failure_info.failure
                label = recorder.cases[case_id].value.operation.label
                found.append(f"{check.name}: {label}: {failure.title}: {failure.message[:400]}"
                             f"\n    {check.failure_info.code_sample}")
    return found


def test_every_operation_answers_as_its_schema_says_and_never_5xx(
    fuzzed_client: TestClient,
) -> None:
    api_key = new_key("fuzzed")
    _seed_objects(fuzzed_client, {"Authorization": f"Bearer {api_key}"})
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_client.app,
                                            config=_config(api_key))

    cases: Counter[str] = Counter()
    failures: set[str] = set()
    errors: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, ScenarioFinished | FuzzScenarioFinished):
            cases[str(event.phase)] += len(event.recorder.cases)
            failures.update(_failures(event.recorder))
        elif isinstance(event, NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, FatalError):
            errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, EngineFinished):
            print(f"\nschemathesis: {sum(cases.values())} cases "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(cases.items()))}) "
                  f"in {event.running_time:.1f} s, {len(failures)} distinct failures")

    assert not errors, "\n".join(errors)
    assert not failures, "\n".join(sorted(failures))
    assert cases["fuzzing"] > 0 and cases["coverage"] > 0 and cases["stateful"] > 0
