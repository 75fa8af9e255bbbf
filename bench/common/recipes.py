"""The recipes of `bench/train_throughput.py`, one per child process.

`python -m bench.common.recipes SPEC.json RESULT.json` trains one recipe on one dataset as the
spec says, measures it, evaluates the adapter with the common eval and writes the result. Each
recipe runs alone in its process, so peak RSS is its own.

What is measured, the same way for every recipe:
- training time: from the first training forward pass (a hook on the input embeddings) to the
  end of the last optimizer step; model loading, tokenization and the trainer's set-up are
  outside it.
- real tokens: non-padding tokens of the batches trained (peers: counted in the collator;
  Tunery, which trains one whole epoch: the sum of its training examples' lengths).
- positions: every token position fed to the model in training, padding included (the same
  embedding hook), so padding share = 1 - real / positions.
- peak RSS: VmHWM at the end of training, before the eval.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.common.datasets import BenchData, Example, build_data, tokenize_rows, write_jsonl  # noqa: E402
from bench.common.evaluation import pad_batch, response_loss  # noqa: E402
from bench.common.machine import peak_rss_bytes  # noqa: E402

SEED = 42
# Tunery's worker.pipeline.model seeds torch with this before drawing lora_A; the peers do
# the same, so every recipe starts from the same adapter.
LORA_INIT_SEED = 42
BATCH_SIZE = 4
LEARNING_RATE = 2e-4
WARMUP_STEPS = 1
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.0

RECIPES = {
    "a": "(a) Trainer, pad to cutoff",
    "b": "(b) Trainer, group_by_length",
    "b16": "(b16) Trainer, group_by_length, bf16",
    "c": "(c) TRL packing bfd",
    "c2": "(c') TRL packing wrapped",
    "t": "(t) Tunery run_job",
    "t32": "(t32) Tunery run_job, fp32",
    # The GPU peers of `bench/gpu_check.py`: what a skilled user runs on a GPU by hand.
    "f": "(f) Trainer, group_by_length, bf16, FlashAttention-2",
    "fq": "(fq) as (f) on a 4-bit NF4 base, paged 8-bit AdamW (QLoRA)",
    "tq": "(tq) Tunery run_job, QLoRA",
}
# Recipes whose base is quantized to 4-bit NF4 (bitsandbytes), with 8-bit AdamW.
QUANTIZED = frozenset({"fq", "tq"})


@dataclass
class TrainingProbe:
    """Counts the positions of training forward passes and the time of the first one."""

    first_forward: float | None = None
    positions: int = 0
    forwards: int = 0

    def attach(self, model: Any) -> None:
        model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training:
            return
        if self.first_forward is None:
            self.first_forward = time.perf_counter()
        self.positions += int(args[0].numel())
        self.forwards += 1


class CountingCollator:
    """Wraps a collator; remembers (real tokens, positions) of every batch it makes."""

    def __init__(self, inner: Callable[[Any], dict[str, Any]]) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features: Any) -> dict[str, Any]:
        batch = self.inner(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        # Padding-free batches (TRL's bfd) have no mask and no padding.
        real = int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel())
        self.batches.append((real, int(ids.numel())))
        return batch


@dataclass
class TrainRun:
    adapter_dir: Path
    precision: str
    steps: int
    start: float
    end: float
    real_tokens: int
    positions: int
    notes: dict[str, Any] = field(default_factory=dict)


class _Items(torch.utils.data.Dataset):
    """Examples as dicts; the Trainer's length-grouped sampler reads `item["input_ids"]`."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        e = self.examples[index]
        return {"input_ids": e.input_ids, "labels": e.labels}


def _examples_from_items(items: Sequence[dict[str, list[int]]]) -> list[Example]:
    return [Example(item["input_ids"], item["labels"]) for item in items]


def load_lora_model(model_dir: str, dtype: torch.dtype = torch.float32, *,
                    attention: str | None = None, quantized: bool = False) -> Any:
    """The base in `dtype` + a fresh LoRA (r 8, alpha 16, dropout 0, all-linear), seeded like
    Tunery's. peft keeps the LoRA weights in fp32 whatever the base's dtype. `quantized`: the
    base in 4-bit NF4 with double quantization and `dtype` compute, prepared for k-bit
    training as the QLoRA guides do."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options: dict[str, Any] = {"dtype": dtype}
    if attention is not None:
        options["attn_implementation"] = attention
    if quantized:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            options["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **options)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(LORA_INIT_SEED)
    lora = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules="all-linear",
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _step_times() -> tuple[Any, list[float]]:
    from transformers import TrainerCallback

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter())

    return StepTimes(), times


def _common_args(spec: dict[str, Any], *, bf16: bool = False,
                 optim: str = "adamw_torch") -> dict[str, Any]:
    max_steps = spec.get("max_steps")
    return dict(
        output_dir=str(Path(spec["work_dir"])),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=max_steps or -1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP_STEPS,
        optim=optim,
        bf16=bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        # The order of the batches; the LoRA initialisation keeps LORA_INIT_SEED.
        seed=spec.get("seed", SEED),
        data_seed=spec.get("seed", SEED),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _finish(trainer: Any, collator: CountingCollator, probe: TrainingProbe,
            times: list[float]) -> TrainRun:
    steps = trainer.state.global_step
    # One batch per optimizer step (no gradient accumulation); ignore any fetched beyond.
    batches = collator.batches[:steps]
    assert probe.first_forward is not None, "no training forward pass was seen"
    adapter_dir = Path(trainer.args.output_dir) / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    return TrainRun(
        adapter_dir=adapter_dir,
        precision="bf16" if trainer.args.bf16 else "fp32",
        steps=steps,
        start=probe.first_forward,
        end=times[-1],
        real_tokens=sum(real for real, _ in batches),
        positions=probe.positions,
        notes={"attention": trainer.model.config._attn_implementation},
    )


def gpu_peer_attention() -> str:
    """FlashAttention-2 where it runs (CUDA, `flash_attn` installed), else SDPA; the result
    names the one used."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def train_with_trainer(spec: dict[str, Any], tokenizer: Any, data: BenchData,
                       examples: list[Example]) -> TrainRun:
    """(a) every batch padded to cutoff_len, random order; (b) padded to the batch's longest,
    length-grouped order (`train_sampling_strategy="group_by_length"`); (b16) the same as (b)
    in bf16 mixed precision as on a GPU: the base loaded in bf16, `bf16=True` (autocast)."""
    from transformers import Trainer, TrainingArguments

    pad_to_cutoff = spec["recipe"] == "a"
    bf16 = spec["recipe"] in ("b16", "f", "fq")
    quantized = spec["recipe"] in QUANTIZED
    gpu_peer = spec["recipe"] in ("f", "fq")
    pad_id = tokenizer.pad_token_id
    width = data.cutoff_len if pad_to_cutoff else None
    collator = CountingCollator(
        lambda items: pad_batch(_examples_from_items(items), pad_id, width=width)
    )
    optim = "adamw_torch"
    if quantized:
        optim = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_8bit"
    args = TrainingArguments(
        **_common_args(spec, bf16=bf16, optim=optim),
        train_sampling_strategy="random" if pad_to_cutoff else "group_by_length",
        remove_unused_columns=False,
    )
    model = load_lora_model(spec["model_dir"], torch.bfloat16 if bf16 else torch.float32,
                            attention=gpu_peer_attention() if gpu_peer else None,
                            quantized=quantized)
    probe = TrainingProbe()
    probe.attach(model)
    callback, times = _step_times()
    trainer = Trainer(
        model=model, args=args, train_dataset=_Items(examples), data_collator=collator,
        processing_class=tokenizer, callbacks=[callback],
    )
    trainer.train()
    return _finish(trainer, collator, probe, times)


def train_with_trl(spec: dict[str, Any], tokenizer: Any, data: BenchData,
                   examples: list[Example]) -> TrainRun:
    """(c) SFTTrainer(packing=True) with its defaults (bfd, padding-free); (c') the "wrapped"
    strategy. A prompt/completion dataset with completion_only_loss, so TRL masks the prompt."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.common.datasets import render

    rows = [dict(zip(("prompt", "completion"), render(row), strict=True))
            for row in data.train_rows]
    strategy = "wrapped" if spec["recipe"] == "c2" else "bfd"
    config = SFTConfig(
        **_common_args(spec),
        max_length=data.cutoff_len,
        packing=True,
        packing_strategy=strategy,
        completion_only_loss=True,
    )
    model = load_lora_model(spec["model_dir"])
    probe = TrainingProbe()
    probe.attach(model)
    callback, times = _step_times()
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[callback],
    )
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    run = _finish(trainer, collator, probe, times)
    packed: Any = trainer.train_dataset
    run.notes["packed_rows"] = len(packed)
    run.notes["trl_packed_tokens"] = sum(len(ids) for ids in packed["input_ids"])
    return run


def train_with_tunery(spec: dict[str, Any], tokenizer: Any, data: BenchData,
                      examples: list[Example]) -> TrainRun:
    """Tunery's own `run_job` on a payload with the same settings, its training rows written
    to a file and all of it used for training (validation 0: no eval during training)."""
    from dataclasses import dataclass as _dataclass
    from dataclasses import field as _field

    from shared.schema import FinetuneRequest
    from shared.settings import Settings
    from worker.pipeline import run as tunery_run
    from worker.pipeline import train as tunery_train
    from worker.pipeline.model import compute_dtype
    from worker.pipeline.report import RecordingReporter

    @_dataclass
    class TimedReporter(RecordingReporter):
        loss_times: list[float] = _field(default_factory=list)
        phase_times: dict[str, float] = _field(default_factory=dict)

        def phase(self, name: str) -> None:
            self.phase_times[name] = time.perf_counter()
            super().phase(name)

        def metric(self, step: int, values: dict[str, float]) -> None:
            if "loss" in values:
                self.loss_times.append(time.perf_counter())
            super().metric(step, values)

    work = Path(spec["work_dir"])
    model_dir = Path(spec["model_dir"]).resolve()
    data_path = write_jsonl(data.train_rows, work / "train.jsonl")
    request = FinetuneRequest.model_validate({
        "pretrainedmodel_config": {
            "model_path": str(model_dir), "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
            "lora_dropout": LORA_DROPOUT, "use_quantization": spec["recipe"] in QUANTIZED,
        },
        "data_config": {
            "data_path": str(data_path),
            "prompt_template": (
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
            ),
            "cutoff_len": data.cutoff_len,
            "data_split_config": {"train": 1.0, "validation": 0.0},
        },
        "training_config": {
            # group_by_length left out: the worker's own choice of batches.
            # The request's seed orders the batches like the peers' data_seed; it also draws
            # the LoRA initialisation, which for any seed but 42 differs from the peers'.
            "seed": spec.get("seed", SEED),
            "num_train_epochs": 1, "learning_rate": LEARNING_RATE, "warmup_steps": WARMUP_STEPS,
            "lr_scheduler_type": "linear",
        },
        "logging_config": {},
    })
    # (t32): the same job on a worker told to train in fp32 whatever the CPU.
    settings = Settings(data_dir=work / "tunery", allowed_local_dirs=[work, model_dir.parent],
                        cpu_bf16="off" if spec["recipe"] == "t32" else "auto")
    probe = TrainingProbe()
    plan_memory = tunery_train.checkpoint_if_short_of_memory

    def plan_memory_then_probe(model: Any, *args: Any, **kwargs: Any) -> None:
        plan_memory(model, *args, **kwargs)
        # After the memory plan's own probe forwards, which are not training: the next
        # forward is the Trainer's first.
        probe.attach(model)

    # Observes only: the hook reads each training batch's shape, nothing is changed.
    tunery_train.checkpoint_if_short_of_memory = plan_memory_then_probe  # type: ignore[assignment]
    reporter = TimedReporter()
    try:
        result = tunery_run.run_job(request, work / "job", reporter, settings)
    finally:
        tunery_train.checkpoint_if_short_of_memory = plan_memory  # type: ignore[assignment]
    peak_at_training_end = peak_rss_bytes()
    end = reporter.loss_times[-1] if reporter.loss_times else time.perf_counter()
    start = probe.first_forward or reporter.phase_times["training"]
    reported = reporter.values("tokens_per_s")
    return TrainRun(
        adapter_dir=result.output_dir,
        precision="bf16" if compute_dtype(settings.training.cpu_bf16) == torch.bfloat16 else "fp32",
        steps=result.steps,
        start=start,
        end=end,
        real_tokens=sum(len(e.input_ids) for e in examples),
        positions=probe.positions,
        notes={
            "train_rows": result.train_rows,
            "timing": "probe" if probe.first_forward else "training phase (probe not attached)",
            "tunery_mean_tokens_per_s": sum(reported) / len(reported) if reported else None,
            "peak_rss_bytes_at_training_end": peak_at_training_end,
            "log_tail": reporter.lines[-8:],
        },
    )


TRAINERS = {
    "a": train_with_trainer,
    "b": train_with_trainer,
    "b16": train_with_trainer,
    "c": train_with_trl,
    "c2": train_with_trl,
    "t": train_with_tunery,
    "t32": train_with_tunery,
    "f": train_with_trainer,
    "fq": train_with_trainer,
    "tq": train_with_tunery,
}


def adapter_on_fp32_base(model_dir: str, adapter_dir: Path) -> Any:
    """What every recipe is evaluated as, whatever precision it trained in: the saved adapter
    on the base loaded afresh in fp32, with transformers' default attention."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir)


def run_recipe(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    data = build_data(
        spec["dataset"], n_train=spec["n_train"], n_eval=spec["n_eval"],
        cutoff_len=spec["cutoff_len"], rows_per_long_example=spec["rows_per_long_example"],
    )
    train_examples = tokenize_rows(data.train_rows, tokenizer, data.cutoff_len)
    eval_examples = tokenize_rows(data.eval_rows, tokenizer, data.cutoff_len)
    Path(spec["work_dir"]).mkdir(parents=True, exist_ok=True)
    run = TRAINERS[spec["recipe"]](spec, tokenizer, data, train_examples)
    # Tunery's child loads the exported adapter for the eval; its training peak is earlier.
    peak = run.notes.pop("peak_rss_bytes_at_training_end", None) or peak_rss_bytes()
    # Before the eval, which loads a model of its own.
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    seconds = run.end - run.start
    eval_start = time.perf_counter()
    eval_loss = response_loss(
        adapter_on_fp32_base(spec["model_dir"], run.adapter_dir), eval_examples,
        tokenizer.pad_token_id,
    )
    return {
        "recipe": spec["recipe"],
        "dataset": spec["dataset"],
        "precision": run.precision,
        "steps": run.steps,
        "train_seconds": seconds,
        "real_tokens": run.real_tokens,
        "positions": run.positions,
        "tokens_per_s": run.real_tokens / seconds if seconds > 0 else None,
        "padding_share": 1 - run.real_tokens / run.positions if run.positions else None,
        "peak_rss_bytes": peak,
        "peak_gpu_bytes": peak_gpu,
        "eval_loss": eval_loss,
        "eval_seconds": time.perf_counter() - eval_start,
        "train_examples": len(train_examples),
        "epoch_tokens": sum(len(e.input_ids) for e in train_examples),
        "notes": run.notes,
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    result = run_recipe(json.loads(spec_path.read_text()))
    result_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
