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
    assert set(theirs) <= set(mine)
    # Our extra fields are extensions, documented as such in the OpenAPI schema.
    for name in set(mine) - set(theirs):
        assert (mine[name].description or "").startswith("Tunery extension"), name
    for name, field in theirs.items():
        # group_by_length: left out, the worker batches by length (README, "Differences from
        # MonsterAPI"); MonsterAPI's false, when sent, still means random batches.
        if name in ("data_split_config", "group_by_length"):
            continue
        assert mine[name].get_default(call_default_factory=True) == field.get_default(
            call_default_factory=True
        ), name
    assert set(monster.LLMServiceParams.model_fields) == set(FinetuneRequest.model_fields)


def test_group_by_length_left_out_is_the_workers_choice_and_false_is_kept() -> None:
    omitted = make_payload()
    del omitted["training_config"]["group_by_length"]
    assert FinetuneRequest.model_validate(omitted).training_config.group_by_length is None
    assert FinetuneRequest.model_validate(make_payload()).training_config.group_by_length is False


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
        ("training_config", "preference_optimization", "KTO", "DONT"),
        ("training_config", "micro_batch_size", 0, 1),
        ("training_config", "micro_batch_size", 65, 64),
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


def test_tunery_extensions_default_to_monsterapi_behaviour() -> None:
    request = FinetuneRequest.model_validate(make_payload())
    assert request.data_config.train_on_inputs is False
    assert request.pretrainedmodel_config.lora_target_modules is None


def test_use_wandb_is_accepted_with_a_project_and_refused_naming_the_project_without() -> None:
    logging = {"use_wandb": True, "wandb_project": "my-project", "wandb_login_key": "k"}
    request = FinetuneRequest.model_validate(make_payload(logging_config=logging))
    assert request.logging_config.use_wandb

    with pytest.raises(ValidationError, match="use_wandb needs a wandb_project") as info:
        FinetuneRequest.model_validate(make_payload(logging_config={"use_wandb": True}))
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [
        "logging_config.wandb_project"
    ]
    # Without use_wandb, an empty project is MonsterAPI's default and fine.
    FinetuneRequest.model_validate(make_payload(logging_config={"use_wandb": False}))


def test_hf_model_path_is_accepted_with_a_token_and_refused_naming_hf_token_without() -> None:
    payload = make_payload()
    payload["hf_config"] = {"hf_model_path": "me/adapter", "hf_token": "hf_x"}
    assert FinetuneRequest.model_validate(payload).hf_config.hf_model_path == "me/adapter"

    payload["hf_config"] = {"hf_model_path": "me/adapter"}
    assert error_paths(payload) == ["hf_config.hf_token"]
    with pytest.raises(ValidationError, match="hf_model_path needs an hf_token"):
        FinetuneRequest.model_validate(payload)


@pytest.mark.parametrize("repo", ["https://huggingface.co/me/x", "me/x/y", "me /x", "/x"])
def test_hf_model_path_must_be_a_repo_id(repo: str) -> None:
    payload = make_payload()
    payload["hf_config"] = {"hf_model_path": repo, "hf_token": "hf_x"}
    assert error_paths(payload) == ["hf_config.hf_model_path"]


@pytest.mark.parametrize(
    ("modules", "ok"),
    [
        (["q_proj", "v_proj"], True),
        (["self_attn.q_proj"], True),
        ([], False),
        (["q_proj", ".*proj"], False),
        (["q proj"], False),
        (["q_proj;rm"], False),
        (["1st"], False),
    ],
)
def test_lora_target_modules_must_be_layer_names(modules: list[str], ok: bool) -> None:
    payload = make_payload(pretrainedmodel_config={"lora_target_modules": modules})
    if ok:
        request = FinetuneRequest.model_validate(payload)
        assert request.pretrainedmodel_config.lora_target_modules == modules
    else:
        assert error_paths(payload) == ["pretrainedmodel_config.lora_target_modules"]


def test_train_on_inputs_is_accepted() -> None:
    request = FinetuneRequest.model_validate(make_payload(data_config={"train_on_inputs": True}))
    assert request.data_config.train_on_inputs is True


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("3f6c1e0a-2b7d-4c1e-9a57-0d2b8c1f4e21", True),
        ("jobs/3f6c1e0a-2b7d-4c1e-9a57-0d2b8c1f4e21", True),
        ("jobs/3f6c1e0a-2b7d-4c1e-9a57-0d2b8c1f4e21/checkpoints/step-50", True),
        ("jobs/abc/", True),
        ("s3://bucket/jobs/abc", False),
        ("https://example.com/adapter", False),
        ("/data/storage/jobs/abc", False),
        ("jobs/../other", False),
        ("jobs/abc/checkpoints/step-0", False),
        ("jobs/abc/checkpoints/step-5/optimizer.pt", False),
        ("jobs/abc/adapter_model.safetensors", False),
        ("abc/checkpoints/step-5", False),
    ],
)
def test_resume_checkpoint_path_names_a_tunery_job_or_its_checkpoint(value: str, ok: bool) -> None:
    payload = make_payload(pretrainedmodel_config={"resume_checkpoint_path": value})
    if ok:
        FinetuneRequest.model_validate(payload)
        return
    with pytest.raises(ValidationError, match="name an earlier job of yours") as info:
        FinetuneRequest.model_validate(payload)
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [
        "pretrainedmodel_config.resume_checkpoint_path"
    ]


@pytest.mark.parametrize("method", ["ORPO", "DPO"])
def test_orpo_and_dpo_are_accepted_with_or_without_beta(method: str) -> None:
    payload = make_payload(training_config={"preference_optimization": method})
    request = FinetuneRequest.model_validate(payload)
    assert request.training_config.preference_optimization == method
    assert request.training_config.beta is None
    payload["training_config"]["beta"] = 0.25
    assert FinetuneRequest.model_validate(payload).training_config.beta == 0.25


@pytest.mark.parametrize("beta", [0, -0.1, 10.5, True])
def test_beta_out_of_range_is_refused_naming_it(beta: Any) -> None:
    payload = make_payload(training_config={"preference_optimization": "DPO", "beta": beta})
    assert error_paths(payload) == ["training_config.beta"]


def test_beta_without_preference_optimization_is_refused_saying_where_it_applies() -> None:
    payload = make_payload(training_config={"beta": 0.1})
    with pytest.raises(ValidationError, match="beta applies to preference_optimization 'DPO' "
                       "or 'ORPO' only") as info:
        FinetuneRequest.model_validate(payload)
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == ["training_config.beta"]


@pytest.mark.parametrize("token", ["hf_\x80abc", "hf abc", "hf_ä"])
def test_an_hf_token_that_no_http_header_can_carry_is_refused_naming_it(token: str) -> None:
    payload = make_payload("HuggingFaceTB/SmolLM2-135M-Instruct")
    payload["hf_config"] = {"hf_token": token}

    with pytest.raises(ValidationError) as caught:
        FinetuneRequest.model_validate(payload)

    error = caught.value.errors()[0]
    assert error["loc"] == ("hf_config", "hf_token")
    assert "printable ASCII" in error["msg"]


@pytest.mark.parametrize(("bad", "good"), [(-1, 0), (2**31, 2**31 - 1), (True, 1), (1.5, 7)])
def test_seed_is_an_integer_in_range_or_null(bad: Any, good: Any) -> None:
    assert error_paths(make_payload(training_config={"seed": bad})) == ["training_config.seed"]
    request = FinetuneRequest.model_validate(make_payload(training_config={"seed": good}))
    assert request.training_config.seed == good
    assert FinetuneRequest.model_validate(make_payload()).training_config.seed is None


VALIDATION_ID = "ds_" + "a" * 32


def test_a_validation_dataset_replaces_the_split_and_satisfies_reduce_lr_on_plateau() -> None:
    payload = make_payload(data_config={"validation_data_path": f" {VALIDATION_ID} "})
    assert payload["training_config"]["lr_scheduler_type"] == "reduce_lr_on_plateau"

    data = FinetuneRequest.model_validate(payload).data_config

    assert data.validation_data_path == VALIDATION_ID
    assert data.data_split_config == {"train": 1.0, "validation": 0.0}
    assert data.has_validation


@pytest.mark.parametrize(("split", "kept"), [
    ({"train": 0.5}, {"train": 0.5, "validation": 0.0}),
    ({"train": 0.5, "validation": 0.0}, {"train": 0.5, "validation": 0.0}),
    ({}, {"train": 0.9, "validation": 0.0}),
])
def test_beside_a_validation_dataset_the_split_keeps_its_train_fraction(
    split: dict[str, float], kept: dict[str, float]
) -> None:
    payload = make_payload(data_config={"validation_data_path": VALIDATION_ID,
                                        "data_split_config": split})
    assert FinetuneRequest.model_validate(payload).data_config.data_split_config == kept


def test_a_validation_fraction_beside_a_validation_dataset_is_refused_naming_the_split() -> None:
    payload = make_payload(data_config={"validation_data_path": VALIDATION_ID,
                                        "data_split_config": {"train": 0.9, "validation": 0.1}})
    assert error_paths(payload) == ["data_config.data_split_config"]


@pytest.mark.parametrize("value", ["tatsu-lab/alpaca", "ds_abc", "/data/val.jsonl",
                                   "https://example.com/val.jsonl", ""])
def test_validation_data_path_takes_uploaded_dataset_ids_only(value: str) -> None:
    payload = make_payload(data_config={"validation_data_path": value})
    assert error_paths(payload) == ["data_config.validation_data_path"]


def test_without_any_validation_reduce_lr_on_plateau_names_both_ways_to_get_one() -> None:
    payload = make_payload(data_config={"data_split_config": {"train": 1.0}})
    with pytest.raises(ValidationError, match="data_config.validation_data_path"):
        FinetuneRequest.model_validate(payload)


@pytest.mark.parametrize("alpha", [0, -1.0, 100.5, True, "loud"])
def test_neftune_noise_alpha_out_of_range_is_refused_naming_it(alpha: Any) -> None:
    payload = make_payload(training_config={"neftune_noise_alpha": alpha})
    assert error_paths(payload) == ["training_config.neftune_noise_alpha"]


@pytest.mark.parametrize("alpha", [None, 0.1, 5, 100])
def test_neftune_noise_alpha_is_a_positive_number_or_null(alpha: float | None) -> None:
    payload = make_payload(training_config={"neftune_noise_alpha": alpha})
    assert FinetuneRequest.model_validate(payload).training_config.neftune_noise_alpha == alpha


@pytest.mark.parametrize("method", ["ORPO", "DPO"])
def test_neftune_with_preference_optimization_is_refused_naming_both(method: str) -> None:
    payload = make_payload(training_config={"preference_optimization": method,
                                            "neftune_noise_alpha": 5})
    with pytest.raises(ValidationError, match="neftune_noise_alpha applies to supervised "
                       f"fine-tuning only, not to preference_optimization '{method}'") as info:
        FinetuneRequest.model_validate(payload)
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [
        "training_config.neftune_noise_alpha"]
