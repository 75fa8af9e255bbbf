"""Each training and LoRA field of the payload reaches the object that acts on it.

The behaviour tests in test_run.py train; these check the mapping itself, one field at a time,
so that a field silently dropped between the request and transformers / peft fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.schema import PretrainedModelConfig, TrainingConfig
from worker.pipeline.model import load_model
from worker.pipeline.training_args import training_arguments


def args_for(tmp_path: Path, **fields: Any) -> Any:
    return training_arguments(TrainingConfig(**fields), output_dir=tmp_path, has_validation=True,
                              quantized=False)


@pytest.mark.parametrize(
    ("field", "value", "attribute", "expected"),
    [
        ("num_train_epochs", 0.25, "num_train_epochs", 0.25),
        ("gradient_accumulation_steps", 3, "gradient_accumulation_steps", 3),
        ("warmup_steps", 7, "warmup_steps", 7),
        ("learning_rate", 3e-4, "learning_rate", 3e-4),
        ("lr_scheduler_type", "cosine_with_restarts", "lr_scheduler_type",
         "cosine_with_restarts"),
        ("group_by_length", True, "train_sampling_strategy", "group_by_length"),
        ("neftune_noise_alpha", 5.0, "neftune_noise_alpha", 5.0),
    ],
)
def test_training_field_reaches_the_trainer_arguments(
    tmp_path: Path, field: str, value: Any, attribute: str, expected: Any
) -> None:
    default = getattr(args_for(tmp_path), attribute)
    chosen = getattr(args_for(tmp_path, **{field: value}), attribute)
    # Enum-valued arguments (schedulers, sampling strategies) compare by their value.
    assert getattr(chosen, "value", chosen) == expected
    assert getattr(default, "value", default) != expected



@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_patience_reaches_the_early_stopping_callback(patience: int) -> None:
    from transformers import EarlyStoppingCallback

    from worker.pipeline.callbacks import TrainingWatch
    from worker.pipeline.report import RecordingReporter

    watch = TrainingWatch(
        RecordingReporter(), TrainingConfig(early_stopping_patience=patience), has_validation=True
    )

    (early_stopping,) = [c for c in watch.callbacks if isinstance(c, EarlyStoppingCallback)]
    assert early_stopping.early_stopping_patience == patience


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU worker trains in bf16 or fp16")
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize(
    ("dtype", "mixed"), [(torch.float32, (False, False)), (torch.bfloat16, (True, False))]
)
def test_cpu_training_arguments_follow_the_dtype_the_base_was_loaded_in(
    tmp_path: Path, quantized: bool, dtype: torch.dtype, mixed: tuple[bool, bool]
) -> None:
    # The worker's own machine decides (`compute_dtype`): the request has no precision field.
    args = training_arguments(TrainingConfig(), output_dir=tmp_path, has_validation=True,
                              quantized=quantized, dtype=dtype)

    assert (args.bf16, args.fp16, args.use_cpu) == (*mixed, True)
    assert args.device.type == "cpu"


@pytest.mark.parametrize(
    ("field", "value", "attribute"),
    [("lora_r", 4, "r"), ("lora_alpha", 32, "lora_alpha"), ("lora_dropout", 0.3, "lora_dropout"),
     ("lora_bias", "all", "bias")],
)
def test_lora_field_reaches_the_peft_config(
    tiny_model_dir: Path, field: str, value: Any, attribute: str
) -> None:
    config = PretrainedModelConfig(model_path=str(tiny_model_dir), **{field: value})
    model = load_model(str(tiny_model_dir), config, allowed_local_dirs=[tiny_model_dir])
    assert getattr(model.peft_config["default"], attribute) == value


def test_lora_dropout_makes_training_forwards_stochastic(tiny_model_dir: Path) -> None:
    config = PretrainedModelConfig(model_path=str(tiny_model_dir), lora_dropout=0.5)
    # fp32: the forwards below run outside the Trainer's autocast.
    model = load_model(str(tiny_model_dir), config, allowed_local_dirs=[tiny_model_dir],
                       cpu_bf16="off")
    # LoRA B starts at zero, so dropout on the adapter path only shows once B is non-zero.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model.train()
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(("subset", "expected"), [("default", None), ("en", "en"), (None, None)])
def test_data_subset_reaches_the_hub_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subset: str | None, expected: str | None
) -> None:
    # The hub is the edge this machine cannot reach: datasets.load_dataset is replaced by a
    # stand-in that records its arguments and returns a real in-memory Dataset.
    import datasets

    from shared.schema import DataConfig
    from worker.pipeline.data_source import load_dataset

    calls: list[tuple[str, str | None, str | None]] = []

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        calls.append((path, name, kwargs.get("token")))
        return datasets.DatasetDict(
            {"train": datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    config = DataConfig(data_path="org/some-dataset", data_subset=subset)
    loaded = load_dataset(config.data_path, allowed_local_dirs=[], download_dir=tmp_path,
                          subset=config.data_subset, token="hf_x")
    assert calls == [("org/some-dataset", expected, "hf_x")]
    assert loaded.columns == ["instruction", "output"]
