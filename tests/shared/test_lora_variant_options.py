"""The LoRA variant options (use_dora, use_rslora, lora_init): their defaults, and the
combinations refused at submit with a 422 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.schema import FinetuneRequest
from tests.conftest import make_payload


def model_errors(**model: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        FinetuneRequest.model_validate(make_payload(pretrainedmodel_config=model))
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in info.value.errors()}


def test_left_out_the_options_train_plain_lora() -> None:
    config = FinetuneRequest.model_validate(make_payload()).pretrainedmodel_config
    assert (config.use_dora, config.use_rslora, config.lora_init) == (False, False, "default")


@pytest.mark.parametrize("model", [
    {"use_rslora": True, "lora_init": "pissa"},
    {"lora_init": "olora"},
    {"lora_init": "gaussian", "use_quantization": True},
    {"lora_init": "loftq", "use_quantization": True, "use_dora": True},
    {"use_dora": True, "use_quantization": True},
])
def test_valid_combinations_are_accepted(model: dict[str, Any]) -> None:
    config = FinetuneRequest.model_validate(
        make_payload(pretrainedmodel_config=model)).pretrainedmodel_config
    assert config.model_dump(include=set(model)) == model


def test_loftq_without_a_4bit_base_is_refused_naming_lora_init() -> None:
    errors = model_errors(lora_init="loftq")
    assert list(errors) == ["pretrainedmodel_config.lora_init"]
    assert "use_quantization true" in errors["pretrainedmodel_config.lora_init"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_rewriting_init_on_a_4bit_base_is_refused(init: str) -> None:
    errors = model_errors(lora_init=init, use_quantization=True)
    assert list(errors) == ["pretrainedmodel_config.lora_init"]
    assert "use_quantization" in errors["pretrainedmodel_config.lora_init"]


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_an_init_beside_resume_checkpoint_path_is_refused(init: str) -> None:
    errors = model_errors(lora_init=init, resume_checkpoint_path="job-abc")
    assert list(errors) == ["pretrainedmodel_config.lora_init"]
    assert "resume_checkpoint_path" in errors["pretrainedmodel_config.lora_init"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_with_a_base_rewriting_init_is_refused_naming_both(init: str) -> None:
    errors = model_errors(lora_init=init, use_dora=True)
    assert list(errors) == ["pretrainedmodel_config.lora_init"]
    assert "use_dora" in errors["pretrainedmodel_config.lora_init"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dpo_with_a_base_rewriting_init_is_refused_naming_both(init: str) -> None:
    payload = make_payload(pretrainedmodel_config={"lora_init": init},
                           training_config={"preference_optimization": "DPO"})
    with pytest.raises(ValidationError) as info:
        FinetuneRequest.model_validate(payload)
    message = str(info.value)
    assert "lora_init" in message and "preference_optimization 'DPO'" in message
    orpo = make_payload(pretrainedmodel_config={"lora_init": init},
                        training_config={"preference_optimization": "ORPO"})
    assert FinetuneRequest.model_validate(orpo).pretrainedmodel_config.lora_init == init


def test_an_unknown_init_is_refused() -> None:
    assert "pretrainedmodel_config.lora_init" in model_errors(lora_init="corda")
