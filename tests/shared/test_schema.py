"""The MonsterAPI payload schema: every field, its default and bounds, and unknown fields."""

from __future__ import annotations

from typing import Any

import pytest
from monsterapi import LLM_config as monster
from pydantic import BaseModel, ValidationError

from shared.schema import FinetuneRequest, TemplateError, template_placeholders
from tests.conftest import make_payload

SECTIONS = {
    "pretrainedmodel_config": monster.PretrainedModelConfig,
    "data_config": monster.DataConfig,
    "training_config": monster.TrainingConfig,
    "logging_config": monster.LoggingConfig,
    "hf_config": monster.HuggingfaceConfig,
}


def error_paths(payload: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        FinetuneRequest.model_validate(payload)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def ours(section: str) -> type[BaseModel]:
    return FinetuneRequest.model_fields[section].annotation  # type: ignore[return-value]


@pytest.mark.parametrize("section", SECTIONS)
def test_every_monsterapi_client_field_exists_with_the_same_default(section: str) -> None:
    theirs = SECTIONS[section].model_fields
    mine = ours(section).model_fields
    assert set(theirs) == set(mine)
    for name, field in theirs.items():
        if name in ("data_split_config",):
            continue
        assert mine[name].get_default(call_default_factory=True) == field.get_default(
            call_default_factory=True
        ), name
    assert set(monster.LLMServiceParams.model_fields) == set(FinetuneRequest.model_fields)


def test_client_defaults_for_optional_sections_validate() -> None:
    defaults = {s: m().model_dump() for s, m in SECTIONS.items()}
    defaults["user_session_token"] = None
    request = FinetuneRequest.model_validate(defaults)
    assert request.data_config.data_split_config == {"train": 0.9, "validation": 0.1}
    assert request.training_config.lr_scheduler_type == "reduce_lr_on_plateau"


def test_empty_sections_take_monsterapi_defaults() -> None:
    request = FinetuneRequest.model_validate(
        {
            "pretrainedmodel_config": {},
            "data_config": {},
            "training_config": {},
            "logging_config": {},
        }
    )
    assert request.pretrainedmodel_config.lora_r == 8
    assert request.pretrainedmodel_config.lora_alpha == 16
    assert request.data_config.cutoff_len == 512
    assert request.training_config.warmup_steps == 50
    assert request.training_config.learning_rate == 0.001
    assert request.hf_config.hf_token is None


@pytest.mark.parametrize(
    "section", ["pretrainedmodel_config", "data_config", "training_config", "logging_config"]
)
def test_required_sections_are_required(section: str) -> None:
    payload = make_payload()
    del payload[section]
    assert error_paths(payload) == [section]


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("pretrainedmodel_config", "lora_rank"),
        ("data_config", "cutoff_length"),
        ("training_config", "epochs"),
        ("logging_config", "wandb_key"),
        (None, "trainig_config"),
    ],
)
def test_unknown_fields_are_refused_by_path(section: str | None, field: str) -> None:
    payload = make_payload()
    (payload[section] if section else payload)[field] = 1
    assert error_paths(payload) == [f"{section}.{field}" if section else field]


@pytest.mark.parametrize(
    ("section", "field", "bad", "good"),
    [
        ("pretrainedmodel_config", "lora_r", 0, 1),
        ("pretrainedmodel_config", "lora_r", 2048, 2047),
        ("pretrainedmodel_config", "lora_alpha", 0, 2047),
        ("pretrainedmodel_config", "lora_dropout", -0.1, 0.0),
        ("pretrainedmodel_config", "lora_dropout", 1.01, 1.0),
        ("pretrainedmodel_config", "lora_bias", "some", "lora_only"),
        ("pretrainedmodel_config", "parallelization", "ddp", "nmp"),
        ("pretrainedmodel_config", "model_path", "", "org/model"),
        ("data_config", "data_source_type", "ftp", "s3_presigned_link"),
        ("data_config", "cutoff_len", 0, 1),
        ("data_config", "cutoff_len", 32769, 32768),
        ("training_config", "early_stopping_patience", 0, 1),
        ("training_config", "num_train_epochs", 0, 0.5),
        ("training_config", "gradient_accumulation_steps", 1000, 999),
        ("training_config", "warmup_steps", 0, 1),
        ("training_config", "learning_rate", 1, 0.5),
        ("training_config", "learning_rate", 0, 1e-6),
        ("training_config", "lr_scheduler_type", "step", "cosine_with_restarts"),
        ("training_config", "preference_optimization", "DPO", "DONT"),
    ],
)
def test_bounds_name_the_field(section: str, field: str, bad: Any, good: Any) -> None:
    assert error_paths(make_payload(**{section: {field: bad}})) == [f"{section}.{field}"]
    FinetuneRequest.model_validate(make_payload(**{section: {field: good}}))


@pytest.mark.parametrize(
    "scheduler",
    [
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "reduce_lr_on_plateau",
    ],
)
def test_all_eight_schedulers_are_accepted(scheduler: str) -> None:
    request = FinetuneRequest.model_validate(
        make_payload(training_config={"lr_scheduler_type": scheduler})
    )
    assert request.training_config.lr_scheduler_type == scheduler


def test_num_train_epochs_is_a_float() -> None:
    payload = make_payload(training_config={"num_train_epochs": 0.25})
    request = FinetuneRequest.model_validate(payload)
    assert request.training_config.num_train_epochs == 0.25


@pytest.mark.parametrize(
    ("given", "stored"), [("default", None), (None, None), ("", None), ("en", "en")]
)
def test_data_subset_default_means_no_subset(given: str | None, stored: str | None) -> None:
    request = FinetuneRequest.model_validate(make_payload(data_config={"data_subset": given}))
    assert request.data_config.data_subset == stored


@pytest.mark.parametrize(
    "split",
    [
        {"train": 0.9, "validation": 0.2},
        {"train": -0.1, "validation": 0.1},
        {"train": 0.5, "test": 0.5},
        {"train": 0.0, "validation": 0.5},
        {"train": 1.5},
    ],
)
def test_bad_split_ratios_are_refused(split: dict[str, float]) -> None:
    assert error_paths(make_payload(data_config={"data_split_config": split})) == [
        "data_config.data_split_config"
    ]


def test_validation_split_of_zero_needs_a_scheduler_without_plateau() -> None:
    no_eval = {"data_split_config": {"train": 1.0, "validation": 0.0}}
    with pytest.raises(ValidationError, match="needs a validation split"):
        FinetuneRequest.model_validate(make_payload(data_config=no_eval))
    request = FinetuneRequest.model_validate(
        make_payload(data_config=no_eval, training_config={"lr_scheduler_type": "cosine"})
    )
    assert request.data_config.data_split_config == {"train": 1.0, "validation": 0.0}


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("pretrainedmodel_config", "use_lora", False, "full fine-tuning is not supported"),
        ("pretrainedmodel_config", "resume_checkpoint_path", "jobs/x", "not supported yet"),
        ("training_config", "preference_optimization", "ORPO", "ORPO is not supported"),
        ("logging_config", "use_wandb", True, "Weights & Biases"),
        ("hf_config", "hf_model_path", "me/adapter", "pushing to the hub"),
    ],
)
def test_options_not_honoured_yet_are_refused_with_a_reason(
    section: str, field: str, value: Any, message: str
) -> None:
    payload = make_payload()
    payload.setdefault(section, {})[field] = value
    with pytest.raises(ValidationError, match=message) as info:
        FinetuneRequest.model_validate(payload)
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [f"{section}.{field}"]


@pytest.mark.parametrize(
    "template",
    [
        "{0}",
        "{a.b}",
        "{a[0]}",
        "{a!r}",
        "{a:>10}",
        "{}",
        "no placeholders",
        "{a",
        "a}",
        "{__class__.__mro__}",
        "{instruction.__globals__}",
    ],
)
def test_unsafe_or_empty_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        template_placeholders(template)
    assert error_paths(make_payload(data_config={"prompt_template": template})) == [
        "data_config.prompt_template"
    ]


def test_template_placeholders_are_bare_names_in_order() -> None:
    assert template_placeholders("Q: {question}\n{{literal}}\nA: {answer}") == [
        "question",
        "answer",
    ]


def test_secrets_are_masked_when_echoed() -> None:
    payload = make_payload(logging_config={"wandb_login_key": "wb-secret"})
    payload["hf_config"] = {"hf_token": "hf_secret"}
    payload["user_session_token"] = "session-secret"
    shown = FinetuneRequest.model_validate(payload).redacted()
    assert "secret" not in repr(shown)
    assert shown["hf_config"]["hf_token"] == "***"
