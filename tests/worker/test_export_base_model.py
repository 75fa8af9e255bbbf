"""The exported adapter names its base as the user did: `adapter_config.json`'s
`base_model_name_or_path` is the submitted model_path, a hub id their machine can load, or the
local path they gave, never the directory the worker resolved it to. Real jobs on the tiny
model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from tests.worker.test_base_cache import fake_hub_cache
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

HUB_ID = "tunery-tests/tiny-llama"
# A few steps are enough: only the exported config is looked at.
FEW_ROWS = {"data_split_config": {"train": 0.01, "validation": 0.01}}


def exported_base(output_dir: Path) -> Any:
    return json.loads((output_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_an_adapter_trained_on_a_hub_model_names_the_hub_id_and_loads_from_it(
    tmp_path: Path, tiny_model_dir: Path, make_request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants
    from peft import AutoPeftModelForCausalLM

    # Offline, the hub cache answers for the hub, for the worker and for the user alike.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", tiny_model_dir, HUB_ID, "c" * 40)
    request = make_request(model={"model_path": HUB_ID}, data=FEW_ROWS)
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[DATASET_PATH.parent])

    result = run_job(request, tmp_path / "work", RecordingReporter(), settings)

    assert exported_base(result.output_dir) == HUB_ID
    # What a user does with the downloaded folder: peft finds the base by that name.
    loaded = AutoPeftModelForCausalLM.from_pretrained(result.output_dir)
    assert loaded.peft_config["default"].base_model_name_or_path == HUB_ID


def test_an_adapter_trained_on_a_local_model_names_the_path_as_the_user_gave_it(
    tmp_path: Path, tiny_model_dir: Path, make_request: Any
) -> None:
    # The operator's models directory is a link to where the files really lie; the user knows
    # the path the operator published, not where it resolves on the worker.
    published = tmp_path / "models"
    published.symlink_to(tiny_model_dir.parent, target_is_directory=True)
    given = f"{published}/{tiny_model_dir.name}"
    request = make_request(model={"model_path": given}, data=FEW_ROWS)
    settings = Settings(data_dir=tmp_path / "data",
                        allowed_local_dirs=[tiny_model_dir.parent, DATASET_PATH.parent])

    result = run_job(request, tmp_path / "work", RecordingReporter(), settings)

    assert exported_base(result.output_dir) == given != str(tiny_model_dir.resolve())
