"""One chaos test's Tunery: PostgreSQL behind a cuttable proxy, a private Redis, local
storage, and as many worker and API processes as the scenario starts and kills."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.queue import TRAIN_TASK, make_celery
from shared.settings import Settings
from shared.storage import S3Storage
from tests.chaos.job_records import TERMINAL, JobsDatabase, JobTrace
from tests.chaos.polling import wait_until
from tests.chaos.processes import ApiProcess, ServiceProcess, WorkerProcess, run_cli
from tests.chaos.redis_server import RedisServer
from tests.chaos.tcp_proxy import TcpProxy
from tests.conftest import ALPACA_TEMPLATE, ASSETS_DIR, make_payload


@dataclass(frozen=True)
class Timings:
    """Short enough that a lost worker is noticed in seconds, long enough for 2 busy cores."""

    lease_seconds: int = 4
    heartbeat_seconds: float = 0.5
    reaper_interval_s: float = 1.0
    max_attempts: int = 3
    checkpoint_every_steps: int = 2
    soft_time_limit_s: int = 300
    hard_time_limit_s: int = 360


def chaos_payload(model_dir: Path, epochs: int = 4) -> dict[str, Any]:
    """A tiny-model job of about 10 optimizer steps an epoch (40 in all by default): 150
    training rows at cutoff 64, 4 micro-batches of 4 per optimizer step. With a checkpoint
    every 2 steps it lasts long enough (3 to 8 s on two cores) to be killed mid-epoch."""
    return make_payload(
        model_path=str(model_dir),
        data_config={
            "cutoff_len": 64,
            "prompt_template": ALPACA_TEMPLATE,
            "data_split_config": {"train": 0.5, "validation": 0.05},
        },
        training_config={
            # Every planned step must run: the scenarios compare steps across attempts, and a
            # long job on this small dataset would otherwise stop early once it overfits.
            "early_stopping_patience": 1000,
            "num_train_epochs": epochs,
            "gradient_accumulation_steps": 4,
            "learning_rate": 0.005,
            "warmup_steps": 2,
            "lr_scheduler_type": "linear",
        },
    )


class ChaosStack:
    def __init__(self, *, work_dir: Path, database_url: str, proxy: TcpProxy,
                 redis: RedisServer, db: JobsDatabase, model_dir: Path,
                 timings: Timings) -> None:
        self.work_dir = work_dir
        self.log_dir = work_dir / "logs"
        self.storage_dir = work_dir / "storage"
        self.proxy = proxy
        self.redis = redis
        self.db = db
        self.model_dir = model_dir
        self.timings = timings
        self.processes: list[ServiceProcess] = []
        self.env = service_env(
            work_dir, database_url=database_url, broker_url=redis.url,
            storage_dir=self.storage_dir, allowed=[ASSETS_DIR, model_dir], timings=timings,
        )
        self.api: ApiProcess | None = None
        self.api_key: str | None = None

    def migrate(self) -> None:
        run_cli(self.env, "db", "upgrade")

    def start_worker(self, wait: bool = True, **env: str) -> WorkerProcess:
        """A worker with the stack's environment, `env` on top."""
        index = sum(isinstance(p, WorkerProcess) for p in self.processes) + 1
        worker = WorkerProcess(f"worker-{index}", {**self.env, **env},
                               self.log_dir / f"worker-{index}.log")
        self.processes.append(worker)
        return worker.wait_ready() if wait else worker

    def start_workers(self, count: int) -> list[WorkerProcess]:
        """`count` workers started together (their start-ups overlap), once all are ready."""
        workers = [self.start_worker(wait=False) for _ in range(count)]
        for worker in workers:
            worker.wait_ready()
        return workers

    def start_api(self) -> ApiProcess:
        """The API and an API key for it; migrations run first, before any worker races them."""
        self.api_key = run_cli(self.env, "keys", "create", "--name", "chaos", "--quiet"
                               ).strip().splitlines()[-1]
        self.api = ApiProcess("api", self.env, self.log_dir / "api.log")
        self.processes.append(self.api)
        self.api.wait_ready()
        return self.api

    def create_key(self, name: str) -> str:
        """Another API key, of a tenant of its own named `name`."""
        return run_cli(self.env, "keys", "create", "--name", name, "--quiet"
                       ).strip().splitlines()[-1]

    def client(self, timeout_s: float = 30, api_key: str | None = None) -> httpx.Client:
        """An API client with `api_key`, by default the key `start_api` created."""
        api_key = api_key or self.api_key
        assert self.api is not None and api_key is not None, "start_api() first"
        return httpx.Client(base_url=self.api.base_url, timeout=timeout_s,
                            headers={"Authorization": f"Bearer {api_key}"})

    def submit(self, client: httpx.Client, epochs: int = 4) -> str:
        response = client.post("/v1/finetune/llm", json=chaos_payload(self.model_dir, epochs))
        assert response.status_code == 201, (response.status_code, response.text)
        return str(response.json()["job_id"])

    def send_wakeup(self, job_id: str) -> str:
        """Send one more `train(job_id)` message, as the API or the reaper would; its task id."""
        app = make_celery(Settings(broker_url=self.redis.url,
                                   job_hard_time_limit_s=self.timings.hard_time_limit_s,
                                   job_soft_time_limit_s=self.timings.soft_time_limit_s,
                                   lease_seconds=self.timings.lease_seconds,
                                   heartbeat_seconds=self.timings.heartbeat_seconds,
                                   data_dir=self.work_dir / "sender"))
        try:
            return str(app.send_task(TRAIN_TASK, args=[job_id]).id)
        finally:
            app.close()

    def wait_for(self, job_id: str, what: str, condition: Callable[[JobTrace], bool],
                 timeout_s: float, interval_s: float = 0.1) -> JobTrace:
        """Poll the job's trace until `condition` holds; fail with the trace and worker logs."""
        def check() -> JobTrace | None:
            trace = self.db.trace(job_id)
            return trace if condition(trace) else None

        return wait_until(check, timeout_s=timeout_s, what=f"job {job_id}: {what}",
                          interval_s=interval_s, on_timeout=lambda: self.describe(job_id))

    def wait_terminal(self, job_id: str, timeout_s: float = 120) -> JobTrace:
        return self.wait_for(job_id, "a terminal status", lambda t: t.status in TERMINAL,
                             timeout_s, interval_s=0.25)

    def describe(self, job_id: str) -> str:
        logs = "\n".join(f"--- {p.name} ---\n{p.log_tail(1500)}" for p in self.processes)
        return f"{self.db.trace(job_id).summary()}\n{logs}"

    def storage_files(self, job_id: str) -> list[str]:
        if self.env["TUNERY_STORAGE_URL"].startswith("s3://"):  # `s3_server.service_env`
            store = S3Storage(urlsplit(self.env["TUNERY_STORAGE_URL"]).netloc,
                              endpoint_url=self.env["TUNERY_S3_ENDPOINT_URL"],
                              access_key_id=self.env["TUNERY_S3_ACCESS_KEY_ID"],
                              secret_access_key=self.env["TUNERY_S3_SECRET_ACCESS_KEY"])
            prefix = f"jobs/{job_id}/"
            return sorted(obj.key[len(prefix):] for obj in store.list(prefix))
        root = self.storage_dir / "jobs" / job_id
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def dump_logs(self) -> None:
        for log in sorted(self.log_dir.glob("*.log")):
            print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-8000:]}")


def service_env(work_dir: Path, *, database_url: str, broker_url: str, storage_dir: Path,
                allowed: list[Path], timings: Timings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env.update({
        "TUNERY_DATA_DIR": str(work_dir / "data"),
        "TUNERY_DATABASE_URL": database_url,
        "TUNERY_BROKER_URL": broker_url,
        "TUNERY_STORAGE_URL": storage_dir.as_uri(),
        "TUNERY_ALLOWED_LOCAL_DIRS": json.dumps([str(p) for p in allowed]),
        "TUNERY_LEASE_SECONDS": str(timings.lease_seconds),
        "TUNERY_HEARTBEAT_SECONDS": str(timings.heartbeat_seconds),
        "TUNERY_REAPER_INTERVAL_S": str(timings.reaper_interval_s),
        "TUNERY_MAX_ATTEMPTS": str(timings.max_attempts),
        "TUNERY_CHECKPOINT_EVERY_STEPS": str(timings.checkpoint_every_steps),
        "TUNERY_JOB_SOFT_TIME_LIMIT_S": str(timings.soft_time_limit_s),
        "TUNERY_JOB_HARD_TIME_LIMIT_S": str(timings.hard_time_limit_s),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Two workers share two cores in some scenarios: one thread each trains faster.
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env
