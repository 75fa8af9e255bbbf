"""What a job may read from local directories: only files that, as opened, lie inside the
allowed directories; links inside an allowed directory cannot lead out of it, and refusals
name the file as the user gave it, never its target."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from shared import local_files
from shared.schema import PretrainedModelConfig
from worker.pipeline.base_cache import base_key
from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError
from worker.pipeline.model import load_model, load_tokenizer, opened_model_source

ROWS = [{"instruction": "2 + 2?", "input": "", "output": "4"}]
SECRET = "gAAAAAB-not-a-real-fernet-key-but-secret"


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed dir, secret file outside it)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "data" / "secret.key"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    return allowed, secret


def _write_rows(path: Path) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))


def _load(data_path: Path, allowed: Path, tmp_path: Path) -> None:
    load_dataset(str(data_path), allowed_local_dirs=[allowed], download_dir=tmp_path / "dl")


@pytest.mark.parametrize("link_name", ["a_k.csv", "a.jsonl"])
def test_a_link_in_a_data_directory_leading_outside_is_refused_by_its_name(
    layout: tuple[Path, Path], tmp_path: Path, link_name: str
) -> None:
    allowed, secret = layout
    data_dir = allowed / "set"
    data_dir.mkdir()
    _write_rows(data_dir / "0.jsonl")
    (data_dir / link_name).symlink_to(secret)

    with pytest.raises(PipelineError) as info:
        _load(data_dir, allowed, tmp_path)

    message = str(info.value)
    assert f"{data_dir}/{link_name}" in message
    assert "outside the directories this server allows" in message
    assert SECRET not in message and str(secret) not in message


def test_a_link_in_a_data_directory_to_etc_passwd_is_refused(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    allowed, _ = layout
    (allowed / "a.csv").symlink_to("/etc/passwd")

    with pytest.raises(PipelineError, match="a.csv' leads outside") as info:
        _load(allowed, allowed, tmp_path)

    assert "/etc/passwd" not in str(info.value)


def test_links_that_stay_inside_the_allowed_dirs_are_read(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    allowed, _ = layout
    _write_rows(allowed / "real.jsonl")
    (allowed / "set").mkdir()
    (allowed / "set" / "linked.jsonl").symlink_to(allowed / "real.jsonl")

    dataset = load_dataset(str(allowed / "set"), allowed_local_dirs=[allowed],
                           download_dir=tmp_path / "dl")

    assert list(dataset.rows) == ROWS


def test_a_file_swapped_for_a_link_after_it_was_opened_is_still_the_checked_file(
    layout: tuple[Path, Path],
) -> None:
    # Checking by path and then opening by path would read whatever the path names at the
    # second moment; the verified descriptor keeps the file that was checked.
    allowed, secret = layout
    (allowed / "config.json").write_text('{"ok": true}')

    opened = local_files.open_tree(allowed, [allowed], shown=str(allowed), recursive=True)
    with opened as tree, local_files.linked_view(tree) as view:
        os.unlink(allowed / "config.json")
        (allowed / "config.json").symlink_to(secret)

        assert (view / "config.json").read_text() == '{"ok": true}'


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "allowed" / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_a_model_directory_with_a_tokenizer_linked_outside_is_refused(
    layout: tuple[Path, Path], model_copy: Path
) -> None:
    allowed, secret = layout
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "tokenizer.json").symlink_to(secret)

    with pytest.raises(PipelineError) as info:
        load_tokenizer(str(model_copy), allowed_local_dirs=[allowed])

    message = str(info.value)
    assert f"{model_copy}/tokenizer.json' leads outside" in message
    assert SECRET not in message and str(secret) not in message


def test_a_model_directory_with_weights_linked_outside_is_refused_for_key_and_load(
    layout: tuple[Path, Path], model_copy: Path
) -> None:
    allowed, _ = layout
    outside = allowed.parent / "elsewhere"
    outside.mkdir()
    (model_copy / "model.safetensors").rename(outside / "model.safetensors")
    (model_copy / "model.safetensors").symlink_to(outside / "model.safetensors")
    config = PretrainedModelConfig(model_path=str(model_copy))

    with pytest.raises(PipelineError, match="model.safetensors' leads outside"):
        load_model(str(model_copy), config, allowed_local_dirs=[allowed], cpu_bf16="off")
    with pytest.raises(PipelineError, match="model.safetensors' leads outside"):
        base_key(str(model_copy), config, allowed_local_dirs=[allowed])


def test_a_model_directory_inside_the_allowed_dirs_loads_through_its_verified_view(
    model_copy: Path,
) -> None:
    allowed = model_copy.parent
    config = PretrainedModelConfig(model_path=str(model_copy))

    with opened_model_source(str(model_copy), [allowed]) as source:
        view = Path(source.load_from)
        assert os.readlink(view / "config.json").startswith("/proc/self/fd/")
    model = load_model(str(model_copy), config, allowed_local_dirs=[allowed], cpu_bf16="off")

    assert not view.exists()  # the private view goes with the job's load
    # The adapter records its base by the directory the user named, resolved.
    assert model.peft_config["default"].base_model_name_or_path == str(model_copy.resolve())
    key = base_key(str(model_copy), config, allowed_local_dirs=[allowed])
    (model_copy / "generation_config.json").write_text("{}")
    assert base_key(str(model_copy), config, allowed_local_dirs=[allowed]) != key
