"""Bounds on what one tenant's dataset requests may cost the server: templates and previews,
row length and nesting at upload, no stored object left by a refused upload, the per-tenant
storage quota, and deleting a dataset. Real app, SQLite database, local storage."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared.dataset_files import MAX_NESTING
from shared.datasets import PREVIEW_PART_CHARS, SAMPLE_ROWS
from shared.db import session_scope
from shared.keys import create_api_key
from shared.schema import MAX_TEMPLATE_PLACEHOLDERS
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.api.test_datasets import file_bytes, upload, upload_ok
from tests.conftest import make_payload


def set_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: int) -> None:
    monkeypatch.setenv(name, str(value))
    get_settings.cache_clear()


def stored_objects(data_dir: Path) -> list[str]:
    """Every object in local storage under datasets/ and uploads/."""
    root = data_dir / "storage"
    return sorted(
        p.relative_to(root).as_posix()
        for prefix in ("datasets", "uploads")
        for p in (root / prefix).rglob("*")
        if p.is_file()
    )


def nested_row(depth: int) -> str:
    """A JSON object whose `messages` value nests lists `depth` levels below the row."""
    return '{"instruction": "a", "output": "b", "messages": ' + "[" * depth + "]" * depth + "}"


# --- templates and previews -------------------------------------------------------------


def test_a_template_with_more_placeholders_than_the_cap_is_422_on_preview_and_submit(
    client: TestClient,
) -> None:
    dataset_id = upload_ok(client)["id"]
    template = "{a}" * 5461  # 16383 characters: within the template length limit

    preview = client.post(f"/v1/datasets/{dataset_id}/preview",
                          json={"prompt_template": template, "n": 20})
    submit = client.post("/v1/finetune/llm", json=make_payload(
        data_path=dataset_id, data_config={"prompt_template": template}))

    assert preview.status_code == 422, preview.text[:300]
    field = preview.json()["error"]["fields"][0]
    assert field["path"] == "prompt_template"
    assert "5461 placeholders" in field["message"]
    assert f"at most {MAX_TEMPLATE_PLACEHOLDERS}" in field["message"]
    assert submit.status_code == 422
    assert submit.json()["error"]["fields"][0]["path"] == "data_config.prompt_template"


def test_preview_of_long_rows_through_a_repeating_template_is_bounded_and_flagged(
    client: TestClient,
) -> None:
    rows = [{"instruction": "x" * 4000, "output": "y" * 4000} for _ in range(SAMPLE_ROWS)]
    dataset_id = upload_ok(client, "jsonl", rows)["id"]
    # Within the cap; unbounded, 20 rows would render 20 * 63 * 4000 = 5 million characters.
    template = "{instruction}" * (MAX_TEMPLATE_PLACEHOLDERS - 1) + " => {output}"

    response = client.post(f"/v1/datasets/{dataset_id}/preview",
                           json={"prompt_template": template, "n": SAMPLE_ROWS})

    assert response.status_code == 200, response.text[:300]
    assert len(response.content) < SAMPLE_ROWS * 2 * PREVIEW_PART_CHARS + 20_000
    examples = response.json()["examples"]
    assert len(examples) == SAMPLE_ROWS
    first = examples[0]
    assert first["prompt"] == "x" * PREVIEW_PART_CHARS and first["prompt_cut"] is True
    # The completion is cut on its own: the preview still shows where it starts.
    assert first["completion"] == "y" * PREVIEW_PART_CHARS and first["completion_cut"] is True


# --- row length and nesting at upload ----------------------------------------------------


@pytest.mark.parametrize("depth", [900, 100_000])
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_too_deeply_nested_rows_are_422_naming_the_line_and_nothing_is_stored(
    client: TestClient, tunery_env: Path, depth: int, fmt: str
) -> None:
    ok = '{"instruction": "a", "output": "b"}'
    data = f"{ok}\n{nested_row(depth)}\n" if fmt == "jsonl" else f"[{ok},\n{nested_row(depth)}]"

    response = upload(client, data.encode(), f"deep.{fmt}")

    assert response.status_code == 422, response.text[:300]
    message = response.json()["error"]["message"]
    assert "line 2" in message and f"{MAX_NESTING} levels" in message
    assert stored_objects(tunery_env) == []


def test_a_too_deep_upload_put_fails_the_upload_and_stores_nothing(
    client: TestClient, tunery_env: Path
) -> None:
    urls = client.get("/v1/upload", params={"filename": "deep.jsonl"}).json()

    put = client.put(urls["upload_url"], content=f"{nested_row(900)}\n".encode())

    assert put.status_code == 422, put.text[:300]
    assert "line 1" in put.json()["error"]["message"]
    assert client.get(f"/v1/datasets/{urls['dataset_id']}").json()["status"] == "failed"
    assert stored_objects(tunery_env) == []


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_a_row_longer_than_max_row_bytes_is_422_naming_the_line_and_the_limit(
    client: TestClient, tunery_env: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    set_setting(monkeypatch, "TUNERY_MAX_ROW_BYTES", 4096)
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "x" * 5000, "output": "ok"}]

    response = upload(client, file_bytes(fmt, rows), f"long.{fmt}")

    assert response.status_code == 422, response.text[:300]
    message = response.json()["error"]["message"]
    assert "4096" in message and "TUNERY_MAX_ROW_BYTES" in message
    # jsonl: line 2; csv: the header is line 1; json (indent=2): the second element's line.
    assert {"jsonl": "line 2", "csv": "line 3", "json": "row 2 (line 6)"}[fmt] in message
    assert stored_objects(tunery_env) == []


def test_a_csv_record_of_many_quoted_lines_counts_as_one_row(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_setting(monkeypatch, "TUNERY_MAX_ROW_BYTES", 4096)
    long_cell = "\n".join(["y" * 100] * 50)  # 50 short lines, one 5000-character record
    data = f'instruction,output\nshort,ok\nlong,"{long_cell}"\n'.encode()

    response = upload(client, data, "multi.csv")

    assert response.status_code == 422, response.text[:300]
    assert "line 3" in response.json()["error"]["message"]


# --- per-tenant quota --------------------------------------------------------------------


def test_an_upload_beyond_the_tenants_bytes_quota_is_413_saying_what_is_used(
    client: TestClient, tunery_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = upload_ok(client)
    size = first["size_bytes"]
    set_setting(monkeypatch, "TUNERY_MAX_TENANT_DATASET_BYTES", size + 10)

    second = upload(client, file_bytes("jsonl"), "again.jsonl")
    other_tenant = client.post(
        "/v1/datasets", files={"file": ("b.jsonl", file_bytes("jsonl"))},
        headers={"Authorization": f"Bearer {new_key('tenant-b')}"},
    )

    assert second.status_code == 413, second.text
    message = second.json()["error"]["message"]
    assert f"use {size} bytes of the {size + 10}" in message
    assert "TUNERY_MAX_TENANT_DATASET_BYTES" in message
    assert other_tenant.status_code == 201, other_tenant.text  # the quota is per tenant
    assert stored_objects(tunery_env) == sorted([
        f"datasets/{first['id']}/train.jsonl", f"datasets/{other_tenant.json()['id']}/b.jsonl"
    ])


def test_the_tenants_dataset_count_quota_is_413_on_post_and_on_get_upload(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_ok(client)
    set_setting(monkeypatch, "TUNERY_MAX_TENANT_DATASETS", 1)

    post = upload(client, file_bytes("jsonl"))
    url = client.get("/v1/upload", params={"filename": "a.jsonl"})

    for response in (post, url):
        assert response.status_code == 413, response.text
        message = response.json()["error"]["message"]
        assert "has 1 datasets" in message and "TUNERY_MAX_TENANT_DATASETS" in message


def test_an_upload_put_beyond_the_bytes_quota_is_413_and_the_upload_stays_pending(
    client: TestClient, tunery_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()
    set_setting(monkeypatch, "TUNERY_MAX_TENANT_DATASET_BYTES", 100)
    data = file_bytes("jsonl")

    put = client.put(urls["upload_url"], content=data)

    assert put.status_code == 413, put.text
    assert f"a file of {len(data)} bytes does not fit" in put.json()["error"]["message"]
    assert client.get(f"/v1/datasets/{urls['dataset_id']}").json()["status"] == "pending"
    assert stored_objects(tunery_env) == []


# --- DELETE /v1/datasets/{id} ------------------------------------------------------------


def test_delete_removes_the_stored_file_and_the_row(client: TestClient, tunery_env: Path) -> None:
    dataset_id = upload_ok(client)["id"]
    assert stored_objects(tunery_env) != []

    deleted = client.delete(f"/v1/datasets/{dataset_id}")

    assert deleted.status_code == 204 and deleted.content == b""
    assert stored_objects(tunery_env) == []
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 404


def test_delete_of_a_pending_upload_frees_its_place_in_the_count_quota(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_setting(monkeypatch, "TUNERY_MAX_TENANT_DATASETS", 1)
    pending = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()["dataset_id"]
    assert client.get("/v1/upload", params={"filename": "b.jsonl"}).status_code == 413

    assert client.delete(f"/v1/datasets/{pending}").status_code == 204

    assert client.get("/v1/upload", params={"filename": "b.jsonl"}).status_code == 200


def test_delete_is_409_while_a_queued_job_trains_on_the_dataset(
    client: TestClient, tunery_env: Path
) -> None:
    dataset_id = upload_ok(client)["id"]
    job = client.post("/v1/finetune/llm", json=make_payload(data_path=dataset_id))
    assert job.status_code == 201, job.text
    job_id = job.json()["job_id"]

    refused = client.delete(f"/v1/datasets/{dataset_id}")

    assert refused.status_code == 409
    assert job_id in refused.json()["error"]["message"]
    assert stored_objects(tunery_env) == [f"datasets/{dataset_id}/train.jsonl"]
    assert client.post(f"/v1/finetune/llm/{job_id}/cancel").status_code == 200
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204


def test_delete_is_409_while_a_queued_job_evaluates_on_the_dataset(
    client: TestClient, tunery_env: Path
) -> None:
    training_id, validation_id = upload_ok(client)["id"], upload_ok(client)["id"]
    job = client.post("/v1/finetune/llm", json=make_payload(
        data_path=training_id, data_config={"validation_data_path": validation_id}))
    assert job.status_code == 201, job.text
    job_id = job.json()["job_id"]

    refused = client.delete(f"/v1/datasets/{validation_id}")

    assert refused.status_code == 409
    assert job_id in refused.json()["error"]["message"]
    assert "validation_data_path" in refused.json()["error"]["message"]
    assert client.post(f"/v1/finetune/llm/{job_id}/cancel").status_code == 200
    assert client.delete(f"/v1/datasets/{validation_id}").status_code == 204


def test_another_tenants_key_gets_404_and_an_admin_key_may_delete(
    client: TestClient, tunery_env: Path
) -> None:
    dataset_id = upload_ok(client)["id"]
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    with session_scope() as session:
        admin = {"Authorization": "Bearer "
                 + create_api_key(session, "operator", admin=True).plaintext}

    assert client.delete(f"/v1/datasets/{dataset_id}", headers=other).status_code == 404
    assert stored_objects(tunery_env) != []
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=admin).status_code == 204
    assert stored_objects(tunery_env) == []
