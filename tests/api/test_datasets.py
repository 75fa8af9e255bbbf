"""Datasets uploaded to Tunery: /v1/datasets, the MonsterAPI upload flow on local storage, and
jobs that name a dataset id. Real app, SQLite database, local storage."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.conftest import make_payload

# An example of a prompt-template preview without a model_path: nothing cut, no problem, no
# tokens.
NOT_CUT = {"prompt_cut": False, "completion_cut": False, "problem": None, "tokens": None}
ROWS = [
    {"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(8)
]


def file_bytes(fmt: str, rows: list[dict[str, Any]] = ROWS) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "json":
        return json.dumps(rows, indent=2).encode()
    if fmt == "csv":
        header = ",".join(rows[0])
        return (header + "\n" + "".join(",".join(r.values()) + "\n" for r in rows)).encode()
    import pyarrow
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pyarrow.Table.from_pylist(rows), out)
    return out.getvalue()


def upload(
    client: TestClient, data: bytes, name: str = "train.jsonl", content_type: str | None = None
) -> Any:
    part = (name, data, content_type) if content_type else (name, data)
    return client.post("/v1/datasets", files={"file": part})


def upload_ok(client: TestClient, fmt: str = "jsonl", rows: list[dict[str, Any]] = ROWS) -> dict:
    response = upload(client, file_bytes(fmt, rows), f"train.{fmt}")
    assert response.status_code == 201, response.text
    return response.json()


def stored_files(data_dir: Path) -> list[str]:
    root = data_dir / "storage" / "datasets"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def set_max_bytes(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    monkeypatch.setenv("TUNERY_MAX_DATASET_BYTES", str(limit))
    get_settings.cache_clear()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_upload_of_each_format_reports_rows_columns_and_first_five_rows(
    client: TestClient, tunery_env: Path, fmt: str
) -> None:
    body = upload_ok(client, fmt)

    assert body["id"].startswith("ds_") and len(body["id"]) == 35
    assert body["name"] == f"train.{fmt}"
    assert body["format"] == fmt
    assert body["status"] == "ready"
    assert body["size_bytes"] == len(file_bytes(fmt))
    assert body["rows"] == len(ROWS)
    assert body["columns"] == ["instruction", "input", "output"]
    assert body["first_rows"] == ROWS[:5]
    assert stored_files(tunery_env) == [f"{body['id']}/train.{fmt}"]


def test_format_comes_from_the_content_type_then_the_content_when_the_name_has_none(
    client: TestClient, tunery_env: Path
) -> None:
    by_type = upload(client, file_bytes("csv"), "data", "text/csv").json()
    sniffed = upload(client, file_bytes("jsonl"), "data", "application/octet-stream").json()

    assert (by_type["format"], sniffed["format"]) == ("csv", "jsonl")
    # The stored name carries the format, so the worker reads it the same way.
    assert f"{by_type['id']}/data.csv" in stored_files(tunery_env)
    assert f"{sniffed['id']}/data.jsonl" in stored_files(tunery_env)


def test_file_name_is_made_safe_for_storage(client: TestClient) -> None:
    body = upload(client, file_bytes("jsonl"), "../../etc/my data;v2.jsonl").json()

    assert body["name"] == "my_data_v2.jsonl"


def test_file_over_max_dataset_bytes_is_413_and_nothing_is_stored(
    client: TestClient, tunery_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = file_bytes("jsonl")
    set_max_bytes(monkeypatch, len(data) - 1)

    response = upload(client, data)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert not (tunery_env / "storage" / "datasets").exists()
    assert client.get("/v1/datasets").json()["total"] == 0
    set_max_bytes(monkeypatch, len(data))
    assert upload(client, data).status_code == 201


def test_declared_content_length_over_the_limit_is_413(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_max_bytes(monkeypatch, 10)

    response = client.post(
        "/v1/datasets", content=b"x" * 200_000,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )

    assert response.status_code == 413


@pytest.mark.parametrize(
    ("name", "data", "where"),
    [
        ("bad.jsonl", b'{"a": 1}\n{"a": 2}\n{"a": \n', "bad.jsonl line 3"),
        ("bad.jsonl", b'{"a": 1}\n[1, 2]\n', "bad.jsonl line 2"),
        ("bad.json", b'[\n  {"a": 1},\n  {"a": 2,,}\n]', "bad.json line 3"),
        ("bad.csv", b"a,b\n1,2\n3,4,5\n", "bad.csv line 3"),
        ("bad.csv", b"a,b\n1,2\n3,\xff\n", "bad.csv line 3: not UTF-8"),
        ("bad.parquet", b"PAR1 not really", "bad.parquet: not a readable parquet file"),
    ],
)
def test_file_that_does_not_parse_is_422_naming_the_line(
    client: TestClient, tunery_env: Path, name: str, data: bytes, where: str
) -> None:
    response = upload(client, data, name)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    assert where in error["message"]
    assert error["fields"][0]["path"] == "file"
    assert not (tunery_env / "storage" / "datasets").exists()


def test_file_without_rows_is_422(client: TestClient) -> None:
    response = upload(client, b"instruction,output\n", "empty.csv")

    assert response.status_code == 422
    assert "has no rows" in response.json()["error"]["message"]


def test_body_that_is_not_multipart_is_415_and_other_fields_are_422(client: TestClient) -> None:
    raw = client.post("/v1/datasets", content=b"{}", headers={"Content-Type": "application/json"})
    extra = client.post("/v1/datasets", files={"data": ("a.jsonl", b'{"a":1}\n')})
    missing = client.post("/v1/datasets", content=b"--b--\r\n",
                          headers={"Content-Type": "multipart/form-data; boundary=b"})

    assert raw.status_code == 415
    assert raw.json()["error"]["code"] == "unsupported_media_type"
    assert extra.status_code == 422
    assert extra.json()["error"]["fields"][0]["path"] == "data"
    assert missing.status_code == 422
    assert missing.json()["error"]["fields"][0]["path"] == "file"


def test_get_returns_the_metadata_and_list_is_paginated_newest_first(client: TestClient) -> None:
    ids = [upload_ok(client)["id"] for _ in range(3)]

    one = client.get(f"/v1/datasets/{ids[0]}")
    page = client.get("/v1/datasets", params={"limit": 2}).json()
    rest = client.get("/v1/datasets", params={"limit": 2, "offset": 2}).json()

    assert one.status_code == 200
    assert one.json()["rows"] == len(ROWS) and one.json()["first_rows"] == ROWS[:5]
    assert page["total"] == 3
    assert [d["id"] for d in page["items"]] == ids[::-1][:2]
    assert [d["id"] for d in rest["items"]] == ids[:1]


def test_preview_shows_prompt_and_completion_apart(client: TestClient) -> None:
    dataset_id = upload_ok(client)["id"]

    response = client.post(
        f"/v1/datasets/{dataset_id}/preview",
        json={"prompt_template": "Q: {instruction}\nA: {output}</s>", "n": 2},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["examples"] == [
        {"prompt": "Q: Add 0 and 0.\nA: ", "completion": "0</s>", **NOT_CUT},
        {"prompt": "Q: Add 1 and 1.\nA: ", "completion": "2</s>", **NOT_CUT},
    ]
    assert body["missing_columns"] == []
    assert body["placeholders"] == ["instruction", "output"]
    assert "{output}" in body["message"]


def test_preview_lists_missing_columns_with_a_message(client: TestClient) -> None:
    dataset_id = upload_ok(client)["id"]

    body = client.post(
        f"/v1/datasets/{dataset_id}/preview",
        json={"prompt_template": "{context} {instruction} -> {response}"},
    ).json()

    assert body["missing_columns"] == ["context", "response"]
    assert "['context', 'response']" in body["message"]
    assert "instruction" in body["message"] and "output" in body["message"]
    assert len(body["examples"]) == 5
    assert body["examples"][0] == {"prompt": " Add 0 and 0. -> ", "completion": "", **NOT_CUT}


def test_preview_refuses_unsafe_templates_and_too_many_rows(client: TestClient) -> None:
    dataset_id = upload_ok(client)["id"]
    url = f"/v1/datasets/{dataset_id}/preview"

    unsafe = client.post(url, json={"prompt_template": "{instruction.__class__}"})
    too_many = client.post(url, json={"prompt_template": "{output}", "n": 1000})

    assert unsafe.status_code == 422
    assert unsafe.json()["error"]["fields"][0]["path"] == "prompt_template"
    assert too_many.status_code == 422


def test_another_tenants_dataset_answers_exactly_like_a_random_id(client: TestClient) -> None:
    dataset_id = upload_ok(client)["id"]
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    random_id = "ds_" + "0" * 32
    preview = {"prompt_template": "{output}"}

    for target in (dataset_id, random_id):
        got = client.get(f"/v1/datasets/{target}", headers=other)
        previewed = client.post(f"/v1/datasets/{target}/preview", json=preview, headers=other)
        assert got.status_code == previewed.status_code == 404
        assert got.json() == {"error": {"code": "not_found", "fields": [],
                                        "message": f"no dataset with id {target}"}}
    submitted = client.post(
        "/v1/finetune/llm", json=make_payload(data_path=dataset_id), headers=other
    )
    assert submitted.status_code == 422
    assert client.get("/v1/datasets", headers=other).json()["total"] == 0


def test_every_dataset_route_needs_a_key(app_client: TestClient) -> None:
    for method, path in [
        ("POST", "/v1/datasets"),
        ("GET", "/v1/datasets"),
        ("GET", "/v1/datasets/ds_x"),
        ("POST", "/v1/datasets/ds_x/preview"),
        ("GET", "/v1/upload?filename=a.jsonl"),
    ]:
        response = app_client.request(method, path)
        assert response.status_code == 401, path


def test_submit_with_a_dataset_id_is_queued(client: TestClient) -> None:
    dataset_id = upload_ok(client, "csv")["id"]

    response = client.post("/v1/finetune/llm", json=make_payload(data_path=dataset_id))

    assert response.status_code == 201, response.text
    job = client.get(f"/v1/finetune/llm/{response.json()['job_id']}").json()
    assert job["payload"]["data_config"]["data_path"] == dataset_id


def test_submit_with_an_unknown_dataset_id_is_422_naming_data_path(client: TestClient) -> None:
    response = client.post("/v1/finetune/llm", json=make_payload(data_path="ds_" + "a" * 32))

    assert response.status_code == 422
    field = response.json()["error"]["fields"][0]
    assert field["path"] == "data_config.data_path"
    assert "no dataset with id" in field["message"]


def test_submit_with_a_template_column_the_dataset_lacks_is_422_listing_both(
    client: TestClient,
) -> None:
    rows = [{"question": "2+2?", "answer": "4"}]
    dataset_id = upload_ok(client, "jsonl", rows)["id"]

    response = client.post("/v1/finetune/llm", json=make_payload(data_path=dataset_id))

    assert response.status_code == 422
    field = response.json()["error"]["fields"][0]
    assert field["path"] == "data_config.prompt_template"
    assert "['instruction', 'input', 'output']" in field["message"]
    assert "['question', 'answer']" in field["message"]


def test_orpo_with_a_dataset_lacking_preference_columns_is_422_naming_the_option(
    client: TestClient,
) -> None:
    rows = [{"prompt": "2+2?", "answer": "4"}]
    dataset_id = upload_ok(client, "jsonl", rows)["id"]
    payload = make_payload(
        data_path=dataset_id, training_config={"preference_optimization": "ORPO"}
    )

    response = client.post("/v1/finetune/llm", json=payload)

    assert response.status_code == 422
    field = response.json()["error"]["fields"][0]
    assert field["path"] == "training_config.preference_optimization"
    assert "['chosen', 'rejected']" in field["message"]
    assert "['prompt', 'answer']" in field["message"]


def test_orpo_with_a_preference_dataset_is_accepted_whatever_the_template(
    client: TestClient,
) -> None:
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    dataset_id = upload_ok(client, "jsonl", rows)["id"]
    payload = make_payload(
        data_path=dataset_id, training_config={"preference_optimization": "ORPO"}
    )

    assert client.post("/v1/finetune/llm", json=payload).status_code == 201


def test_dpo_with_an_openai_preference_dataset_is_accepted_and_without_one_is_422(
    client: TestClient,
) -> None:
    row = {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
           "preferred_completion": [{"role": "assistant", "content": "4"}],
           "non_preferred_completion": [{"role": "assistant", "content": "5"}]}
    good = upload_ok(client, "jsonl", [row])["id"]
    bad = upload_ok(client, "jsonl", [{"input": row["input"], "preferred_output": "4"}])["id"]

    accepted = client.post("/v1/finetune/llm", json=make_payload(
        data_path=good, training_config={"preference_optimization": "DPO"}))
    refused = client.post("/v1/finetune/llm", json=make_payload(
        data_path=bad, training_config={"preference_optimization": "DPO"}))

    assert accepted.status_code == 201, accepted.text
    assert refused.status_code == 422
    field = refused.json()["error"]["fields"][0]
    assert field["path"] == "training_config.preference_optimization"
    assert field["message"].startswith("DPO needs the columns")
    assert "the dataset lacks ['non_preferred_output']" in field["message"]


def test_a_dataset_id_is_not_a_model(client: TestClient) -> None:
    dataset_id = upload_ok(client)["id"]

    response = client.post("/v1/finetune/llm", json=make_payload(model_path=dataset_id))

    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["path"] == "pretrainedmodel_config.model_path"


def test_upload_flow_on_local_storage_puts_bytes_with_the_url_token_and_trains_on_the_id(
    client: TestClient, tunery_env: Path
) -> None:
    urls = client.get("/v1/upload", params={"filename": "mine.jsonl"})
    assert urls.status_code == 200, urls.text
    upload_url, download_url = urls.json()["upload_url"], urls.json()["download_url"]
    assert download_url.startswith("ds_")
    assert upload_url.startswith(f"http://testserver/v1/upload/{download_url}?token=")

    # The PUT carries no API key, as with a presigned URL.
    put = client.put(upload_url, content=file_bytes("jsonl"), headers={"Authorization": ""})

    assert put.status_code == 200, put.text
    assert put.json()["status"] == "ready" and put.json()["rows"] == len(ROWS)
    assert stored_files(tunery_env) == [f"{download_url}/mine.jsonl"]
    payload = make_payload(data_path=download_url,
                           data_config={"data_source_type": "s3_presigned_link"})
    submitted = client.post("/v1/finetune/llm", json=payload)
    assert submitted.status_code == 201, submitted.text
    again = client.put(upload_url, content=file_bytes("jsonl"))
    assert again.status_code == 409


def test_upload_put_with_a_wrong_token_or_unknown_id_is_403(client: TestClient) -> None:
    download_url = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()["download_url"]

    wrong = client.put(f"/v1/upload/{download_url}?token=guess", content=b'{"a": 1}\n')
    unknown = client.put(f"/v1/upload/ds_{'0' * 32}?token=guess", content=b'{"a": 1}\n')

    assert wrong.status_code == unknown.status_code == 403
    assert wrong.json() == unknown.json()


def test_upload_put_that_does_not_parse_is_422_and_the_dataset_stays_failed(
    client: TestClient,
) -> None:
    urls = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()

    put = client.put(urls["upload_url"], content=b'{"a": 1}\n{"a": oops}\n')

    assert put.status_code == 422
    assert "a.jsonl line 2" in put.json()["error"]["message"]
    meta = client.get(f"/v1/datasets/{urls['dataset_id']}").json()
    assert meta["status"] == "failed" and "line 2" in meta["error"]
    submitted = client.post("/v1/finetune/llm", json=make_payload(data_path=urls["dataset_id"]))
    assert submitted.status_code == 422
    assert "was rejected" in submitted.json()["error"]["fields"][0]["message"]


def test_upload_put_over_the_limit_is_413(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()
    set_max_bytes(monkeypatch, 100)

    put = client.put(urls["upload_url"], content=b"x" * 101)

    assert put.status_code == 413


def test_submit_before_the_upload_arrived_is_422_saying_so(client: TestClient) -> None:
    dataset_id = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()["dataset_id"]

    response = client.post("/v1/finetune/llm", json=make_payload(data_path=dataset_id))
    preview = client.post(f"/v1/datasets/{dataset_id}/preview", json={"prompt_template": "{a}"})

    assert response.status_code == 422
    assert "has not been uploaded yet" in response.json()["error"]["message"]
    assert preview.status_code == 409
    assert client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "pending"


def test_importing_the_api_does_not_import_torch_or_datasets() -> None:
    code = (
        "import sys, api.main; "
        "print([m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules])"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"
