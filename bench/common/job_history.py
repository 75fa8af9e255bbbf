"""A throwaway PostgreSQL database holding a service's job history, for the API load benchmark.

`scratch_database()` creates an empty database of its own and drops it afterwards;
`seed_history()` fills it with tenants, keys, jobs and their status events through COPY, in
seconds for 100,000 jobs. The rows look like what a year of real use leaves: jobs spread over
the year, mostly finished (completed, some failed or cancelled, a few still active), each with
the payload the API stored, the result or error the worker wrote and the events of its
transitions. Log lines and metrics are left out: none of the routes the benchmark calls reads
those tables.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

BASE_MODELS = (
    "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct", "google/gemma-2-2b-it", "microsoft/Phi-3.5-mini-instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
)
HUB_DATASETS = (
    "tatsu-lab/alpaca", "yahma/alpaca-cleaned", "databricks/databricks-dolly-15k",
    "Open-Orca/OpenOrca", "garage-bAInd/Open-Platypus", "HuggingFaceH4/no_robots",
    "teknium/GPTeacher-General-Instruct", "sahil2801/CodeAlpaca-20k",
)
ALPACA_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
FAILURES = (
    "dataset error: column 'output' is missing; the template names instruction, input, output",
    "CUDA out of memory while training at step 212; lower cutoff_len or use_quantization",
    "worker lost in each of the 3 attempts allowed (last: gpu-a100-7); the job may be "
    "crashing its worker, e.g. out of memory",
    "timeout: still running after the hard time limit of 88200 s",
    "could not download tatsu-lab/alpaca: 503 Service Unavailable from the hub",
)
JOB_COLUMNS = (
    "id", "tenant_id", "status", "phase", "progress", "error", "payload", "base_model",
    "attempt", "max_attempts", "lease_owner", "lease_expires_at", "cancel_requested", "result",
    "created_at", "updated_at", "started_at", "attempt_started_at", "finished_at",
)
EVENT_COLUMNS = ("job_id", "from_status", "to_status", "attempt", "reason", "at")


@dataclass(frozen=True)
class HistoryPlan:
    jobs: int
    tenants: int
    bench_share: float
    """The share of all jobs that belongs to the benchmark key's tenant."""
    days: int = 365
    seed: int = 8


@dataclass(frozen=True)
class SeededHistory:
    bench_tenant_id: str
    bench_job_ids: list[str]
    jobs_per_tenant: dict[str, int]
    events: int


@contextmanager
def scratch_database(prefix: str = "tunery_bench") -> Iterator[str]:
    """A fresh, empty database on the machine's PostgreSQL, dropped (connections and all)
    afterwards; yields its SQLAlchemy URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def tenant_sizes(plan: HistoryPlan) -> list[int]:
    """Jobs per tenant, the benchmark's tenant first: it holds `bench_share` of the jobs, the
    others split the rest in a long tail (weight 1/rank), as a few big customers and many
    small ones would."""
    bench = round(plan.jobs * plan.bench_share)
    others = plan.tenants - 1
    weights = [1 / rank for rank in range(1, others + 1)]
    rest = plan.jobs - bench
    sizes = [max(1, int(rest * w / sum(weights))) for w in weights]
    sizes[0] += rest - sum(sizes)  # rounding leftovers to the biggest
    return [bench, *sizes]


def monsterapi_request(rng: random.Random) -> dict[str, Any]:
    """A MonsterAPI payload as the official client's users send it, with the choices real
    jobs vary in (model, dataset, LoRA rank, learning rate...)."""
    model = rng.choice(BASE_MODELS)
    quantized = "7B" in model or "8B" in model
    return {
        "pretrainedmodel_config": {
            "model_path": model, "use_lora": True, "lora_r": rng.choice((8, 16, 32, 64)),
            "lora_alpha": rng.choice((16, 32, 64)), "lora_dropout": rng.choice((0, 0.05, 0.1)),
            "lora_bias": "none", "use_quantization": quantized,
            "use_gradient_checkpointing": quantized, "parallelization": "nmp",
        },
        "data_config": {
            "data_path": rng.choice(HUB_DATASETS), "data_subset": "default",
            "data_source_type": "hub_link", "prompt_template": ALPACA_TEMPLATE,
            "cutoff_len": rng.choice((256, 512, 1024, 2048)), "prevalidated": False,
        },
        "training_config": {
            "early_stopping_patience": 5, "num_train_epochs": rng.choice((1, 2, 3)),
            "gradient_accumulation_steps": rng.choice((1, 4, 8)),
            "warmup_steps": rng.choice((1, 50, 100)),
            "learning_rate": rng.choice((1e-4, 2e-4, 5e-4, 1e-3)),
            "lr_scheduler_type": rng.choice(("linear", "cosine", "reduce_lr_on_plateau")),
            "group_by_length": rng.random() < 0.5,
        },
        "logging_config": {"use_wandb": False},
    }


def _stored_payload(rng: random.Random) -> dict[str, Any]:
    """The payload column as the API writes it: the validated request with its defaults."""
    from shared.schema import FinetuneRequest

    return FinetuneRequest.model_validate(monsterapi_request(rng)).model_dump(mode="json")


def _job_rows(job_id: str, tenant_id: str, created: datetime, now: datetime,
              rng: random.Random) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """One job row and its events, in the state a job created at `created` would be in now."""
    payload = _stored_payload(rng)
    started = created + timedelta(seconds=rng.uniform(2, 600))
    finished = started + timedelta(seconds=rng.uniform(300, 6 * 3600))
    owner = f"gpu-worker-{rng.randrange(16)}"
    queued_event = (job_id, None, "QUEUED", 0, None, created)
    claimed_event = (job_id, "QUEUED", "RUNNING", 1, f"claimed by {owner}", started)
    if finished > now:  # still running, or not yet picked up
        if started > now:
            status, events = "QUEUED", [queued_event]
            row_started = None
        else:
            status, events = "RUNNING", [queued_event, claimed_event]
            row_started = started
        return (job_id, tenant_id, status, "training" if row_started else None,
                0.4 if row_started else 0.0, None, json.dumps(payload),
                payload["pretrainedmodel_config"]["model_path"], 1 if row_started else 0, 3,
                owner if row_started else None,
                now + timedelta(seconds=120) if row_started else None, False, None, created,
                row_started or created, row_started, row_started, None), events
    draw = rng.random()
    result = error = None
    if draw < 0.82:
        status, progress = "COMPLETED", 1.0
        steps = rng.randrange(50, 5000)
        result = {"steps": steps, "first_loss": round(rng.uniform(1.8, 3.2), 4),
                  "last_loss": round(rng.uniform(0.4, 1.6), 4), "train_rows": steps * 4,
                  "eval_rows": steps // 2, "best_eval_loss": round(rng.uniform(0.5, 1.7), 4),
                  "best_step": steps - rng.randrange(0, 50),
                  "artifacts": ["adapter_config.json", "adapter_model.safetensors",
                                "tokenizer.json", "tokenizer_config.json", "metrics.json",
                                "logs.txt"]}
        reason = None
    elif draw < 0.94:
        status, progress = "FAILED", round(rng.uniform(0, 0.9), 3)
        error = reason = rng.choice(FAILURES)
    else:
        status, progress = "CANCELLED", round(rng.uniform(0, 0.9), 3)
        reason = "cancelled by the user"
    end_event = (job_id, "RUNNING", status, 1, reason, finished)
    row = (job_id, tenant_id, status, None, progress, error, json.dumps(payload),
           payload["pretrainedmodel_config"]["model_path"], 1, 3, None, None,
           status == "CANCELLED", json.dumps(result) if result else None, created, finished,
           started, started, finished)
    return row, [queued_event, claimed_event, end_event]


def seed_history(database_url: str, plan: HistoryPlan, bench_tenant_id: str) -> SeededHistory:
    """Fill the migrated, empty database at `database_url` with `plan.jobs` jobs, the first
    tenant being `bench_tenant_id` (already created with the benchmark's key), then VACUUM
    ANALYZE, as autovacuum would have long done on a real database."""
    import psycopg

    rng = random.Random(plan.seed)
    now = datetime.now(UTC)
    tenant_ids = [bench_tenant_id] + [str(uuid.uuid4()) for _ in range(plan.tenants - 1)]
    sizes = tenant_sizes(plan)
    bench_job_ids: list[str] = []
    events = 0
    with psycopg.connect(libpq_url(database_url)) as conn, conn.cursor() as cur:
        with cur.copy("COPY tenants (id, name, created_at) FROM STDIN") as copy:
            for i, tenant_id in enumerate(tenant_ids[1:], start=1):
                copy.write_row((tenant_id, f"tenant-{i:03d}", now - timedelta(days=plan.days)))
        with cur.copy("COPY api_keys (id, tenant_id, name, prefix, secret_hash, role, "
                      "created_at) FROM STDIN") as copy:
            for tenant_id in tenant_ids[1:]:
                for k in range(rng.choice((1, 1, 2, 3))):
                    copy.write_row((str(uuid.uuid4()), tenant_id, f"key-{k}",
                                    uuid.uuid4().hex[:12], uuid.uuid4().hex * 2, "member",
                                    now - timedelta(days=plan.days)))
        event_rows: list[tuple[Any, ...]] = []
        with cur.copy(f"COPY jobs ({', '.join(JOB_COLUMNS)}) FROM STDIN") as copy:
            for tenant_id, size in zip(tenant_ids, sizes, strict=True):
                for _ in range(size):
                    job_id = str(uuid.uuid4())
                    created = now - timedelta(seconds=rng.uniform(0, plan.days * 86400))
                    row, job_events = _job_rows(job_id, tenant_id, created, now, rng)
                    copy.write_row(row)
                    event_rows.extend(job_events)
                    if tenant_id == bench_tenant_id:
                        bench_job_ids.append(job_id)
        with cur.copy(f"COPY job_events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
            for event in event_rows:
                copy.write_row(event)
        events = len(event_rows)
        conn.commit()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return SeededHistory(bench_tenant_id, bench_job_ids, dict(zip(tenant_ids, sizes,
                                                                  strict=True)), events)
