"""What the service costs a job's training: the same job through the API and a worker, and
by `run_job` alone, on the same data, one after the other in one run.

    .venv/bin/python -m bench.service_overhead            # SmolLM2-135M, 270 short rows
    .venv/bin/python -m bench.service_overhead --quick    # tiny random Llama, seconds

(d) direct: `worker.pipeline.run.run_job` in a child process of its own, reporting to memory.
(s) service: the embedded default stack as `tunery up` starts it (API and one Celery worker,
    SQLite, local storage), the job POSTed with MonsterAPI's payload while this process polls
    its status every `--poll-s` seconds, as a client would.

Both train the same payload (the worker's defaults for everything the bench does not set:
checkpoints, memory plan, precision) from the same JSONL file, with no validation split, so
no evaluation interrupts training. Both arms report through the same `MetricsCallback`; each
arm's tokens/s is measured the same way from what it reported:

- steady: the median of the per-step `tokens_per_s` after the first step (the time between
  two steps' reports, the reporting itself included);
- training: the trained tokens over the time from the `training` phase to the last step's
  loss (the Trainer's setup, every step, checkpoints and reports).

The ratio (s)/(d) of each is the service's share; the target is ≥ 0.95. Writes
bench/results/service_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.common.datasets import ALPACA_TEMPLATE, build_data, write_jsonl  # noqa: E402
from bench.common.machine import (  # noqa: E402
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    load_average,
    machine_info,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402
from cli.process_commands import tunery_command  # noqa: E402
from worker.pipeline.model import compute_dtype  # noqa: E402

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
TARGET = 0.95


def payload(model_dir: Path, data_path: Path, cutoff_len: int) -> dict[str, Any]:
    return {
        "pretrainedmodel_config": {"model_path": str(model_dir), "lora_r": 8, "lora_alpha": 16,
                                   "lora_dropout": 0},
        "data_config": {
            "data_path": str(data_path), "prompt_template": ALPACA_TEMPLATE,
            "cutoff_len": cutoff_len, "data_split_config": {"train": 1.0, "validation": 0.0},
        },
        "training_config": {"num_train_epochs": 1, "learning_rate": 2e-4, "warmup_steps": 1,
                            "lr_scheduler_type": "linear"},
        "logging_config": {},
    }


def rates(steps: list[tuple[int, float, float]], training_at: float,
          trained_tokens: int | None) -> dict[str, Any]:
    """`steps`: (step, seconds since an origin, reported tokens_per_s) of each loss report;
    `training_at`: the training phase's start on the same clock."""
    per_step = [rate for step, _, rate in steps if step > 1]
    last_at = max((at for _, at, _ in steps), default=None)
    span = None if last_at is None else last_at - training_at
    return {
        "steps": len(steps),
        "steady_tokens_per_s": statistics.median(per_step) if per_step else None,
        "training_s": span,
        "trained_tokens": trained_tokens,
        "training_tokens_per_s": (trained_tokens / span) if trained_tokens and span else None,
    }


def run_direct(spec: dict[str, Any]) -> dict[str, Any]:
    """(d), in this (child) process: `run_job` with a reporter that keeps times."""
    from shared.schema import FinetuneRequest
    from shared.settings import Settings
    from worker.pipeline.report import RecordingReporter
    from worker.pipeline.run import run_job

    origin = time.perf_counter()
    phases: dict[str, float] = {}
    steps: list[tuple[int, float, float]] = []

    class TimedReporter(RecordingReporter):
        def phase(self, name: str) -> None:
            phases.setdefault(name, time.perf_counter() - origin)
            super().phase(name)

        def metric(self, step: int, values: dict[str, float]) -> None:
            if "loss" in values:
                steps.append((step, time.perf_counter() - origin,
                              float(values.get("tokens_per_s", 0.0))))
            super().metric(step, values)

    work = Path(spec["work_dir"])
    settings = Settings(data_dir=work / "tunery", allowed_local_dirs=spec["allowed"])
    started = time.perf_counter()
    result = run_job(FinetuneRequest.model_validate(spec["payload"]), work / "job",
                     TimedReporter(), settings)
    return {**rates(steps, phases["training"], result.trained_tokens),
            "wall_s": time.perf_counter() - started, "last_loss": result.last_loss}


def stack_env(work: Path, allowed: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env.update({
        "TUNERY_DATA_DIR": str(work / "data"),
        "TUNERY_ALLOWED_LOCAL_DIRS": json.dumps(allowed),
        "TUNERY_RATE_LIMIT_PER_MINUTE": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def seconds(stamp: str, origin: datetime) -> float:
    return (datetime.fromisoformat(stamp) - origin).total_seconds()


def run_service(spec: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """(s): the embedded stack, one job POSTed and polled; times from the job's own records."""
    from cli.local_stack import LocalStack

    work = Path(spec["work_dir"])
    env = stack_env(work, spec["allowed"])
    with LocalStack(env=env, log_dir=work / "logs", quiet=True) as stack:
        key = subprocess.run(tunery_command("keys", "create", "--name", "bench", "--quiet"),
                             env=env, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        with httpx.Client(base_url=stack.base_url, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            started = time.perf_counter()
            posted = client.post("/v1/finetune/llm", json=spec["payload"])
            posted.raise_for_status()
            job_id = posted.json()["job_id"]
            status = "QUEUED"
            while status not in TERMINAL:
                time.sleep(poll_s)
                job = client.get(f"/v1/finetune/llm/{job_id}").json()
                status = job["status"]
            wall_s = time.perf_counter() - started
            if status != "COMPLETED":
                raise RuntimeError(f"job {job_id} ended {status}: {job.get('reason')}")
            metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
            # The training phase begins early in the log: its first lines are enough.
            logs = client.get(f"/v1/finetune/llm/{job_id}/logs",
                              params={"after": 0, "n_lines": 10_000})
            logs.raise_for_status()
    training = next(line for line in logs.json()["lines"] if line["line"] == "phase: training")
    origin = datetime.fromisoformat(training["at"])
    steps = [(m["step"], seconds(m["at"], origin), float(m["values"].get("tokens_per_s", 0.0)))
             for m in metrics if "loss" in m["values"]]
    result = job.get("result") or {}
    return {**rates(steps, 0.0, result.get("trained_tokens")), "wall_s": wall_s,
            "last_loss": steps and next(m["values"]["loss"] for m in reversed(metrics)
                                        if "loss" in m["values"])}


def child(spec_path: Path, result_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result_path.write_text(json.dumps(run_direct(spec)))


def direct_in_child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "bench.service_overhead", "--child",
                    str(spec_path), str(result_path)], check=True)
    return dict(json.loads(result_path.read_text()))


def ratio(service: float | None, direct: float | None) -> float | None:
    return service / direct if service and direct else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random Llama, 48 rows")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--rows", type=int, default=None,
                        help="training rows, at most the sample's 270 (default: all)")
    parser.add_argument("--poll-s", type=float, default=1.0,
                        help="how often the client polls the job's status")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    rows = args.rows or (48 if args.quick else 270)
    cutoff_len = 128 if args.quick else 512
    model_dir = prepare_model(args.quick, args.model_dir).resolve()
    scratch = SCRATCH_DIR / "service_overhead"
    shutil.rmtree(scratch, ignore_errors=True)
    data = build_data("short", n_train=rows, n_eval=0, cutoff_len=cutoff_len)
    rows = len(data.train_rows)
    precision = "bf16" if compute_dtype("auto") == torch.bfloat16 else "fp32"
    data_path = write_jsonl(data.train_rows, scratch / "train.jsonl")
    allowed = [str(scratch), str(model_dir.parent)]
    body = payload(model_dir, data_path, cutoff_len)
    load_at_start = load_average()
    direct = direct_in_child({"work_dir": str(scratch / "direct"), "allowed": allowed,
                              "payload": body}, scratch / "direct")
    service = run_service({"work_dir": str(scratch / "service"), "allowed": allowed,
                           "payload": body}, args.poll_s)
    steady = ratio(service["steady_tokens_per_s"], direct["steady_tokens_per_s"])
    training = ratio(service["training_tokens_per_s"], direct["training_tokens_per_s"])

    def fmt(value: float | None, spec: str = ".0f") -> str:
        return "–" if value is None else format(value, spec)

    print(format_table(
        ["arm", "steps", "steady tok/s", "training tok/s", "training s", "wall s", "last loss"],
        [[name, str(r["steps"]), fmt(r["steady_tokens_per_s"]), fmt(r["training_tokens_per_s"]),
          fmt(r["training_s"], ".1f"), fmt(r["wall_s"], ".1f"), fmt(r["last_loss"], ".4f")]
         for name, r in (("(d) run_job", direct), ("(s) API + worker", service))]))
    print(f"\n(s)/(d): steady {fmt(steady, '.3f')}, training {fmt(training, '.3f')} "
          f"(target ≥ {TARGET}); model {model_dir.name}, {rows} rows, {precision} "
          f"(the worker's choice on this CPU)")
    path = write_results("service_overhead", {
        "machine": {**machine_info(), "load_average_at_start": load_at_start,
                    "load_average_at_end": load_average()},
        "model": model_dir.name, "rows": rows, "precision": precision,
        "cutoff_len": cutoff_len, "poll_s": args.poll_s,
        "direct": direct, "service": service,
        "ratios": {"steady": steady, "training": training}, "target": TARGET,
    }, args.results_dir)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
