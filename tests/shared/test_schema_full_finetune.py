"""pretrainedmodel_config.use_lora false: full fine-tuning, and what it is refused with."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.schema import FinetuneRequest
from tests.conftest import make_payload


def full_finetune(**sections: dict[str, Any]) -> dict[str, Any]:
    payload = make_payload(**sections)
    payload["pretrainedmodel_config"]["use_lora"] = False
    return payload


def test_use_lora_false_is_accepted() -> None:
    request = FinetuneRequest.model_validate(full_finetune())
    assert request.pretrainedmodel_config.use_lora is False


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("pretrainedmodel_config", {"use_quantization": True}, "use_quantization"),
        ("pretrainedmodel_config", {"resume_checkpoint_path": "jobs/" + "a" * 32},
         "resume_checkpoint_path"),
        ("training_config", {"preference_optimization": "DPO"}, "preference_optimization"),
        ("training_config", {"preference_optimization": "ORPO"}, "preference_optimization"),
        ("training_config", {"devices": 2, "strategy": "fsdp"}, "strategy 'fsdp'"),
    ],
)
def test_full_finetune_refuses_what_needs_an_adapter(
    section: str, values: dict[str, Any], named: str
) -> None:
    payload = full_finetune()
    payload[section].update(values)
    with pytest.raises(ValidationError, match="use_lora false") as info:
        FinetuneRequest.model_validate(payload)
    assert named in str(info.value)
    payload["pretrainedmodel_config"]["use_lora"] = True
    FinetuneRequest.model_validate(payload)
