"""Webhook endpoints through the API, and their deliveries sent by the real sender to a real
receiver on 127.0.0.1 (allowed by the operator's settings here, as a private host would be),
verified the way tenants verify them: with `openai`'s `client.webhooks.unwrap` and with
`standardwebhooks`. The sender runs in this process (`send_next`), one attempt per call, as
each of a worker's sender threads does."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types.webhooks import FineTuningJobCancelledWebhookEvent

from api.limits.webhook_tests import MAX_PER_TENANT, WebhookTestSends
from shared.db import session_scope
from shared.models import WebhookDelivery, WebhookEndpoint
from shared.settings import get_settings
from shared.webhooks import signing_secrets
from shared.webhooks.endpoints import MAX_ENDPOINTS_PER_TENANT
from shared.webhooks.send import INTERNAL_FAILURE
from shared.webhooks.sender import send_next
from tests.api.conftest import new_key
from tests.conftest import make_payload
from tests.webhook_receiver import Receiver, receiver, signed_by

URL = "/v1/webhook_endpoints"


@pytest.fixture
def loopback_allowed(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Receivers on 127.0.0.1 over http, as an operator allows a private host; retries due
    at once, so a test does not wait for the backoff."""
    monkeypatch.setenv("TUNERY_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("TUNERY_ALLOWED_PRIVATE_URL_HOSTS", '["127.0.0.1"]')
    monkeypatch.setenv("TUNERY_WEBHOOK_RETRY_BASE_S", "0.001")
    monkeypatch.setenv("TUNERY_WEBHOOK_TIMEOUT_S", "5")
    get_settings.cache_clear()


@pytest.fixture
def hooks(loopback_allowed: None, client: TestClient) -> Iterator[Receiver]:
    with receiver() as running:
        yield running


def send_due(limit: int = 50) -> int:
    """Make every attempt that is due, as the worker's senders would; how many."""
    sent = 0
    while sent < limit and send_next(get_settings(), "test-sender"):
        sent += 1
    return sent


def create(client: TestClient, url: str, **fields: Any) -> dict[str, Any]:
    response = client.post(URL, json={"url": url, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def submit(client: TestClient) -> str:
    response = client.post("/v1/finetune/llm", json=make_payload())
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def attempts(client: TestClient, endpoint_id: str) -> list[dict[str, Any]]:
    response = client.get(f"{URL}/{endpoint_id}/attempts", params={"limit": 100})
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))  # oldest first


def test_the_secret_is_shown_at_creation_only_and_every_event_type_is_the_default(
    hooks: Receiver, client: TestClient,
) -> None:
    created = create(client, hooks.url)
    secret = created["signing_secret"]
    assert secret.startswith("whsec_") and created["object"] == "webhook_endpoint"
    types = client.get("/v1/webhook_event_types").json()["data"]
    assert created["event_types"] == types
    assert {"fine_tuning.job.succeeded", "fine_tuning.job.failed",
            "fine_tuning.job.cancelled", "tunery.job.started"} <= set(types)
    read = client.get(f"{URL}/{created['id']}").json()
    listed = client.get(URL).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    for shown in (read, listed["data"][0]):
        assert "signing_secret" not in shown
        assert shown["signing_secret_hint"] == f"whsec_…{secret[-4:]}"
        assert secret not in json.dumps(shown)
    assert client.delete(f"{URL}/{created['id']}").json() == {
        "id": created["id"], "object": "webhook_endpoint.deleted", "deleted": True}
    assert client.get(f"{URL}/{created['id']}").status_code == 404


def test_a_job_event_arrives_signed_and_both_verifiers_accept_it(
    hooks: Receiver, client: TestClient,
) -> None:
    secret = create(client, hooks.url)["signing_secret"]
    job_id = submit(client)
    assert client.post(f"/v1/finetune/llm/{job_id}/cancel").status_code == 200
    assert send_due() == 2
    queued, cancelled = hooks.wait_for(2)

    assert signed_by(queued, secret) and signed_by(cancelled, secret)
    assert not signed_by(cancelled, "whsec_" + "A" * 32)
    body = json.loads(cancelled.body)
    # OpenAI's event, field for field, and what its SDK reads it into.
    assert set(body) == {"id", "object", "type", "created_at", "data"}
    assert body["object"] == "event" and body["id"].startswith("evt_")
    assert body["data"] == {"id": f"ftjob-{job_id}"}
    event = OpenAI(api_key="x", base_url="http://127.0.0.1:9").webhooks.unwrap(
        cancelled.body, cancelled.headers, secret=secret)
    assert isinstance(event, FineTuningJobCancelledWebhookEvent)
    assert event.data.id == f"ftjob-{job_id}"
    # Tunery's own events carry the MonsterAPI job id too.
    assert json.loads(queued.body)["type"] == "tunery.job.queued"
    assert json.loads(queued.body)["data"] == {"id": f"ftjob-{job_id}", "job_id": job_id,
                                               "attempt": 0}
    assert queued.webhook_id != cancelled.webhook_id
    assert cancelled.headers["webhook-signature"].startswith("v1,")


def test_an_endpoint_gets_only_the_event_types_it_asked_for(
    hooks: Receiver, client: TestClient,
) -> None:
    create(client, hooks.url, enabled_events=["fine_tuning.job.cancelled"])
    job_id = submit(client)
    client.post(f"/v1/finetune/llm/{job_id}/cancel")
    assert send_due() == 1
    assert json.loads(hooks.wait_for(1)[0].body)["type"] == "fine_tuning.job.cancelled"


def test_a_receiver_failing_three_times_gets_one_delivery_in_four_attempts_of_one_id(
    loopback_allowed: None, client: TestClient,
) -> None:
    with receiver([500, 503, 502]) as failing:
        endpoint = create(client, failing.url, event_types=["tunery.job.queued"])
        submit(client)
        deadline = time.monotonic() + 60
        while len(failing.received) < 4 and time.monotonic() < deadline:
            send_due()
        assert send_due() == 0  # delivered: nothing is due any more
        received = failing.wait_for(4)
    assert len(received) == 4
    assert len({r.webhook_id for r in received}) == 1
    assert len({r.body for r in received}) == 1
    listed = attempts(client, endpoint["id"])
    assert [a["status_code"] for a in listed] == [500, 503, 502, 200]
    assert [a["attempt"] for a in listed] == [1, 2, 3, 4]
    assert {a["webhook_id"] for a in listed} == {received[0].webhook_id}
    assert [a["delivery_status"] for a in listed] == ["delivered"] * 4
    assert all(a["duration_ms"] is not None and a["error"] is None for a in listed)


def test_a_410_disables_the_endpoint_and_nothing_more_is_sent(
    loopback_allowed: None, client: TestClient,
) -> None:
    with receiver([410]) as gone:
        endpoint = create(client, gone.url)
        job_id = submit(client)
        assert send_due() == 1
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
        assert send_due() == 0
        assert len(gone.received) == 1
    shown = client.get(f"{URL}/{endpoint['id']}").json()
    assert shown["enabled"] is False and "410" in shown["disabled_reason"]
    assert [a["status_code"] for a in attempts(client, endpoint["id"])] == [410]
    # Enabled again by its owner, it takes the next events.
    with receiver() as back:
        client.post(f"{URL}/{endpoint['id']}", json={"enabled": True, "url": back.url})
        submit(client)
        assert send_due() == 1
        assert json.loads(back.wait_for(1)[0].body)["type"] == "tunery.job.queued"


@pytest.mark.parametrize("url", [
    "https://10.0.0.1/hooks",
    "https://169.254.169.254/latest/meta-data",
    "https://localhost/hooks",
    "http://[::1]:8080/hooks",
    "https://user:pass@example.com/hooks",
    "ftp://example.com/hooks",
])
def test_a_url_the_ssrf_rules_refuse_is_a_400_naming_url(
    loopback_allowed: None, client: TestClient, url: str,
) -> None:
    response = client.post(URL, json={"url": url})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"
    assert client.get(URL).json()["data"] == []
    with receiver() as fine:
        endpoint = create(client, fine.url)
        changed = client.post(f"{URL}/{endpoint['id']}", json={"url": url})
        assert changed.status_code == 400 and changed.json()["error"]["param"] == "url"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9001/\r\nX: 1",
    "http://127.0.0.1:9001/\u0000",
    "http://127.0.0.1:9001/\tx",
    "http://127.0.0.1 :9001/",
])
def test_a_url_with_a_control_character_or_whitespace_is_a_400_naming_url(
    loopback_allowed: None, client: TestClient, url: str,
) -> None:
    response = client.post(URL, json={"url": url})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"
    assert "control character or whitespace" in response.json()["error"]["message"]
    assert client.get(URL).json()["data"] == []


def poison(endpoint_id: str, *, url: str | None = None, secret: str | None = None) -> None:
    """Give an endpoint a value the API does not make: a URL stored before the API refused
    it, or a damaged signing secret (here one that is not base64, which the signing library
    refuses with its own exception)."""
    with session_scope() as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        if url is not None:
            endpoint.url = url
        if secret is not None:
            endpoint.secret = signing_secrets.seal(secret)


def deliveries_to(endpoint_id: str) -> list[WebhookDelivery]:
    with session_scope() as session:
        rows = session.query(WebhookDelivery).filter_by(endpoint_id=endpoint_id).all()
        session.expunge_all()
        return rows


def test_an_attempt_that_fails_inside_tunery_is_recorded_and_backs_off(
    loopback_allowed: None, client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNERY_WEBHOOK_RETRY_BASE_S", "3600")
    get_settings.cache_clear()
    with receiver() as fine:
        endpoint = create(client, fine.url, event_types=["tunery.job.queued"])
    poison(endpoint["id"], secret="whsec_a")
    submit(client)
    assert send_due() == 1  # sent once, then not due again until its backoff has passed
    [attempt] = attempts(client, endpoint["id"])
    assert attempt["status_code"] is None and attempt["finished_at"] is not None
    assert attempt["error"] == INTERNAL_FAILURE
    assert attempt["delivery_status"] == "pending"
    [delivery] = deliveries_to(endpoint["id"])
    assert delivery.lease_owner is None and delivery.attempts == 1


def test_a_delivery_that_fails_inside_tunery_is_given_up_after_the_retry_window(
    loopback_allowed: None, client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNERY_WEBHOOK_RETRY_WINDOW_S", "0")
    get_settings.cache_clear()
    with receiver() as fine:
        endpoint = create(client, fine.url, event_types=["tunery.job.queued"])
    poison(endpoint["id"], secret="whsec_a")
    submit(client)
    assert send_due() == 1
    assert send_due() == 0
    assert [a["delivery_status"] for a in attempts(client, endpoint["id"])] == ["failed"]


def test_one_tenants_poisoned_delivery_does_not_hold_up_another_tenants(
    loopback_allowed: None, client: TestClient, app_client: TestClient,
) -> None:
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    with receiver() as fine:
        bad_secret = create(client, fine.url, event_types=["tunery.job.queued"])
        bad_url = create(client, fine.url, event_types=["tunery.job.queued"])
        poison(bad_secret["id"], secret="whsec_a")
        poison(bad_url["id"], url="http://127.0.0.1:9001/\r\nX: 1")
        submit(client)  # tenant A's deliveries are the oldest due: claimed first
        healthy = app_client.post(URL, json={"url": fine.url}, headers=other).json()
        app_client.post("/v1/finetune/llm", json=make_payload(), headers=other)
        # Retries are due at once here: a poisoned delivery that kept its place at the head
        # of the queue would take every claim, and tenant B's would never be sent.
        for _ in range(6):
            send_next(get_settings(), "one-sender")
        [received] = fine.wait_for(1)
    assert json.loads(received.body)["type"] == "tunery.job.queued"
    listed = app_client.get(f"{URL}/{healthy['id']}/attempts", headers=other).json()["data"]
    assert [(a["status_code"], a["delivery_status"]) for a in listed] == [(200, "delivered")]
    assert {a["error"] for a in attempts(client, bad_secret["id"])} == {INTERNAL_FAILURE}
    assert all("control character" in a["error"] for a in attempts(client, bad_url["id"]))


MALFORMED_URLS = [
    "http://[::1/", "http://[::1", "http://::1]/", "http://[", "http://]", "http://[]/",
    "http://[::1]x/", "http://[v1.x]/", "http://[127.0.0.1]/", "http://[::1%eth0/",
    "http://127.0.0.1:-1/", "http://127.0.0.1:abc/",
    "http://127.0.0.1:99999/", "http://127.0.0.1:0x50/", "http://127.0.0.1:+80/",
    "http://127.0.0.1:9001:9002/", "http://:9001/", "http://", "http:", "http:/", "//x/y",
    "http:///path", "://127.0.0.1/", "127.0.0.1:9001", "localhost", "x", "\\", "http://@/",
    "http://a@b@127.0.0.1/", "http://%31%32%37.0.0.1/", "http://127.0.0.1%00/",
    "http://xn--/", "http://xn--zz/", "http://-a.com/", "http://a..com/", "http://.../",
    "http://" + "a" * 64 + ".com/", "http://" + "a." * 130 + "com/", "http://例え.テスト/",
    "http://127.0.0.1/\ud800", "http://\u0661\u0662\u0667.0.0.1/", "javascript:alert(1)",
    "data:text/plain,x", "http://[::ffff:127.0.0.1]/", "http://0/", "http://127.1/",
]


def test_no_malformed_url_is_a_500(loopback_allowed: None, client: TestClient) -> None:
    with receiver() as fine:
        endpoint = create(client, fine.url)
    for url in MALFORMED_URLS:
        # As JSON escapes: a lone surrogate arrives as \ud800, which no client encodes raw.
        body: dict[str, Any] = {"content": json.dumps({"url": url}),
                                "headers": {"content-type": "application/json"}}
        for response in (client.post(URL, **body),
                         client.post(f"{URL}/{endpoint['id']}", **body)):
            assert response.status_code == 400, (url, response.text)
            assert response.json()["error"]["param"] == "url", (url, response.text)
    assert [e["id"] for e in client.get(URL).json()["data"]] == [endpoint["id"]]


def test_an_endpoint_is_named_after_its_host_by_default(
    hooks: Receiver, client: TestClient,
) -> None:
    assert create(client, hooks.url)["name"] == "127.0.0.1"
    assert create(client, hooks.url, name="jobs")["name"] == "jobs"


def test_loopback_is_refused_where_the_operator_allows_no_private_host(
    tunery_env: Path, client: TestClient,
) -> None:
    with receiver() as local:
        for url in (local.url, local.url.replace("127.0.0.1", "localhost")):
            response = client.post(URL, json={"url": url.replace("http:", "https:")})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "url"


def test_a_tenant_has_at_most_twenty_endpoints(hooks: Receiver, client: TestClient) -> None:
    for _ in range(MAX_ENDPOINTS_PER_TENANT):
        create(client, hooks.url)
    refused = client.post(URL, json={"url": hooks.url})
    assert refused.status_code == 400
    assert f"at most {MAX_ENDPOINTS_PER_TENANT}" in refused.json()["error"]["message"]


def test_an_endpoint_that_trickles_its_answer_is_cut_at_the_deadline(
    loopback_allowed: None, client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNERY_WEBHOOK_TIMEOUT_S", "1")
    get_settings.cache_clear()
    with trickling_server(seconds=20) as url:
        endpoint = create(client, url)
        failed = client.post(f"{URL}/{endpoint['id']}/test")
    # Each byte came well within the timeout; the attempt as a whole did not.
    assert failed.status_code == 400
    assert "no answer within 1 s" in failed.json()["error"]["message"]
    assert attempts(client, endpoint["id"])[0]["error"] == "no answer within 1 s"


@contextmanager
def trickling_server(seconds: float) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that sends its answer's status line a byte every 0.1 s,
    and the rest of a 200 after `seconds`."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                deadline = time.monotonic() + seconds
                with suppress(OSError):
                    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                        if time.monotonic() > deadline or stop.is_set():
                            break
                        conn.sendall(bytes([byte]))
                        time.sleep(0.1)
                    conn.sendall(b"\r\ncontent-length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow"
    finally:
        stop.set()
        listener.close()


def test_an_unknown_event_type_is_a_400_naming_the_field(
    hooks: Receiver, client: TestClient,
) -> None:
    response = client.post(URL, json={"url": hooks.url, "event_types": ["job.done"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("event_types")


def test_another_tenants_endpoint_is_a_404_everywhere(
    hooks: Receiver, client: TestClient, app_client: TestClient,
) -> None:
    endpoint = create(client, hooks.url)
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    base = f"{URL}/{endpoint['id']}"
    for method, path in (("GET", base), ("POST", base), ("DELETE", base),
                         ("POST", f"{base}/rotate_secret"), ("POST", f"{base}/test"),
                         ("GET", f"{base}/attempts")):
        kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
        response = app_client.request(method, path, headers=other, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
    assert app_client.get(URL, headers=other).json()["data"] == []
    # Its events are not the other tenant's either.
    app_client.post("/v1/finetune/llm", json=make_payload(), headers=other)
    assert send_due() == 0


def test_the_test_send_reports_the_answer_and_lists_its_attempt(
    loopback_allowed: None, client: TestClient,
) -> None:
    with receiver([418]) as teapot:
        endpoint = create(client, teapot.url)
        result = client.post(f"{URL}/{endpoint['id']}/test",
                             json={"event_type": "fine_tuning.job.failed"}).json()
        assert result == {"object": "webhook_endpoint.test", "event_type":
                          "fine_tuning.job.failed", "status_code": 418, "success": True,
                          "delivered": False, "webhook_endpoint_id": endpoint["id"]}
        sent = teapot.wait_for(1)[0]
        assert signed_by(sent, endpoint["signing_secret"])
        assert json.loads(sent.body)["type"] == "fine_tuning.job.failed"
    # Not retried: a test send is one attempt.
    assert send_due() == 0
    listed = attempts(client, endpoint["id"])
    assert [(a["status_code"], a["test"], a["delivery_status"]) for a in listed] == [
        (418, True, "failed")]
    # Nobody listening any more: the answer says why.
    failed = client.post(f"{URL}/{endpoint['id']}/test")
    assert failed.status_code == 400
    assert "no answer" in failed.json()["error"]["message"]


@pytest.mark.parametrize(("status", "delivered"), [
    (200, True), (204, True), (307, False), (410, False), (500, False)])
def test_the_test_send_says_delivered_only_for_a_2xx(
    loopback_allowed: None, client: TestClient, status: int, delivered: bool,
) -> None:
    with receiver([status]) as answering:
        endpoint = create(client, answering.url)
        result = client.post(f"{URL}/{endpoint['id']}/test").json()
    # OpenAI's `success` says the request completed; whether it was delivered is apart.
    assert (result["status_code"], result["success"], result["delivered"]) == (
        status, True, delivered)
    assert client.get(f"{URL}/{endpoint['id']}").json()["enabled"] is True


def test_test_sends_wait_on_their_own_threads_and_a_tenant_has_few_at_once(
    loopback_allowed: None, client: TestClient, app_client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The held sends end when the receiver lets them go, long before this deadline.
    monkeypatch.setenv("TUNERY_WEBHOOK_TIMEOUT_S", "30")
    get_settings.cache_clear()
    assert MAX_PER_TENANT == 2
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    sends: WebhookTestSends = app_client.app.state.webhook_test_sends  # type: ignore[attr-defined]
    portal = client.portal
    assert portal is not None
    with receiver(hold_all=True) as slow, receiver() as fine:
        ids = [create(client, slow.url)["id"] for _ in range(3)]
        answers: dict[str, int] = {}

        def test_send(endpoint_id: str) -> None:
            answers[endpoint_id] = client.post(f"{URL}/{endpoint_id}/test").status_code

        held = [threading.Thread(target=test_send, args=(i,)) for i in ids[:2]]
        for thread in held:
            thread.start()
        slow.wait_for(2)  # both in flight, answered only on release()
        try:
            again = client.post(f"{URL}/{ids[0]}/test")
            assert again.status_code == 429, again.text
            assert "this endpoint" in again.json()["error"]["message"]
            assert again.headers["retry-after"] == "30"
            third = client.post(f"{URL}/{ids[2]}/test")
            assert third.status_code == 429, third.text
            assert "at most 2 test sends" in third.json()["error"]["message"]
            # The held sends wait on their own threads; the shared ones are free for others.
            borrowed = portal.call(lambda: (
                sends.limiter.borrowed_tokens,
                anyio.to_thread.current_default_thread_limiter().borrowed_tokens))
            assert borrowed == (2, 0)
            assert app_client.get(URL, headers=other).status_code == 200
            theirs = app_client.post(URL, json={"url": fine.url}, headers=other).json()
            tested = app_client.post(f"{URL}/{theirs['id']}/test", headers=other)
            assert tested.status_code == 200 and tested.json()["delivered"] is True
            # Another tenant naming A's endpoint gets a 404, and takes none of A's places.
            assert app_client.post(f"{URL}/{ids[2]}/test", headers=other).status_code == 404
        finally:
            slow.release()
            for thread in held:
                thread.join(timeout=60)
    assert answers == {ids[0]: 200, ids[1]: 200}
    assert (sends.endpoints, sends.tenants) == (set(), {})
    # Places are given back: the next test send to the first endpoint goes out.
    with receiver() as back:
        client.post(f"{URL}/{ids[0]}", json={"url": back.url})
        assert client.post(f"{URL}/{ids[0]}/test").status_code == 200


def test_after_a_rotation_the_old_secret_verifies_during_the_window_and_not_after(
    hooks: Receiver, client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = create(client, hooks.url)
    first = endpoint["signing_secret"]
    rotated = client.post(f"{URL}/{endpoint['id']}/rotate_secret").json()
    second = rotated["signing_secret"]
    assert second != first and rotated["signing_secret_hint"] == f"whsec_…{second[-4:]}"
    client.post(f"{URL}/{endpoint['id']}/test")
    during = hooks.wait_for(1)[0]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert signed_by(during, first) and signed_by(during, second)

    monkeypatch.setenv("TUNERY_WEBHOOK_SECRET_ROTATION_WINDOW_S", "1")
    get_settings.cache_clear()
    third = client.post(f"{URL}/{endpoint['id']}/rotate_secret").json()["signing_secret"]
    time.sleep(1.5)  # past the one-second window
    client.post(f"{URL}/{endpoint['id']}/test")
    after = hooks.wait_for(2)[1]
    assert signed_by(after, third)
    assert not signed_by(after, second) and not signed_by(after, first)

    # Rotating without keeping the old secret ends it at once.
    fourth = client.post(f"{URL}/{endpoint['id']}/rotate_secret",
                         json={"keep_old_secret_active_for_24_hours": False}).json()
    client.post(f"{URL}/{endpoint['id']}/test")
    last = hooks.wait_for(3)[2]
    assert signed_by(last, fourth["signing_secret"]) and not signed_by(last, third)


def test_the_openai_client_manages_endpoints(hooks: Receiver, client: TestClient) -> None:
    key = client.headers["Authorization"].removeprefix("Bearer ")
    # The TestClient is an httpx.Client that reaches the app in process.
    sdk = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                 max_retries=0)
    created = sdk.webhooks.create(name="jobs", url=hooks.url,
                                  event_types=["fine_tuning.job.succeeded"])
    assert created.signing_secret.startswith("whsec_") and created.name == "jobs"
    assert sdk.webhooks.retrieve(created.id).event_types == ["fine_tuning.job.succeeded"]
    assert [e.id for e in sdk.webhooks.list()] == [created.id]
    updated = sdk.webhooks.update(created.id, name="renamed")
    assert updated.name == "renamed"
    rotated = sdk.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret != created.signing_secret
    tested = sdk.webhooks.test(created.id, event_type="fine_tuning.job.succeeded")
    assert tested.status_code == 200 and tested.success is True
    assert tested.model_extra == {"delivered": True}
    event = sdk.webhooks.unwrap(hooks.wait_for(1)[0].body, hooks.received[0].headers,
                                secret=rotated.signing_secret)
    assert event.type == "fine_tuning.job.succeeded"
    assert sdk.webhooks.delete(created.id).deleted is True
