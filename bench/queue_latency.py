"""Queue latency: from the client's POST to the worker's claim, and to the first optimizer
step, with the worker's base model cache cold and warm.

    .venv/bin/python -m bench.queue_latency            # SmolLM2-135M-Instruct
    .venv/bin/python -m bench.queue_latency --quick    # tiny random Llama

The real stack: the API (uvicorn) and one Celery worker process (solo pool) as `tunery up`
starts them, on a fresh PostgreSQL database and a Redis database of their own, local storage.
One job at a time, each POSTed to an idle worker, alternating two bases (the model and a
hard-linked copy at another path, which the cache tells apart), each base twice in a row:

    A (cold: fresh worker)  A (warm)  B (cold: other base)  B (warm)  A (cold)  A (warm) ...

first with LoRA, then with QLoRA (4-bit; its first job is cold too: another key). Each job is
one optimizer step on 4 rows, so the worker spends its time on what is measured. The worker
runs torch on one thread by default (`--threads`): what is measured is what comes before the
first step, and one thread keeps the step's own time steady on a shared machine.

Times come from the database against the client's clock at the POST (same machine): the claim
is the job's RUNNING event, the first step its first `loss` metric; the job's log lines split
what lies between. Prints the tables and writes bench/results/queue_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common.machine import (
    PROJECT_ROOT,
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    load_average,
    machine_info,
    write_results,
)
from bench.common.models import prepare_model
from cli.process_commands import tunery_command

ASSETS_DIR = PROJECT_ROOT / "worker" / "assets"
DATASET = ASSETS_DIR / "alpaca_sample.jsonl"
SAMPLE_ROWS = 300
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
CLAIM_TARGET_MS = 100.0
WARM_TARGET_RATIO = 3.0

# Where the time before the first step goes, from the job's own log lines: each span ends at
# the first line starting with its marker, counted from the end of the span before it.
SPANS = (
    ("claim", None),  # POST sent -> RUNNING event
    ("attempt start", "attempt "),  # heartbeat, reporter, work dir
    ("dataset", "dataset "),  # phase loading_data -> rows read
    ("tokenizer + render", "rendered "),  # tokenizer load and prompt rendering
    ("tokenize + split", "split "),
    ("base model", "base model "),  # from_pretrained (and 4-bit), or the cache
    ("peft wrap", "LoRA r="),
    ("trainer setup", "training "),  # Trainer, optimizer, Trainer.train() until on_train_begin
    ("first step", None),  # -> first loss metric
)


@dataclass(frozen=True)
class Series:
    name: str
    quantized: bool
    rounds: int


FULL_SERIES = (Series("lora", False, 7), Series("qlora", True, 4))
QUICK_SERIES = (Series("lora", False, 2), Series("qlora", True, 1))


@dataclass
class JobTiming:
    n: int
    series: str
    round: int
    base: str
    kind: str  # "cold (fresh worker)", "cold (other base)", "warm"
    status: str = ""
    post_ms: float | None = None
    claim_ms: float | None = None
    first_step_s: float | None = None
    trainer_ready_s: float | None = None
    spans_s: dict[str, float | None] = field(default_factory=dict)
    cache_line: str | None = None
    error: str | None = None


def linked_copy(model_dir: Path, dest: Path) -> Path:
    """The same files at another path (hard links, no extra disk): another base to the cache,
    whose key holds the resolved path."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file():
            os.link(path, dest / path.name)
    return dest


def payload(model_dir: Path, quantized: bool, train_rows: int) -> dict[str, Any]:
    """A short job: `train_rows` rows of the 300 in the alpaca sample (4: one optimizer step at
    batch 4), no validation (an evaluation before the first step would measure evaluation,
    not the queue), no checkpoints."""
    return {
        "pretrainedmodel_config": {
            "model_path": str(model_dir), "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0,
            "use_quantization": quantized,
        },
        "data_config": {
            "data_path": str(DATASET),
            "prompt_template": (
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
            ),
            "cutoff_len": 512,
            "data_split_config": {"train": train_rows / SAMPLE_ROWS, "validation": 0.0},
        },
        "training_config": {
            "num_train_epochs": 1, "learning_rate": 2e-4, "warmup_steps": 1,
            "lr_scheduler_type": "linear",
        },
        "logging_config": {},
    }


@contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    import psycopg

    name = f"tunery_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def empty_redis_db(url: str) -> Iterator[str]:
    """A Redis database number nobody uses now (no keys), flushed again afterwards."""
    import random

    import redis

    numbers = list(range(1, 16))
    random.shuffle(numbers)
    for db in numbers:
        client = redis.Redis.from_url(f"{url}/{db}", socket_connect_timeout=5)
        if client.dbsize() == 0:
            try:
                yield f"{url}/{db}"
            finally:
                client.flushdb()
            return
    raise RuntimeError(f"no empty Redis database on {url}")


def stack_env(data_dir: Path, database_url: str, broker_url: str, allowed: list[Path],
              threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the worker
    env.update({
        "TUNERY_DATA_DIR": str(data_dir),
        "TUNERY_DATABASE_URL": database_url,
        "TUNERY_BROKER_URL": broker_url,
        "TUNERY_ALLOWED_LOCAL_DIRS": json.dumps([str(p) for p in allowed]),
        "TUNERY_BASE_MODEL_CACHE": "true",
        "TUNERY_CHECKPOINT_EVERY_STEPS": "0",
        "TUNERY_RATE_LIMIT_PER_MINUTE": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def wait_for_worker(log_path: Path, timeout_s: float) -> float:
    """Seconds until the worker's log says it is ready (imports done, consuming)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if log_path.is_file() and " ready." in log_path.read_text(errors="replace"):
            return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(f"the worker did not get ready in {timeout_s:.0f} s; see {log_path}")


def create_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        tunery_command("keys", "create", "--name", "bench", "--quiet"),
        env=env, check=True, capture_output=True, text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def run_one(client: httpx.Client, engine: Any, timing: JobTiming, body: dict[str, Any],
            timeout_s: float) -> None:
    posted_at = datetime.now(UTC)
    started = time.perf_counter()
    response = client.post("/v1/finetune/llm", json=body)
    timing.post_ms = 1000 * (time.perf_counter() - started)
    if response.status_code != 201:
        timing.error = f"POST answered {response.status_code}: {response.text[:300]}"
        return
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + timeout_s
    status = "QUEUED"
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get(f"/v1/finetune/llm/{job_id}").json()["status"]
    timing.status = status
    if status != "COMPLETED":
        timing.error = f"job {job_id} ended {status}" if status in TERMINAL else "timed out"
    read_timeline(engine, job_id, posted_at, timing)


def read_timeline(engine: Any, job_id: str, posted_at: datetime, timing: JobTiming) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from shared.models import JobEvent, JobLog, JobMetric

    with Session(engine) as session:
        claimed = session.scalar(
            select(JobEvent.at).where(JobEvent.job_id == job_id, JobEvent.to_status == "RUNNING")
            .order_by(JobEvent.at).limit(1)
        )
        metrics = session.execute(
            select(JobMetric.at, JobMetric.values).where(JobMetric.job_id == job_id)
            .order_by(JobMetric.id)
        ).all()
        lines = session.execute(
            select(JobLog.at, JobLog.line).where(JobLog.job_id == job_id).order_by(JobLog.id)
        ).all()
    first_step = next((at for at, values in metrics if "loss" in values), None)
    if claimed is not None:
        timing.claim_ms = 1000 * (claimed - posted_at).total_seconds()
    if first_step is not None:
        timing.first_step_s = (first_step - posted_at).total_seconds()
    trainer_ready = next((at for at, line in lines if line.startswith("training ")), None)
    if trainer_ready is not None:
        timing.trainer_ready_s = (trainer_ready - posted_at).total_seconds()
    timing.cache_line = next((line for _, line in lines if "worker's cache" in line), None)
    timing.spans_s = spans(posted_at, claimed, first_step, lines)


def spans(posted_at: datetime, claimed: datetime | None, first_step: datetime | None,
          lines: list[Any]) -> dict[str, float | None]:
    """`SPANS` in seconds; None where a marker line is missing."""
    found: dict[str, float | None] = {}
    previous: datetime | None = posted_at
    for name, marker in SPANS:
        if name == "claim":
            end = claimed
        elif name == "first step":
            end = first_step
        else:
            end = next((at for at, line in lines
                        if line.startswith(marker) and (previous is None or at >= previous)),
                       None)
        found[name] = (end - previous).total_seconds() if end and previous else None
        previous = end
    return found


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(timings: list[JobTiming]) -> dict[str, Any]:
    """Medians per series and kind of job, the ratios, and whether the targets were met."""
    ok = [t for t in timings if t.error is None]
    claim = median([t.claim_ms for t in ok])
    summary: dict[str, Any] = {
        "claim_ms_median_all_jobs": claim,
        "claim_target_ms": CLAIM_TARGET_MS,
        "claim_target_met": claim is not None and claim <= CLAIM_TARGET_MS,
        "warm_target_ratio": WARM_TARGET_RATIO,
        "cache_hits_as_planned": all(
            (t.cache_line or "").startswith("base model reused") == (t.kind == "warm")
            for t in ok
        ),
        "series": {},
    }
    for series in dict.fromkeys(t.series for t in timings):
        jobs = [t for t in ok if t.series == series]
        summary["series"][series] = summarize_series(jobs)
    return summary


def summarize_series(jobs: list[JobTiming]) -> dict[str, Any]:
    groups = {
        "cold (fresh worker)": [t for t in jobs if t.kind == "cold (fresh worker)"],
        "cold (other base)": [t for t in jobs if t.kind == "cold (other base)"],
        "cold (all)": [t for t in jobs if t.kind.startswith("cold")],
        "warm": [t for t in jobs if t.kind == "warm"],
    }
    found: dict[str, Any] = {"groups": {}}
    for name, members in groups.items():
        if not members:
            continue
        found["groups"][name] = {
            "jobs": len(members),
            "claim_ms_median": median([t.claim_ms for t in members]),
            "trainer_ready_s_median": median([t.trainer_ready_s for t in members]),
            "first_step_s_median": median([t.first_step_s for t in members]),
            "spans_s_median": {
                span: median([t.spans_s.get(span) for t in members]) for span, _ in SPANS
            },
        }

    def ratio(group: str, what: str) -> float | None:
        cold = found["groups"].get(group, {}).get(what)
        warm = found["groups"].get("warm", {}).get(what)
        return cold / warm if cold is not None and warm else None

    found["cold_over_warm_first_step"] = ratio("cold (all)", "first_step_s_median")
    found["cold_over_warm_trainer_ready"] = ratio("cold (all)", "trainer_ready_s_median")
    # Side by side: each cold job against the warm job right after it (same base, seconds
    # apart, so under the same load), then the median of those ratios.
    found["paired_cold_over_warm_first_step"] = paired_ratio(jobs, "first_step_s")
    found["paired_cold_over_warm_trainer_ready"] = paired_ratio(jobs, "trainer_ready_s")
    found["warm_target_met"] = (
        found["paired_cold_over_warm_first_step"] or 0
    ) >= WARM_TARGET_RATIO
    return found


def paired_ratio(jobs: list[JobTiming], what: str) -> float | None:
    ratios = []
    for cold in (t for t in jobs if t.kind.startswith("cold")):
        warm = next((t for t in jobs if t.kind == "warm" and t.round == cold.round), None)
        cold_value = getattr(cold, what)
        warm_value = getattr(warm, what) if warm else None
        if cold_value is not None and warm_value:
            ratios.append(cold_value / warm_value)
    return statistics.median(ratios) if ratios else None


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def tables(timings: list[JobTiming], summary: dict[str, Any]) -> str:
    jobs = format_table(
        ["job", "series", "base", "kind", "POST ms", "claim ms", "trainer ready s",
         "first step s", "cache"],
        [[str(t.n), t.series, t.base, t.kind, _f(t.post_ms, ".0f"), _f(t.claim_ms, ".0f"),
          _f(t.trainer_ready_s, ".2f"), _f(t.first_step_s, ".2f"),
          t.error or ("reused" if (t.cache_line or "").startswith("base model reused")
                      else "loaded")]
         for t in timings],
    )
    parts = [jobs]
    for series, found in summary["series"].items():
        groups = found["groups"]
        names = list(groups)
        medians = format_table(
            [f"{series}: median (s)", *[f"{g} ({groups[g]['jobs']})" for g in names]],
            [["claim", *[_f(_ms_to_s(groups[g]["claim_ms_median"]), ".3f") for g in names]]]
            + [[span, *[_f(groups[g]["spans_s_median"][span], ".3f") for g in names]]
               for span, _ in SPANS[1:]]
            + [["**POST to trainer ready**",
                *[_f(groups[g]["trainer_ready_s_median"], ".2f") for g in names]],
               ["**POST to first step**",
                *[_f(groups[g]["first_step_s_median"], ".2f") for g in names]]],
        )
        parts.append(
            f"{series}: where the time goes before the first step (medians; spans end at the "
            f"job's log line named in bench/README.md)\n\n{medians}\n\n"
            f"{series}: cold / warm, POST to first step: "
            f"{_f(found['paired_cold_over_warm_first_step'], '.2f')}x side by side (median of "
            f"the rounds' ratios; target >= {WARM_TARGET_RATIO:g}x: "
            f"{'met' if found['warm_target_met'] else 'missed'}), "
            f"{_f(found['cold_over_warm_first_step'], '.2f')}x as ratio of medians; POST to "
            f"trainer ready: {_f(found['paired_cold_over_warm_trainer_ready'], '.2f')}x side by "
            f"side, {_f(found['cold_over_warm_trainer_ready'], '.2f')}x"
        )
    return "\n\n".join(parts)


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny random Llama, fewer rounds: checks the script works")
    parser.add_argument("--model-dir", type=Path, help="a local causal LM instead of SmolLM2")
    parser.add_argument("--rounds", help="pairs of jobs (cold, warm) per series, e.g. "
                        "lora=5,qlora=3 (the default; quick: lora=2,qlora=1); 0 skips one")
    parser.add_argument("--train-rows", type=int, default=4,
                        help="rows each job trains on (4: one optimizer step at batch 4)")
    parser.add_argument("--pause", type=float, default=2.0,
                        help="seconds between a job's end and the next POST (idle worker)")
    parser.add_argument("--job-timeout", type=float, default=240)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the worker (OMP_NUM_THREADS); 0: torch's own "
                        "(all cores). Default 1: with two threads on two busy cores one "
                        "optimizer step took 1.5 to 42 s here, with one a steady 1.7 s")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-work-dir", action="store_true",
                        help="keep the API and worker logs (kept anyway when a job failed)")
    args = parser.parse_args(argv)
    plan = list(QUICK_SERIES if args.quick else FULL_SERIES)
    if args.rounds:
        counts = dict(item.split("=") for item in args.rounds.split(","))
        plan = [Series(s.name, s.quantized, int(counts.get(s.name, s.rounds))) for s in plan]
    plan = [s for s in plan if s.rounds > 0]

    started = time.perf_counter()
    machine = machine_info()
    model_a = prepare_model(args.quick, args.model_dir)
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="queue_latency-", dir=SCRATCH_DIR))
    model_b = linked_copy(model_a, run_dir / "models" / f"{model_a.name}-copy")
    print(f"bases: A {model_a}, B {model_b} (hard links); work dir and logs: {run_dir}",
          flush=True)

    from sqlalchemy import create_engine

    from cli.local_stack import LocalStack

    timings: list[JobTiming] = []
    worker_ready_s = None
    failed = False
    with fresh_postgres(args.postgres_admin_url) as database_url, \
            empty_redis_db(args.redis_url) as broker_url:
        env = stack_env(run_dir / "data", database_url, broker_url,
                        [model_a.parent, model_b.parent, ASSETS_DIR], args.threads)
        engine = create_engine(database_url)
        try:
            with LocalStack(env=env, log_dir=run_dir / "logs") as stack:
                worker_ready_s = wait_for_worker(run_dir / "logs" / "worker.log", 180)
                key = create_key(env)
                time.sleep(args.pause)
                with httpx.Client(base_url=stack.base_url, timeout=60,
                                  headers={"Authorization": f"Bearer {key}"}) as client:
                    for series in plan:
                        for r in range(series.rounds):
                            base, model_dir = ("A", model_a) if r % 2 == 0 else ("B", model_b)
                            first = not timings
                            cold = "cold (fresh worker)" if first else "cold (other base)"
                            for kind in (cold, "warm"):
                                timing = JobTiming(n=len(timings) + 1, series=series.name,
                                                   round=r, base=base, kind=kind)
                                print(f"job {timing.n}: {series.name}, base {base}, {kind} ...",
                                      flush=True)
                                body = payload(model_dir, series.quantized, args.train_rows)
                                run_one(client, engine, timing, body, args.job_timeout)
                                timings.append(timing)
                                if timing.error:
                                    print(f"  {timing.error}", file=sys.stderr)
                                time.sleep(args.pause)
        finally:
            engine.dispose()
    failed = any(t.error for t in timings)

    summary = summarize(timings)
    print()
    print(tables(timings, summary))
    print()
    print(f"claim, median of {len(timings)} jobs: {_f(summary['claim_ms_median_all_jobs'], '.0f')}"
          f" ms (target <= {CLAIM_TARGET_MS:.0f} ms: "
          f"{'met' if summary['claim_target_met'] else 'missed'})")
    if not summary["cache_hits_as_planned"]:
        print("warning: the cache did not hit / miss as planned; see the cache column")

    total = time.perf_counter() - started
    machine["load_average_at_end"] = load_average()
    path = write_results("queue_latency", {
        "benchmark": "queue_latency",
        "quick": args.quick,
        "machine": machine,
        "model": model_a.name,
        "series": [asdict(series) for series in plan],
        "train_rows": args.train_rows,
        "worker_threads": args.threads,
        "pause_s": args.pause,
        "worker_ready_s": worker_ready_s,
        "jobs": [asdict(t) for t in timings],
        "summary": summary,
        "total_seconds": total,
    }, args.results_dir)
    print(f"total {total:.0f} s; wrote {path}")
    if not failed and not args.keep_work_dir:
        shutil.rmtree(run_dir, ignore_errors=True)  # kept when a job failed: its logs are there
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
