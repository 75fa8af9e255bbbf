"""A table of hostile inputs: template attribute access, path traversal in every name a client
supplies, 10 MB strings, deeply nested JSON, a wrong JSON type in every field of the payload,
huge integers, NaN and Infinity, NUL characters. Each gets the right 4xx in the one error
shape (error.code, error.message, error.fields with paths for 422), nothing leaks a stack
trace, and the server still answers /healthz after each batch.

File names a client gives an upload are the exception: those are made safe, not refused, so
the check there is that what is stored stays inside the dataset's own directory.

SSRF targets (data_path and model_path URLs) are covered by the sources tests.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.models import JobStatus
from shared.settings import get_settings
from shared.storage import storage_from_settings
from tests.api.conftest import new_key
from tests.conftest import make_payload

JSON = {"Content-Type": "application/json"}
SUBMIT = "/v1/finetune/llm"
ROWS = "".join(
    json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)}) + "\n"
    for i in range(8)
).encode()

TRIED: list[str] = []
"""Every hostile input sent, across the module: the count is printed at the end."""


@dataclass(frozen=True)
class Probe:
    label: str
    send: Callable[[TestClient], httpx.Response]
    statuses: tuple[int, ...] = (422,)
    field: str | None = None
    """A 422 must name this field path (or one below it)."""


@dataclass
class Server:
    client: TestClient
    headers: dict[str, str]
    data_dir: Path
    done_job: str = ""
    other_tenants_job: str = ""
    dataset: str = ""

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(path, json=body, headers=self.headers)

    def post_raw(self, path: str, content: str | bytes) -> httpx.Response:
        return self.client.post(path, content=content, headers={**self.headers, **JSON})


@contextmanager
def _app(tunery_env: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[TestClient]:
    from api.main import create_app

    # Hundreds of requests from one key: the rate and active-job limits would answer 429 to
    # most of them and hide what each input does on its own.
    monkeypatch.setenv("TUNERY_RATE_LIMIT_PER_MINUTE", "0")
    monkeypatch.setenv("TUNERY_MAX_ACTIVE_JOBS_PER_TENANT", "0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        yield client


def _completed_job(client: TestClient, headers: dict[str, str]) -> str:
    job_id = client.post(SUBMIT, json=make_payload(), headers=headers).json()["job_id"]
    storage_from_settings(get_settings()).put_bytes(f"jobs/{job_id}/adapter_config.json", b"{}")
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "test-worker", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)
    return job_id


@pytest.fixture
def server(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    with _app(tunery_env, monkeypatch) as client:
        headers = {"Authorization": f"Bearer {new_key('hostile')}"}
        other = {"Authorization": f"Bearer {new_key('bystander')}"}
        up = client.post("/v1/datasets", files={"file": ("train.jsonl", ROWS)}, headers=headers)
        assert up.status_code == 201, up.text
        other_tenants_job = _completed_job(client, other)
        client.headers.update(headers)
        yield Server(client, headers, tunery_env, done_job=_completed_job(client, headers),
                     other_tenants_job=other_tenants_job, dataset=up.json()["id"])


@pytest.fixture(scope="module", autouse=True)
def report_count() -> Iterator[None]:
    yield
    print(f"\nhostile inputs tried: {len(TRIED)}")


def assert_error_shape(response: httpx.Response, label: str) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), label
    body = response.json()
    assert set(body) == {"error"}, (label, body)
    error = body["error"]
    assert set(error) == {"code", "message", "fields"}, (label, body)
    assert isinstance(error["code"], str) and re.fullmatch(r"[a-z_]+", error["code"]), label
    assert isinstance(error["message"], str) and error["message"], label
    assert isinstance(error["fields"], list), label
    for item in error["fields"]:
        assert set(item) == {"path", "message"}, (label, item)
    assert "Traceback" not in response.text and 'File "' not in response.text, label
    return error


def run(server: Server, probes: list[Probe]) -> None:
    """Send every probe and check its answer; then the server must still be up."""
    problems = []
    for probe in probes:
        TRIED.append(probe.label)
        response = probe.send(server.client)
        if response.status_code not in probe.statuses:
            problems.append(f"{probe.label}: {response.status_code} {response.text[:300]}")
            continue
        error = assert_error_shape(response, probe.label)
        if response.status_code == 422:
            assert error["fields"], probe.label
        if probe.field is not None and response.status_code == 422:
            paths = [f["path"] for f in error["fields"]]
            if not any(p == probe.field or p.startswith(probe.field + ".") for p in paths):
                problems.append(f"{probe.label}: 422 names {paths}, not {probe.field}")
    assert not problems, f"{len(problems)} of {len(probes)} wrong:\n" + "\n".join(problems)
    assert server.client.get("/healthz").json() == {"status": "ok"}


def with_value(path: str, value: Any, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid payload with the field at dotted `path` set to `value`."""
    body = copy.deepcopy(payload or make_payload())
    *parents, leaf = path.split(".")
    node = body
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return body


def submit_with(path: str, value: Any) -> Callable[[TestClient], httpx.Response]:
    return lambda c: c.post(SUBMIT, json=with_value(path, value))


# ---------------------------------------------------------------- templates

TEMPLATES = ["{instruction.__class__}", "{instruction[0]}", "{0}", "{instruction!r}",
             "{instruction:>10}", "{}", "{instruction.__init__.__globals__}",
             "{output.__class__.__mro__[1].__subclasses__()}", "{instruction", "instruction}",
             "no placeholder at all"]


def test_template_attribute_access_and_format_tricks_are_refused(server: Server) -> None:
    probes = []
    for template in TEMPLATES:
        probes.append(Probe(f"submit template {template!r}",
                            lambda c, t=template: server.post(
                                SUBMIT, with_value("data_config.prompt_template", t)),
                            field="data_config.prompt_template"))
        probes.append(Probe(f"preview template {template!r}",
                            lambda c, t=template: server.post(
                                f"/v1/datasets/{server.dataset}/preview",
                                {"prompt_template": t}),
                            field="prompt_template"))
    run(server, probes)


# ---------------------------------------------------------------- path traversal

TRAVERSALS = ["../x", "../../../../etc/passwd", "%2e%2e%2fx", "%2e%2e/%2e%2e/etc/passwd",
              "..%2f..%2fetc%2fpasswd", "/etc/passwd", "//etc/passwd", "x#y", "x;y",
              "..\\..\\x", "..\\x", "....//x", "x/../../y", ".", "..", "x\x00y", "%00",
              "x%00y", "~/x", "C:\\Windows\\win.ini"]
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def url_forms(name: str) -> list[str]:
    """`name` as a URL path segment two ways: fully percent-encoded (the app decodes it back to
    `name`, slashes and dots included, which a client's own URL normalization would otherwise
    remove) and with its own %-escapes left for the app to decode ('%2e%2e%2f' arrives as
    '../')."""
    encoded = quote(name, safe="").replace(".", "%2E")
    raw = quote(name, safe="/%")
    if {".", ".."} & set(raw.split("/")):
        return [encoded]  # the client would resolve the dot segments before sending
    return list(dict.fromkeys([encoded, raw]))


def test_traversal_in_artifact_names_ids_and_resume_paths_is_refused(server: Server) -> None:
    probes = []
    # Another tenant's artifact, reached by climbing out of the caller's job directory.
    escapes = [f"../{server.other_tenants_job}/adapter_config.json",
               f"..%2F{server.other_tenants_job}%2Fadapter_config.json",
               f"checkpoints/../../{server.other_tenants_job}/adapter_config.json"]
    for name in [*TRAVERSALS, *escapes]:
        for segment in url_forms(name):
            artifact = f"/v1/finetune/llm/{server.done_job}/artifacts/{segment}"
            probes.append(Probe(f"artifact {segment!r}",
                                lambda c, u=artifact: c.get(u, headers=server.headers),
                                statuses=(404,)))
            for template in ("/v1/finetune/llm/{}", "/v1/finetune/llm/{}/logs",
                             "/v1/finetune/llm/{}/artifacts", "/v1/deploy/status/{}",
                             "/v1/datasets/{}"):
                url = template.format(segment)
                probes.append(Probe(f"id {segment!r} in {template}",
                                    lambda c, u=url: c.get(u, headers=server.headers),
                                    statuses=(404, 422)))
            probes.append(Probe(f"upload id {segment!r}",
                                lambda c, s=segment: c.put(f"/v1/upload/{s}?token=t",
                                                           content=b"x"),
                                statuses=(403, 404, 422)))
        probes.append(Probe(f"terminate {name!r}",
                            lambda c, n=name: server.post("/v1/deploy/terminate",
                                                          {"deployment_id": n}),
                            statuses=(404, 422)))
        probes.append(Probe(f"resume {name!r}",
                            lambda c, n=name: server.post(SUBMIT, with_value(
                                "pretrainedmodel_config.resume_checkpoint_path", f"jobs/{n}")),
                            field="pretrainedmodel_config.resume_checkpoint_path"))
        probes.append(Probe(f"resume checkpoint {name!r}",
                            lambda c, n=name: server.post(SUBMIT, with_value(
                                "pretrainedmodel_config.resume_checkpoint_path",
                                f"jobs/{server.done_job}/checkpoints/{n}")),
                            field="pretrainedmodel_config.resume_checkpoint_path"))
        probes.append(Probe(f"data_path ds_{name!r}",
                            lambda c, n=name: server.post(SUBMIT, with_value(
                                "data_config.data_path", f"ds_{n}")),
                            field="data_config.data_path"))
    run(server, probes)


def test_traversal_in_uploaded_file_names_stays_inside_the_dataset_directory(
    server: Server,
) -> None:
    root = server.data_dir / "storage"
    before = {p for p in server.data_dir.parent.rglob("*") if p.is_file()}
    stored = []
    for name in TRAVERSALS:
        TRIED.append(f"upload file name {name!r}")
        response = server.client.post("/v1/datasets", files={"file": (name, ROWS,
                                                                      "application/jsonl")},
                                      headers=server.headers)
        assert response.status_code == 201, (name, response.text)
        stored.append(response.json())
        TRIED.append(f"upload flow file name {name!r}")
        handed = server.client.get("/v1/upload", params={"filename": name},
                                   headers=server.headers)
        assert handed.status_code == 200, (name, handed.text)
        put = server.client.put(handed.json()["upload_url"], content=ROWS,
                                headers={"Content-Type": "application/jsonl"})
        assert put.status_code == 200, (name, put.text)
        stored.append(put.json())
    for dataset in stored:
        assert SAFE_NAME.fullmatch(dataset["name"]) and not dataset["name"].startswith("."), \
            dataset["name"]
    created = {p for p in server.data_dir.parent.rglob("*") if p.is_file()} - before
    outside = [p for p in created
               if not p.resolve().is_relative_to((root / "datasets").resolve())
               and p.suffix not in (".db", ".db-journal", ".db-wal", ".db-shm")]
    assert not outside, outside
    for path in created:
        if path.is_relative_to(root / "datasets"):
            dataset_id, file_name = path.relative_to(root / "datasets").parts
            assert dataset_id.startswith("ds_") and SAFE_NAME.fullmatch(file_name), path
    assert server.client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- big and deep

TEN_MB = "x" * (10 * 1024 * 1024)


def _ten_megabyte_probes(server: Server, big_status: tuple[int, ...]) -> list[Probe]:
    probes = []
    for path in ("data_config.prompt_template", "data_config.data_path",
                 "pretrainedmodel_config.model_path", "logging_config.wandb_run_name",
                 "hf_config.hf_token", "user_session_token"):
        probes.append(Probe(f"10 MB {path}", submit_with(path, "{a}" + TEN_MB),
                            statuses=big_status, field=path))
    probes.append(Probe("10 MB deployment_id",
                        lambda c: server.post("/v1/deploy/terminate", {"deployment_id": TEN_MB}),
                        statuses=big_status, field="deployment_id"))
    probes.append(Probe("10 MB preview template",
                        lambda c: server.post(f"/v1/datasets/{server.dataset}/preview",
                                              {"prompt_template": "{output}" + TEN_MB}),
                        statuses=big_status, field="prompt_template"))
    probes.append(Probe("10 MB Idempotency-Key",
                        lambda c: c.post(SUBMIT, json=make_payload(),
                                         headers={**server.headers,
                                                  "Idempotency-Key": TEN_MB[:60_000]}),
                        statuses=(413, 422, 431)))
    # The test client refuses longer URLs; servers in front (uvicorn, proxies) cap them lower.
    probes.append(Probe("60 kB query filename",
                        lambda c: c.get("/v1/upload", params={"filename": TEN_MB[:60_000]},
                                        headers=server.headers),
                        statuses=(414, 422)))
    return probes


def test_ten_megabyte_strings_are_refused_by_the_body_limit(server: Server) -> None:
    run(server, _ten_megabyte_probes(server, big_status=(413,)))


def test_ten_megabyte_strings_are_refused_by_the_field_limits_when_the_body_limit_allows(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _app(tunery_env, monkeypatch, TUNERY_MAX_REQUEST_BYTES=str(64 * 1024**2)) as client:
        headers = {"Authorization": f"Bearer {new_key('hostile')}"}
        up = client.post("/v1/datasets", files={"file": ("train.jsonl", ROWS)}, headers=headers)
        server = Server(client, headers, tunery_env, dataset=up.json()["id"])
        client.headers.update(headers)
        run(server, _ten_megabyte_probes(server, big_status=(422,)))


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_deeply_nested_json_is_refused(server: Server) -> None:
    probes = []
    for depth in (10_000, 100_000):
        for route in (SUBMIT, "/v1/deploy/terminate", f"/v1/datasets/{server.dataset}/preview"):
            for text in (_nested(depth), _nested_object(depth)):
                probes.append(Probe(f"{depth} levels at the top of {route}",
                                    lambda c, r=route, t=text: server.post_raw(r, t),
                                    field="body"))
        inner = json.dumps(with_value("data_config.data_split_config", "__HOSTILE__")).replace(
            '"__HOSTILE__"', _nested_object(depth))
        probes.append(Probe(f"{depth} levels in data_split_config",
                            lambda c, t=inner: server.post_raw(SUBMIT, t), field="body"))
    for text in (b"\xff\xfe{}", b'{"a":', b"{not json", b"[1, 2,]", b'{"a": 1}{"b": 2}'):
        probes.append(Probe(f"malformed body {text!r}",
                            lambda c, t=text: server.post_raw(SUBMIT, t), field="body"))
    for depth in (100, 500):  # shallow enough for the parser: the schema must refuse it
        for path in ("data_config.data_split_config", "pretrainedmodel_config.lora_target_modules",
                     "data_config.prompt_template", "training_config.learning_rate"):
            value = json.loads(_nested(depth))
            probes.append(Probe(f"{depth} levels in {path}", submit_with(path, value),
                                field=path))
    run(server, probes)


# ---------------------------------------------------------------- wrong types

SAMPLES: dict[str, Any] = {"string": "x", "integer": 7, "number": 1.5, "boolean": True,
                           "null": None, "array": ["x"], "object": {"x": 1}}


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _json_types(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    """The JSON types a schema node accepts ('integer' included in 'number')."""
    node = _resolve(schema, node)
    types: set[str] = set()
    for option in node.get("anyOf", []) + node.get("oneOf", []):
        types |= _json_types(schema, option)
    declared = node.get("type")
    if declared:
        types |= set(declared) if isinstance(declared, list) else {declared}
    for value in node.get("enum", []) + ([node["const"]] if "const" in node else []):
        types.add({str: "string", bool: "boolean", int: "integer", float: "number",
                   type(None): "null"}[type(value)])
    if "number" in types:
        types.add("integer")
    return types


def leaf_fields(schema: dict[str, Any], node: dict[str, Any],
                prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(dotted path, accepted JSON types) for every field, objects included, from OpenAPI."""
    node = _resolve(schema, node)
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path, _json_types(schema, child)
        if "properties" in _resolve(schema, child):
            yield from leaf_fields(schema, child, path + ".")


def wrong_type_probes(server: Server, schema: dict[str, Any], component: str,
                      send: Callable[[str, Any], Callable[[TestClient], httpx.Response]],
                      ) -> list[Probe]:
    probes = []
    for path, accepted in leaf_fields(schema, {"$ref": f"#/components/schemas/{component}"}):
        assert accepted, f"{component}.{path} has no JSON type in the schema"
        for json_type, sample in SAMPLES.items():
            if json_type not in accepted:
                probes.append(Probe(f"{component}.{path} = {json_type}", send(path, sample),
                                    field=path))
    return probes


def test_a_wrong_json_type_in_every_field_is_a_422_naming_it(server: Server) -> None:
    schema = server.client.get("/openapi.json").json()
    probes = wrong_type_probes(server, schema, "FinetuneRequest", submit_with)
    probes += wrong_type_probes(
        server, schema, "TerminateIn",
        lambda p, v: lambda c: server.post("/v1/deploy/terminate",
                                           with_value(p, v, {"deployment_id": "x"})))
    probes += wrong_type_probes(
        server, schema, "DeployRequest",
        lambda p, v: lambda c: server.post("/v1/deploy/llm",
                                           with_value(p, v, {"loramodel_path": server.done_job})))
    probes += wrong_type_probes(
        server, schema, "PreviewIn",
        lambda p, v: lambda c: server.post(f"/v1/datasets/{server.dataset}/preview",
                                           with_value(p, v, {"prompt_template": "{output}"})))
    for json_type, sample in SAMPLES.items():
        if json_type != "object":
            probes.append(Probe(f"submit body = {json_type}",
                                lambda c, s=sample: server.post(SUBMIT, s), field="body"))
    for name, value in (("limit", "x"), ("limit", "1.5"), ("offset", "-1"), ("limit", "")):
        for route in (SUBMIT, "/v1/deploy/list", "/v1/datasets"):
            probes.append(Probe(f"{route}?{name}={value!r}",
                                lambda c, r=route, n=name, v=value: c.get(
                                    r, params={n: v}, headers=server.headers), field=name))
    probes.append(Probe("n_lines=x", lambda c: c.get(
        f"/v1/finetune/llm/{server.done_job}/logs", params={"n_lines": "x"},
        headers=server.headers), field="n_lines"))
    assert len(probes) > 100
    run(server, probes)


# ---------------------------------------------------------------- numbers

HUGE = [10**20, -(10**20), 2**63, 2**64, 10**300, -(10**300)]


def _number_fields(server: Server) -> list[str]:
    schema = server.client.get("/openapi.json").json()
    return [path for path, types in
            leaf_fields(schema, {"$ref": "#/components/schemas/FinetuneRequest"})
            if types & {"integer", "number"}]


def test_huge_integers_are_refused(server: Server) -> None:
    probes = []
    for path in _number_fields(server):
        for value in HUGE:
            probes.append(Probe(f"{path} = {str(value)[:12]}…", submit_with(path, value),
                                field=path))
        digits = json.dumps(with_value(path, "__HOSTILE__")).replace('"__HOSTILE__"', "9" * 5000)
        probes.append(Probe(f"{path} = 5000 digits",
                            lambda c, b=digits: server.post_raw(SUBMIT, b), field="body"))
    for value in HUGE:
        probes.append(Probe(f"split train = {str(value)[:12]}…",
                            submit_with("data_config.data_split_config", {"train": value}),
                            field="data_config.data_split_config"))
        probes.append(Probe(f"preview n = {str(value)[:12]}…",
                            lambda c, v=value: server.post(
                                f"/v1/datasets/{server.dataset}/preview",
                                {"prompt_template": "{output}", "n": v}), field="n"))
        for route, name in ((SUBMIT, "limit"), (SUBMIT, "offset"), ("/v1/datasets", "limit"),
                            (f"/v1/finetune/llm/{server.done_job}/logs", "n_lines")):
            probes.append(Probe(f"{route}?{name}={str(value)[:12]}…",
                                lambda c, r=route, n=name, v=value: c.get(
                                    r, params={n: str(v)}, headers=server.headers), field=name))
    run(server, probes)


def test_nan_and_infinity_are_refused(server: Server) -> None:
    probes = []
    targets = [*_number_fields(server), "data_config.data_split_config.train",
               "data_config.data_split_config.validation"]
    for path in targets:
        for literal in ("NaN", "Infinity", "-Infinity"):
            marker = "__HOSTILE__"
            body = json.dumps(with_value(path, marker)).replace(f'"{marker}"', literal)
            probes.append(Probe(f"{path} = {literal}",
                                lambda c, b=body: server.post_raw(SUBMIT, b),
                                field=path.removesuffix(".train").removesuffix(".validation")))
    for literal in ("NaN", "Infinity"):
        probes.append(Probe(f"preview n = {literal}", lambda c, lit=literal: server.post_raw(
            f"/v1/datasets/{server.dataset}/preview",
            f'{{"prompt_template": "{{output}}", "n": {lit}}}'), field="n"))
    for literal in ("nan", "inf", "-inf", "1e999"):
        probes.append(Probe(f"limit={literal}", lambda c, lit=literal: c.get(
            SUBMIT, params={"limit": lit}, headers=server.headers), field="limit"))
    run(server, probes)


# ---------------------------------------------------------------- NUL characters


def _string_fields(server: Server) -> list[str]:
    schema = server.client.get("/openapi.json").json()
    return [path for path, types in
            leaf_fields(schema, {"$ref": "#/components/schemas/FinetuneRequest"})
            if "string" in types]


def test_nul_characters_are_refused(server: Server) -> None:
    probes = []
    base = make_payload()
    for path in _string_fields(server):
        node: Any = base
        for name in path.split("."):
            node = node.get(name, "") if isinstance(node, dict) else ""
        current = node if isinstance(node, str) and node else "x"
        for value in (current + "\x00", "\x00" + current, current[:1] + "\x00" + current[1:]):
            probes.append(Probe(f"{path} = {value!r}", submit_with(path, value), field=path))
    probes.append(Probe("lora_target_modules with NUL",
                        submit_with("pretrainedmodel_config.lora_target_modules", ["q\x00proj"]),
                        field="pretrainedmodel_config.lora_target_modules"))
    probes.append(Probe("split name with NUL",
                        submit_with("data_config.data_split_config", {"train\x00": 0.9}),
                        field="data_config.data_split_config"))
    probes.append(Probe("preview template with NUL", lambda c: server.post(
        f"/v1/datasets/{server.dataset}/preview", {"prompt_template": "{output}\x00"}),
        field="prompt_template"))
    probes.append(Probe("terminate id with NUL", lambda c: server.post(
        "/v1/deploy/terminate", {"deployment_id": f"{server.done_job}\x00"}),
        statuses=(404, 422)))
    run(server, probes)


# ---------------------------------------------------------------- OpenAI's training files


def _chat(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}"}]}


def _deep(levels: int) -> str:
    """A JSON array nested `levels` deep, as text: json.dumps would recurse that deep."""
    return "[" * levels + '"x"' + "]" * levels


# Each hostile line goes after 11 good ones, as line 12 of the training file.
HOSTILE_LINES: list[tuple[str, str]] = [
    ("messages 10,000 levels deep", '{"messages": ' + _deep(10_000) + "}"),
    ("content 10,000 levels deep", '{"messages": [{"role": "user", "content": '
     + _deep(10_000) + '}, {"role": "assistant", "content": "a"}]}'),
    ("unknown role", json.dumps({"messages": [
        {"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]})),
    ("NUL bytes in content", json.dumps({"messages": [
        {"role": "user", "content": "q\x00q"}, {"role": "assistant", "content": "a"}]})),
    ("NUL bytes in a key", json.dumps({"messages": [
        {"role": "user", "content": "q", "na\x00me": "x"},
        {"role": "assistant", "content": "a"}]})),
    ("weight 7", json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 7}]})),
    ("weight on a user message", json.dumps({"messages": [
        {"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]})),
    ("no assistant message", json.dumps({"messages": [{"role": "user", "content": "q"}]})),
    ("unknown top-level key", json.dumps({**_chat(0), "foo": 1})),
    ("messages is a string", json.dumps({"messages": "hello"})),
    ("a preference line in a chat file", json.dumps({
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}]})),
    ("not JSON", "{\"messages\": ["),
    ("a JSON number", "7"),
]


def test_hostile_openai_training_files_are_refused_or_fail_their_job_naming_the_line(
        server: Server) -> None:
    """Every hostile line is either refused at upload (400 or 413 in OpenAI's shape) or makes
    the job that names the file `failed` with `invalid_training_file` and the line; the server
    stays up, and nothing is a 500."""
    client, table, problems = server.client, [], []
    good = "".join(json.dumps(_chat(i)) + "\n" for i in range(11))
    hundred_mb = json.dumps({"messages": [
        {"role": "user", "content": "x" * (100 * 1024**2)}, {"role": "assistant", "content": "a"}]})
    for label, line in [*HOSTILE_LINES, ("a 100 MB single line", hundred_mb)]:
        TRIED.append(f"openai file: {label}")
        content = (good + line + "\n").encode()
        up = client.post("/v1/files", files={"file": ("train.jsonl", content)},
                         data={"purpose": "fine-tune"})
        if up.status_code != 200:
            error = up.json().get("error", {})
            outcome = f"upload {up.status_code}: {error.get('message', '')[:90]}"
            if up.status_code not in (400, 413) or set(error) != {
                    "message", "type", "param", "code"}:
                problems.append(f"{label}: {outcome}")
            elif up.status_code == 400 and "12" not in error["message"]:
                problems.append(f"{label}: the refusal does not name line 12: {outcome}")
            table.append((label, outcome))
            continue
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "training_file": up.json()["id"]})
        body = job.json()
        outcome = f"job {body.get('status')}: {(body.get('error') or {}).get('message', '')[:90]}"
        if job.status_code != 200 or body["status"] != "failed" or body["error"]["code"] != (
                "invalid_training_file") or "line 12" not in body["error"]["message"]:
            problems.append(f"{label}: {job.status_code} {outcome}")
        table.append((label, outcome))
    print("\n".join(f"{label:38} {outcome}" for label, outcome in table))
    assert not problems, "\n".join(problems)
    assert client.get("/healthz").json() == {"status": "ok"}
