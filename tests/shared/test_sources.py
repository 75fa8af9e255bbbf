"""Classifying data_path / model_path values: local, https URL, hub id, or refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.sources import (
    Source,
    SourceError,
    SourceKind,
    check_source_type,
    check_url_source_resolves,
    classify_source,
)
from shared.url_guard import UrlPolicy


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    return root


def test_absolute_path_inside_an_allowed_dir_is_local(allowed: Path) -> None:
    source = classify_source(str(allowed / "sub" / "train.jsonl"), [allowed])

    assert source.kind == "local"
    assert source.path == (allowed / "sub" / "train.jsonl").resolve()


def test_path_outside_the_allowed_dirs_is_refused(allowed: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="outside the directories") as info:
        classify_source(str(tmp_path / "other.jsonl"), [allowed])

    # The message names the setting, never the server's directories.
    assert "TUNERY_ALLOWED_LOCAL_DIRS" in str(info.value)
    assert str(allowed) not in str(info.value)


def test_dotdot_escape_from_an_allowed_dir_is_refused(allowed: Path) -> None:
    with pytest.raises(SourceError, match="outside"):
        classify_source(f"{allowed}/../secret.jsonl", [allowed])


def test_symlink_pointing_outside_an_allowed_dir_is_refused(allowed: Path, tmp_path: Path) -> None:
    target = tmp_path / "secret.jsonl"
    target.write_text("{}\n")
    (allowed / "link.jsonl").symlink_to(target)

    with pytest.raises(SourceError, match="outside") as info:
        classify_source(str(allowed / "link.jsonl"), [allowed])

    assert str(target) not in str(info.value)


def test_a_sibling_dir_sharing_the_prefix_is_not_inside(allowed: Path) -> None:
    sibling = allowed.parent / (allowed.name + "-evil")

    with pytest.raises(SourceError, match="outside"):
        classify_source(str(sibling / "x.jsonl"), [allowed])


def test_local_paths_are_refused_when_no_dir_is_allowed(allowed: Path) -> None:
    with pytest.raises(SourceError, match="not allowed on this server"):
        classify_source(str(allowed / "x.jsonl"), [])


@pytest.mark.parametrize("value", ["./train.jsonl", "../train.jsonl", "~/train.jsonl", "."])
def test_relative_paths_are_refused(value: str, allowed: Path) -> None:
    with pytest.raises(SourceError, match="must be absolute"):
        classify_source(value, [allowed])


def test_https_url_is_a_url() -> None:
    url = "https://bucket.s3.amazonaws.com/train.jsonl?X-Amz-Signature=abc"

    assert classify_source(url, []).kind == "url"


@pytest.mark.parametrize(
    "value",
    [
        "http://example.com/train.jsonl",
        "file:///etc/passwd",
        "file:/etc/passwd",
        "s3://bucket/train.jsonl",
        "ftp://example.com/train.jsonl",
    ],
)
def test_non_https_schemes_are_refused(value: str) -> None:
    with pytest.raises(SourceError):
        classify_source(value, [Path("/")])


def test_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(SourceError, match="credentials") as info:
        classify_source("https://user:hunter2@example.com/x.jsonl", [])

    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["https://example.com/train.jsonl\r\nX-Injected: 1",
                                 "https://example.com/tr\tain.jsonl",
                                 "https://example.com/train.jsonl\x00"])
def test_a_dataset_url_with_a_control_character_is_refused(url: str) -> None:
    with pytest.raises(SourceError, match="control character or whitespace"):
        classify_source(url, [])


def test_urls_can_be_refused_where_only_models_are_meant() -> None:
    with pytest.raises(SourceError, match="not allowed here"):
        classify_source("https://example.com/model", [], allow_urls=False)


@pytest.mark.parametrize(
    "value",
    ["tatsu-lab/alpaca", "HuggingFaceTB/SmolLM2-135M-Instruct", "a_b/c.d-e",
     "a" * 96 + "/" + "b" * 96, "ds_notanid/x"],
)
def test_hub_ids_are_hub(value: str) -> None:
    assert classify_source(value, []) == Source("hub", value)


@pytest.mark.parametrize("value", ["gpt2", "ds_notanid", "ds_" + "a" * 32 + "0"])
def test_bare_hub_names_are_hub_ids_only_where_allowed(value: str) -> None:
    assert classify_source(value, [], bare_hub_names=True) == Source("hub", value)


@pytest.mark.parametrize("value", ["text", "json", "csv", "parquet", "arrow", "imagefolder",
                                   "alpaca"])
def test_a_bare_name_is_no_hub_dataset(value: str) -> None:
    # datasets.load_dataset("text") is a packaged builder reading files under the current
    # directory, not a hub dataset.
    with pytest.raises(SourceError, match="hub datasets are named 'owner/name'") as info:
        classify_source(value, [])

    assert "TUNERY_ALLOWED_LOCAL_DIRS" in str(info.value)
    assert "POST /v1/datasets" in str(info.value)


@pytest.mark.parametrize(
    "value",
    ["a/b/c", "-lead/x", "org/-lead", "org/.hidden", "org/x.", "org/x-", "a--b/c", "a/b..c",
     "..", "../x", "a" * 97, "org/" + "b" * 97, "org/", "owner/..", "a b", "ünïcode/x",
     "x;rm -rf", "org/na me", "org//x", ""],
)
def test_bad_hub_ids_are_refused(value: str) -> None:
    with pytest.raises(SourceError):
        classify_source(value, [])


def test_uploaded_dataset_ids_are_datasets() -> None:
    assert classify_source("ds_" + "0f" * 16, []).kind == "dataset"


def test_plain_http_urls_are_urls_only_where_the_policy_allows_them() -> None:
    url = "http://minio:9000/tunery/train.jsonl"

    assert classify_source(url, [], url_policy=UrlPolicy(allow_http=True)).kind == "url"
    with pytest.raises(SourceError, match="only https"):
        classify_source(url, [])


def test_model_urls_stay_refused_whatever_the_policy() -> None:
    with pytest.raises(SourceError, match="not allowed here"):
        classify_source("http://minio/m", [], allow_urls=False,
                        url_policy=UrlPolicy(allow_http=True))


def test_a_metadata_ip_literal_is_refused_without_dns() -> None:
    with pytest.raises(SourceError, match="cloud metadata"):
        classify_source("https://169.254.169.254/latest/meta-data/?sig=x", [])


def test_resolution_errors_show_the_redacted_url() -> None:
    with pytest.raises(SourceError) as info:
        check_url_source_resolves("https://localhost/x.jsonl?X-Amz-Signature=secret", UrlPolicy())

    assert str(info.value).startswith("'https://localhost/x.jsonl?…': host localhost")
    assert "secret" not in str(info.value)


def test_importing_sources_does_not_import_torch() -> None:
    code = "import sys, shared.sources; print('torch' in sys.modules)"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "False"


def test_a_data_value_shaped_like_an_upload_id_is_a_dataset_that_does_not_exist() -> None:
    with pytest.raises(SourceError, match="^no dataset with id ds_doesnotexist: "):
        classify_source("ds_doesnotexist", [])


@pytest.mark.parametrize(("kind", "value"), [("hub", "owner/name"),
                                           ("local", "/data/train.jsonl")])
def test_presigned_link_type_refuses_hub_ids_and_local_files(kind: SourceKind, value: str) -> None:
    with pytest.raises(SourceError, match="'s3_presigned_link' needs an https URL"):
        check_source_type(Source(kind, value), "s3_presigned_link")
    check_source_type(Source(kind, value), "hub_link")
    check_source_type(Source("dataset", "ds_" + "0" * 32), "s3_presigned_link")
