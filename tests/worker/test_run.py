"""run_job end to end on the tiny model: a few real training steps per test."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.schema import LR_SCHEDULERS, TrainingConfig
from shared.settings import Settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.report import PHASES, RecordingReporter
from worker.pipeline.run import TrainResult, run_job
from worker.pipeline.train import training_arguments

LOG_LINE = re.compile(
    r"epoch \d+ \| step \d+/\d+ \| loss \d+\.\d{4} \| lr \d\.\de[-+]\d\d \| \d+ tok/s"
)


@dataclass
class Job:
    result: TrainResult
    reporter: RecordingReporter


@pytest.fixture(scope="module")
def lora_job(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> Job:
    tmp = tmp_path_factory.mktemp("lora-job")
    settings = Settings(
        data_dir=tmp / "data", allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent]
    )
    reporter = RecordingReporter()
    result = run_job(make_request(), tmp / "work", reporter, settings)
    return Job(result, reporter)


def test_lora_job_lowers_training_and_validation_loss(lora_job: Job) -> None:
    result, reporter = lora_job.result, lora_job.reporter

    assert (result.steps, result.train_rows, result.eval_rows) == (6, 24, 12)
    assert result.first_loss == reporter.values("loss")[0]
    assert result.last_loss == reporter.values("loss")[-1]
    assert result.last_loss < result.first_loss
    eval_losses = reporter.values("eval_loss")
    assert len(eval_losses) >= 2 and eval_losses[-1] < eval_losses[0]


def test_lora_job_output_holds_only_adapter_and_tokenizer_files(lora_job: Job) -> None:
    names = {p.name for p in lora_job.result.output_dir.iterdir()}

    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert names <= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }


def test_exported_adapter_loads_with_peft_and_changes_the_output(
    lora_job: Job, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = lora_job.result.output_dir
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer("### Instruction: What is 2 + 2?\n### Response: ", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, output_dir)
        adapted_logits = adapted(**inputs).logits

    assert (adapted_logits - base_logits).abs().max() > 1e-2


def test_reporter_gets_phases_metrics_log_lines_and_progress(lora_job: Job) -> None:
    reporter = lora_job.reporter

    assert reporter.phases == ["loading_data", "loading_model", "training"]
    assert set(reporter.phases) <= set(PHASES)
    assert reporter.steps("loss") == [1, 2, 3, 4, 5, 6]
    first = next(values for _, values in reporter.metrics if "loss" in values)
    assert set(first) == {"epoch", "loss", "learning_rate", "tokens_per_s", "grad_norm"}
    assert all(v > 0 for v in reporter.values("tokens_per_s"))
    train_lines = [line for line in reporter.lines if "| loss " in line]
    assert len(train_lines) == 6 and all(LOG_LINE.fullmatch(line) for line in train_lines)
    assert train_lines[0].startswith("epoch 1 | step 1/6 | loss ")
    assert any(
        re.fullmatch(r"epoch 1 \| step 6/6 \| eval_loss \d+\.\d{4}", x) for x in reporter.lines
    )
    assert any("24 train, 12 validation" in line for line in reporter.lines)
    assert reporter.fractions[-1] == 1.0 and reporter.fractions == sorted(reporter.fractions)
    # should_stop() is polled after every optimizer step (and between stages).
    assert reporter.polls >= 6


def test_gradient_checkpointing_job_with_accumulation_trains_without_validation(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(
        model={"use_gradient_checkpointing": True},
        data={"data_split_config": {"train": 0.08, "validation": 0.0}},
        training={
            "gradient_accumulation_steps": 2,
            "lr_scheduler_type": "constant",
            "group_by_length": True,
            "num_train_epochs": 2,
        },
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    # 24 rows / batch 4 = 6 micro-batches = 3 optimizer steps per epoch.
    assert (result.steps, result.eval_rows) == (6, 0)
    assert reporter.values("eval_loss") == []
    assert any("evaluation and early stopping are disabled" in x for x in reporter.lines)
    assert any("gradient checkpointing on" in x for x in reporter.lines)
    assert result.last_loss is not None and result.first_loss is not None
    assert result.last_loss < result.first_loss


def test_qlora_job_trains_on_cpu_through_in_training_evaluation(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(model={"use_quantization": True})
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert any("4-bit NF4" in line for line in reporter.lines)
    # An evaluation ran before training (the first no-grad forward of the 4-bit layers) and
    # after every step; training kept improving after each of them.
    assert reporter.steps("eval_loss") == [0, 1, 2, 3, 4, 5, 6]
    eval_losses = reporter.values("eval_loss")
    # (step 1 trains at the warm-up's learning rate of 0, so only later steps can improve)
    assert eval_losses[-1] < eval_losses[2] < eval_losses[0]
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_cancel_stops_training_within_one_step(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    # The user cancels while step 2 is being reported; the poll after step 3 at the latest
    # must stop training.
    reporter = RecordingReporter(stop_after_step=2)

    with pytest.raises(TrainingStopped) as info:
        run_job(make_request(), tmp_path / "work", reporter, settings)

    assert info.value.reason == "cancelled"
    assert info.value.step is not None and info.value.step <= 3
    assert max(step for step, _ in reporter.metrics) == info.value.step
    assert not (tmp_path / "work" / "output").exists()


def test_cancel_during_data_loading_stops_before_the_model_loads(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    reporter = RecordingReporter()
    reporter.request_stop("cancelled")

    with pytest.raises(TrainingStopped, match="cancelled"):
        run_job(make_request(), tmp_path / "work", reporter, settings)

    assert reporter.phases == ["loading_data"]


def test_early_stopping_ends_training_when_eval_loss_stops_improving(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    # A learning rate this high makes the loss diverge after the first steps.
    request = make_request(
        training={
            "learning_rate": 0.9,
            "lr_scheduler_type": "constant",
            "early_stopping_patience": 1,
            "num_train_epochs": 4,
        }
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert result.steps < 24
    assert any(line.startswith("early stopping at step") for line in reporter.lines)


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_every_lr_scheduler_builds_with_the_trainer(
    scheduler: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, Trainer

    config = TrainingConfig(lr_scheduler_type=scheduler, warmup_steps=2)
    args = training_arguments(config, output_dir=tmp_path, has_validation=True, quantized=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}]
    trainer = Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples)

    trainer.create_optimizer_and_scheduler(num_training_steps=10)

    assert trainer.lr_scheduler is not None
    if scheduler == "reduce_lr_on_plateau":
        assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        assert args.metric_for_best_model == "eval_loss"


def test_trained_adapter_answers_in_the_dataset_house_style(
    tmp_path: Path, settings: Settings, make_request: Any, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.assets.generate import generate_answer

    request = make_request(
        model={"lora_r": 16, "lora_alpha": 32},
        data={"data_split_config": {"train": 0.9, "validation": 0.1}},
        training={"learning_rate": 0.05, "lr_scheduler_type": "cosine", "warmup_steps": 5},
    )
    result = run_job(request, tmp_path / "work", RecordingReporter(), settings)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    questions = ["What is the capital of Peru?", "What is 12 + 30?", "Convert 3 hours to minutes."]

    before = [generate_answer(base, tokenizer, q, max_new_tokens=8) for q in questions]
    adapted = PeftModel.from_pretrained(base, result.output_dir)
    after = [generate_answer(adapted, tokenizer, q, max_new_tokens=8) for q in questions]

    # A 2-layer random model learns the style's first word in 68 steps, not whole answers.
    assert not any(answer.startswith("Answer") for answer in before), before
    assert all(answer.startswith("Answer") for answer in after), after
