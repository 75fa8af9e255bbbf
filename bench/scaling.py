"""Scaling: the same job on 1 and on N processes of one torchrun group, as a worker runs it.

    .venv/bin/python -m bench.scaling                 # SmolLM2-135M, 1 vs 2 processes
    .venv/bin/python -m bench.scaling --quick         # tiny random Llama, seconds
    .venv/bin/python -m bench.scaling --devices 1,2,4 # on a GPU host: 1 vs N GPUs

Each run goes through `worker.device_group.train_on_devices`, the worker's own path: torchrun
starts the ranks (gloo on CPU, NCCL on GPUs), rank 0 reports. Every run trains the same
examples with the same global batch (`--global-batch` examples a step, split evenly over the
processes), so each optimizer step is the same work and only the split differs. tokens/s is
rank 0's reading of the whole group's non-padding tokens over training time (evaluation
excluded), the median over the steps after the first; efficiency is tokens/s on N processes
over N x tokens/s on one. On a CPU every process shares the same cores (each gets
cores / N threads), so this machine measures the overhead of the group (gradient all-reduce,
N copies of the model), not added compute: on 2 cores, an efficiency of 0.5 means N processes
are as fast as one. Writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common.machine import (  # noqa: E402
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    load_average,
    machine_info,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402
from shared.jobs import Claim  # noqa: E402
from shared.schema import FinetuneRequest  # noqa: E402
from shared.settings import Settings  # noqa: E402
from worker.assets.build_dataset import DATASET_PATH  # noqa: E402
from worker.device_group import train_on_devices  # noqa: E402
from worker.pipeline.report import RecordingReporter  # noqa: E402

TEMPLATE = "### Instruction: {instruction}\n### Input: {input}\n### Response: {output}"


def request(model_dir: Path, *, devices: int, global_batch: int, train_share: float,
            cutoff_len: int) -> FinetuneRequest:
    return FinetuneRequest.model_validate({
        "pretrainedmodel_config": {"model_path": str(model_dir)},
        "data_config": {
            "data_path": str(DATASET_PATH), "prompt_template": TEMPLATE,
            "cutoff_len": cutoff_len,
            "data_split_config": {"train": train_share, "validation": 0.0},
        },
        "training_config": {
            "devices": devices, "micro_batch_size": global_batch // devices,
            "group_by_length": False, "num_train_epochs": 1, "learning_rate": 1e-4,
            "warmup_steps": 1, "lr_scheduler_type": "linear",
        },
        "logging_config": {},
    })


def run(model_dir: Path, devices: int, args: argparse.Namespace) -> dict[str, Any]:
    work = SCRATCH_DIR / "scaling" / f"devices-{devices}"
    shutil.rmtree(work, ignore_errors=True)
    settings = Settings(data_dir=work / "data", worker_devices=devices,
                        allowed_local_dirs=[model_dir.parent, DATASET_PATH.parent],
                        checkpoint_every_steps=0)
    reporter = RecordingReporter()
    started = time.perf_counter()
    result = train_on_devices(
        request(model_dir, devices=devices, global_batch=args.global_batch,
                train_share=args.train_share, cutoff_len=args.cutoff_len),
        work / "attempt", reporter, settings, claim=Claim(f"bench-scaling-{devices}", 1, "bench"),
        memory_rung=0, hub_cache_dir=None,
    )
    wall_s = time.perf_counter() - started
    rates = [values["tokens_per_s"] for step, values in reporter.metrics
             if "tokens_per_s" in values and step > 1]
    return {
        "devices": devices,
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "wall_s": wall_s,
        "last_loss": result.last_loss,
        "group": next((line for line in reporter.lines if line.startswith("process group")),
                      "one process"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--devices", default="1,2", help="process counts, e.g. 1,2,4")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    # 48 and 144 of the 300 sample rows: whole global batches, so that every run trains the
    # very same batches, the last one included (accelerate fills a last round that does not
    # split evenly with examples from the start of the epoch).
    args.train_share = 0.16 if args.quick else 0.48
    args.cutoff_len = 128 if args.quick else 256
    counts = [int(n) for n in args.devices.split(",")]
    bad = [n for n in counts if args.global_batch % n]
    if bad:
        parser.error(f"--global-batch {args.global_batch} does not split over {bad} processes")

    import torch

    model_dir = prepare_model(args.quick, args.model_dir)
    load_at_start = load_average()
    rows = [run(model_dir, n, args) for n in counts]
    single = next((row["tokens_per_s"] for row in rows if row["devices"] == 1), None)
    for row in rows:
        rate = row["tokens_per_s"]
        row["efficiency"] = (rate / (row["devices"] * single)) if rate and single else None
    accelerator = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
                   if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores")
    print(format_table(
        ["processes", "group", "steps", "tokens/s", "efficiency", "wall s", "last loss"],
        [[str(r["devices"]), r["group"], str(r["steps"]),
          f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "–",
          f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "–",
          f"{r['wall_s']:.1f}", f"{r['last_loss']:.4f}" if r["last_loss"] else "–"]
         for r in rows]))
    print(f"\n{accelerator}; global batch {args.global_batch}; model {model_dir.name}")
    path = write_results("scaling", {
        "machine": {**machine_info(), "accelerator": accelerator,
                    "load_average_at_start": load_at_start, "load_average_at_end": load_average()},
        "model": model_dir.name, "global_batch": args.global_batch, "results": rows,
    }, args.results_dir)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
