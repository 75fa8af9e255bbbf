"""run_job end to end on the tiny model: a few real training steps per test."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.schema import LR_SCHEDULERS, TrainingConfig
from shared.settings import Settings
from shared.storage import LocalStorage
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.batching import PadToLongest
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.examples import split
from worker.pipeline.model import attention_implementation, compute_dtype
from worker.pipeline.report import PHASES, RecordingReporter
from worker.pipeline.run import TrainResult, render_and_tokenize, run_job
from worker.pipeline.trainer import TuneryTrainer
from worker.pipeline.training_args import training_arguments
from worker.publish import publish_outputs

LOG_LINE = re.compile(
    r"epoch \d+ \| step \d+/\d+ \(\d+%\) \| loss \d+\.\d{4} \| mean_token_accuracy "
    r"[01]\.\d{4} \| lr \d\.\de[-+]\d\d \| "
    r"\d+ tok/s \| eta (–|\d+s|\d+m\d\ds|\d+h\d\dm)"
)
WANDB_KEY = "wandb-key-" + "k" * 30
WANDB_ENTITY = "tiny-team"
WANDB_VARIABLES = ("WANDB_ENTITY", "WANDB_API_KEY", "WANDB_PROJECT")
HF_TOKEN = "hf_secret_token"


@dataclass
class Job:
    result: TrainResult
    reporter: RecordingReporter
    work_dir: Path
    hub_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    # The W&B variables as transformers' WandbCallback saw them when training began.
    wandb_env_at_train_begin: dict[str, str | None] = field(default_factory=dict)


@pytest.fixture(scope="module")
def lora_job(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> Iterator[Job]:
    """One LoRA job that also reports to W&B and pushes to the hub.

    The edges are replaced: W&B runs offline (its servers are never reached; the run is
    written to disk), and the two HfApi methods that would call the hub record their
    arguments instead. transformers' W&B integration is only watched: its on_train_begin
    records the environment, then runs as it would.
    """
    from huggingface_hub import HfApi
    from transformers.integrations import WandbCallback

    tmp = tmp_path_factory.mktemp("lora-job")
    settings = Settings(
        data_dir=tmp / "data", allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent]
    )
    request = make_request(
        logging={
            "use_wandb": True,
            "wandb_project": "tunery-tests",
            "wandb_run_name": "tiny-lora",
            "wandb_login_key": WANDB_KEY,
            "wandb_username": WANDB_ENTITY,
        },
        hf={"hf_model_path": "me/tiny-adapter", "hf_token": HF_TOKEN},
    )
    job = Job(None, RecordingReporter(), tmp / "work")  # type: ignore[arg-type]

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> None:
        job.hub_calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self: Any, **kwargs: Any) -> Any:
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        job.hub_calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": "https://huggingface.co/me/tiny-adapter/commit/1"})

    wandb_on_train_begin = WandbCallback.on_train_begin

    def watch_wandb_on_train_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen = {name: os.environ.get(name) for name in WANDB_VARIABLES}
        job.wandb_env_at_train_begin.update(seen)
        return wandb_on_train_begin(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "upload_folder", upload_folder)
        patch.setattr(WandbCallback, "on_train_begin", watch_wandb_on_train_begin)
        job.result = run_job(request, job.work_dir, job.reporter, settings)
        # The pipeline leaves the adapter on disk; the attempt publishes it.
        job.uploaded = publish_outputs(
            "lora-job", job.result.output_dir, request.hf_config, LocalStorage(tmp / "storage"),
            should_stop=job.reporter.should_stop, log=job.reporter.log,
        )
        yield job


def test_lora_job_lowers_training_and_validation_loss(lora_job: Job) -> None:
    result, reporter = lora_job.result, lora_job.reporter

    assert (result.steps, result.train_rows, result.eval_rows) == (6, 24, 12)
    assert result.first_loss == reporter.values("loss")[0]
    assert result.last_loss == reporter.values("loss")[-1]
    assert result.last_loss < result.first_loss
    eval_losses = reporter.values("eval_loss")
    assert len(eval_losses) >= 2 and eval_losses[-1] < eval_losses[0]


def test_lora_job_reports_train_and_validation_token_accuracy(lora_job: Job) -> None:
    reporter = lora_job.reporter

    assert reporter.steps("mean_token_accuracy") == reporter.steps("loss")
    assert reporter.steps("eval_mean_token_accuracy") == reporter.steps("eval_loss")
    accuracies = reporter.values("mean_token_accuracy") + reporter.values(
        "eval_mean_token_accuracy")
    assert all(0.0 <= value <= 1.0 for value in accuracies)
    # The tiny model learns the sample's answers: some of its predictions become right.
    assert max(accuracies) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU worker trains in bf16 or fp16")
@pytest.mark.parametrize(
    ("cpu_bf16", "loaded"),
    [("off", "base model loaded in torch.float32"),
     ("on", "base model loaded in torch.bfloat16, mixed precision")],
)
def test_lora_job_trains_in_either_cpu_precision(
    tmp_path: Path, settings: Settings, make_request: Any, cpu_bf16: str, loaded: str
) -> None:
    # "on" emulates bf16 where the CPU lacks the instructions: slow, but the same training.
    reporter = RecordingReporter()

    result = run_job(make_request(), tmp_path / "work", reporter,
                     settings.model_copy(update={
                         "training": settings.training.model_copy(update={
                             "cpu_bf16": cpu_bf16,
                         }),
                     }))

    assert any(line.startswith(loaded) for line in reporter.lines)
    assert result.steps == 6 and result.last_loss < result.first_loss  # type: ignore[operator]
    eval_losses = reporter.values("eval_loss")
    assert len(eval_losses) >= 2 and eval_losses[-1] < eval_losses[0]


def test_lora_job_output_holds_only_adapter_tokenizer_and_report_files(lora_job: Job) -> None:
    names = {p.name for p in lora_job.result.output_dir.iterdir()}

    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
            "report.json"} <= names
    assert names <= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "report.json",
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
    # The first step's ETA would be its warm-up extrapolated: there is none.
    first, second = [values for _, values in reporter.metrics if "loss" in values][:2]
    assert "eta_s" not in first
    assert set(first) | {"eta_s"} == set(second) == {
        "epoch",
        "loss",
        "learning_rate",
        "tokens_per_s",
        "grad_norm",
        "total_steps",
        "percent",
        "eta_s",
        "mean_token_accuracy",
    }
    assert all(v > 0 for v in reporter.values("tokens_per_s"))
    assert set(reporter.values("total_steps")) == {6}
    assert reporter.values("percent") == pytest.approx([100 * s / 6 for s in range(1, 7)])
    assert reporter.steps("eta_s") == [2, 3, 4, 5, 6]
    etas = reporter.values("eta_s")
    assert all(eta > 0 for eta in etas[:-1]) and etas[-1] == 0
    train_lines = [line for line in reporter.lines if "| loss " in line]
    assert len(train_lines) == 6 and all(LOG_LINE.fullmatch(line) for line in train_lines)
    assert train_lines[0].startswith("epoch 1 | step 1/6 (17%) | loss ")
    assert train_lines[0].endswith("| eta –")
    assert train_lines[-1].endswith("| eta 0s")
    assert any(
        re.fullmatch(r"epoch 1 \| step 6/6 \(100%\) \| eval_loss \d+\.\d{4} \| "
                     r"eval_mean_token_accuracy [01]\.\d{4}", x)
        for x in reporter.lines
    )
    assert any(re.fullmatch(r"dataset .*: 300 rows, columns .*", x) for x in reporter.lines)
    assert any(
        re.search(r"[\d,]+ trainable of [\d,]+ parameters \(\d+\.\d\d%\)", x)
        for x in reporter.lines
    )
    assert "training 6 steps: 1 epoch of 24 examples, batch 4 x 1, optimizer adamw_torch_fused" in (
        reporter.lines
    )
    assert any("24 train, 12 validation" in line for line in reporter.lines)
    assert reporter.fractions[-1] == 1.0 and reporter.fractions == sorted(reporter.fractions)
    # should_stop() is polled after every optimizer step (and between stages).
    assert reporter.polls >= 6


def _wandb_records(run_file: Path) -> Iterator[bytes]:
    """The records of an offline run's `.wandb` file: W&B's 7-byte file header, then a
    leveldb-style log (32 KiB blocks; records of crc32, uint16 length, uint8 type).
    W&B's own Python reader of this format was removed; its protobuf records remain."""
    block, header = 32768, 7
    data, pos, pending = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block  # a block's tail too short for a header is padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL, LAST
            yield pending
            pending = b""


def test_lora_job_reports_its_loss_history_to_weights_and_biases(lora_job: Job) -> None:
    import json

    from wandb.proto import wandb_internal_pb2

    (run_file,) = (lora_job.work_dir / "trainer" / "wandb").glob("offline-run-*/run-*.wandb")
    runs, losses = [], {}
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.HasField("run"):
            runs.append((record.run.entity, record.run.project, record.run.display_name))
        if record.HasField("history"):
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            if "train/loss" in items:
                losses[items["train/global_step"]] = items["train/loss"]

    assert runs == [(WANDB_ENTITY, "tunery-tests", "tiny-lora")]
    reported = dict(
        zip(lora_job.reporter.steps("loss"), lora_job.reporter.values("loss"), strict=True)
    )
    assert losses == pytest.approx(reported)
    assert any(
        f"reporting to Weights & Biases: project {WANDB_ENTITY}/tunery-tests" in x
        for x in lora_job.reporter.lines
    )


def test_wandb_username_and_login_key_are_in_the_environment_while_the_trainer_trains(
    lora_job: Job,
) -> None:
    # Offline mode never logs in, so the key's only observable effect is the variable that
    # wandb.init reads when the Trainer starts; the entity also shows in the run record above.
    assert lora_job.wandb_env_at_train_begin == {
        "WANDB_ENTITY": WANDB_ENTITY,
        "WANDB_API_KEY": WANDB_KEY,
        "WANDB_PROJECT": "tunery-tests",
    }


def test_lora_job_leaves_no_wandb_setting_or_key_behind(lora_job: Job) -> None:
    assert not {"WANDB_PROJECT", "WANDB_API_KEY", "WANDB_DIR", "WANDB_ENTITY"} & set(os.environ)
    assert os.environ["WANDB_MODE"] == "offline"  # the test's own setting survives the job
    assert not any(WANDB_KEY in line for line in lora_job.reporter.lines)
    for path in (lora_job.work_dir / "trainer").rglob("*"):
        assert not path.is_file() or WANDB_KEY.encode() not in path.read_bytes(), path


def test_lora_job_pushes_the_exported_adapter_to_a_private_hub_repo(lora_job: Job) -> None:
    (create_name, create), (upload_name, upload) = lora_job.hub_calls

    assert create_name == "create_repo" and upload_name == "upload_folder"
    assert create["repo_id"] == upload["repo_id"] == "me/tiny-adapter"
    assert create["private"] is True and create["exist_ok"] is True
    assert create["token"] == upload["token"] == HF_TOKEN
    assert Path(upload["folder_path"]) == lora_job.result.output_dir
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(upload["files"])
    assert "adapter pushed to the hub: https://huggingface.co/me/tiny-adapter/commit/1" in (
        lora_job.reporter.lines
    )
    # One publish stage: the same files go to storage too.
    assert set(upload["files"]) <= set(lora_job.uploaded)


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


def test_qlora_job_trains_on_cpu_with_8bit_adam_through_in_training_evaluation(
    tmp_path: Path, settings: Settings, make_request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes as bnb
    from transformers import Trainer

    optimizers = []
    create_optimizer = Trainer.create_optimizer

    def keep_optimizer(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        optimizers.append(create_optimizer(self, *args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(Trainer, "create_optimizer", keep_optimizer)
    # bitsandbytes keeps tensors under 4096 elements in 32 bit; r=64 makes most LoRA
    # matrices of the tiny model big enough for 8-bit state, as a 7B model's all are.
    request = make_request(model={"use_quantization": True, "lora_r": 64, "lora_alpha": 64})
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert any("4-bit NF4" in line for line in reporter.lines)
    assert any(line.endswith("optimizer adamw_8bit") for line in reporter.lines)
    (optimizer,) = optimizers
    # transformers builds bitsandbytes' AdamW with optim_bits=8 for "adamw_8bit".
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.args.optim_bits == 8
    state_dtypes = [state["state1"].dtype for state in optimizer.state.values()]
    assert state_dtypes.count(torch.uint8) > len(state_dtypes) / 2
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


def _eval_loss_of_adapter(
    adapter_dir: Path, base_dir: Path, request: Any, settings: Settings
) -> float:
    """The exported adapter's loss on the job's validation split, as the Trainer computes it,
    in the precision the job trained in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.pipeline.data_source import load_dataset

    data = request.data_config
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    dataset = load_dataset(
        data.data_path,
        allowed_local_dirs=settings.sources.allowed_local_dirs,
        download_dir=settings.data_dir,
    )
    _, eval_set = split(
        render_and_tokenize(dataset, tokenizer, data, log=lambda line: None), data.data_split_config
    )
    dtype = compute_dtype(settings.training.cpu_bf16)
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, attn_implementation=attention_implementation(dtype)
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    args = training_arguments(
        request.training_config,
        output_dir=adapter_dir.parent / "eval",
        has_validation=True,
        quantized=False,
        dtype=dtype,
    )
    # The job's own trainer: in bf16 another computation of the same loss (all logits, say)
    # rounds differently, by more than the 1e-4 this compares with.
    trainer = TuneryTrainer(
        model=model,
        args=args,
        eval_dataset=[vars(e) for e in eval_set],
        data_collator=PadToLongest(tokenizer.pad_token_id),
    )
    return float(trainer.evaluate()["eval_loss"])


@pytest.fixture(scope="module")
def contradicting_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample rows with one answer in the training split ("Answer: alpha.") and another in
    the validation split ("Answer: omega."): eval_loss falls while the answer's format is
    learnt, then rises for good as "alpha" becomes certain. A U whatever the machine's
    rounding, where an arbitrary run's trajectory (which the early-stopping tests once relied
    on) is not."""
    rows = [json.loads(line) for line in DATASET_PATH.read_text().splitlines()]
    # The job's own split of these rows (the fractions of `build_request`).
    _, validation = split(list(range(len(rows))), {"train": 0.08, "validation": 0.04})
    path = tmp_path_factory.mktemp("contradicting") / "rows.jsonl"
    path.write_text("".join(
        json.dumps({**row, "output": "Answer: omega." if i in validation else "Answer: alpha."})
        + "\n" for i, row in enumerate(rows)
    ))
    return path


def _overfitting_request(make_request: Any, data: Path, patience: int) -> Any:
    # 48 steps, an evaluation every 5: the best comes at step 5 or 10, and is never beaten.
    return make_request(
        data,
        training={
            "learning_rate": 0.02,
            "lr_scheduler_type": "constant",
            "early_stopping_patience": patience,
            "num_train_epochs": 8,
        },
    )


def test_early_stopping_ends_training_and_exports_the_best_eval_adapter(
    tmp_path: Path, settings: Settings, make_request: Any, tiny_model_dir: Path,
    contradicting_data: Path,
) -> None:
    request = _overfitting_request(make_request, contradicting_data, patience=1)
    allowed = [*settings.sources.allowed_local_dirs, contradicting_data.parent]
    settings = settings.model_copy(
        update={"sources": settings.sources.model_copy(update={"allowed_local_dirs": allowed})}
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert result.steps < 48
    assert any(line.startswith("early stopping at step") for line in reporter.lines)
    eval_losses = dict(zip(reporter.steps("eval_loss"), reporter.values("eval_loss"), strict=True))
    best_step = min(eval_losses, key=eval_losses.__getitem__)
    assert 0 < best_step < result.steps  # improved, then got worse
    assert (result.best_step, result.best_eval_loss) == (best_step, eval_losses[best_step])
    assert any(line.startswith(f"kept the adapter of step {best_step}") for line in reporter.lines)
    exported = _eval_loss_of_adapter(result.output_dir, tiny_model_dir, request, settings)
    assert exported == pytest.approx(eval_losses[best_step], abs=1e-4)
    # Not the last step's adapter, whose loss is worse by far more than that tolerance.
    assert exported < eval_losses[result.steps] - 0.02


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_ends_exactly_patience_evaluations_after_the_best(
    tmp_path: Path, settings: Settings, make_request: Any, patience: int,
    contradicting_data: Path,
) -> None:
    request = _overfitting_request(make_request, contradicting_data, patience)
    allowed = [*settings.sources.allowed_local_dirs, contradicting_data.parent]
    settings = settings.model_copy(
        update={"sources": settings.sources.model_copy(update={"allowed_local_dirs": allowed})}
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    eval_steps = reporter.steps("eval_loss")
    interval = eval_steps[1] - eval_steps[0]  # a tenth of the 48 steps, rounded up
    assert interval == 5 and result.best_step is not None
    # The default patience (5) would run all 48 steps: 10 + 5 x 5 > 48 is not needed to see
    # it, the run stops patience evaluations after its best.
    assert result.steps == result.best_step + patience * interval < 48
    assert any(
        line.startswith(f"early stopping at step {result.steps}/48")
        and f"did not improve for {patience} evaluation" in line
        for line in reporter.lines
    )


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
        # At 0.05 eval_loss is best after 7 steps and only worse later, and the exported (best)
        # adapter of step 7 has not learned the style yet; at 0.02 it keeps improving.
        training={"learning_rate": 0.02, "lr_scheduler_type": "cosine", "warmup_steps": 10},
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
