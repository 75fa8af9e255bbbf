"""API under load: submit and poll against uvicorn on PostgreSQL + Redis holding 100,000 jobs.

    .venv/bin/python -m bench.api_load             # 100,000 jobs, 2 uvicorn workers, ~3 min
    .venv/bin/python -m bench.api_load --quick     # 2,000 jobs, a second per endpoint

Creates its own PostgreSQL database (migrated, then seeded with a year of job history over 50
tenants) and its own queue on Redis, starts `uvicorn api.main:app --workers N` against them,
and drives it from this process with a fixed number of concurrent asyncio clients: each of
POST /v1/finetune/llm, GET /v1/finetune/llm/{id}, GET /v1/finetune/llm and GET /v1/me (the
trivial authenticated route: the ceiling) on its own, in alternating rounds, then all of them
mixed as clients that submit and poll. Prints a table and writes bench/results/api_load.json.
The database and the queue are removed afterwards. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common.api_server import api_server, cpu_by_pid, cpu_spent, process_tree
from bench.common.http_load import Step, Tally, run_phase, summarize
from bench.common.job_history import (
    HistoryPlan,
    SeededHistory,
    libpq_url,
    monsterapi_request,
    scratch_database,
    seed_history,
)
from bench.common.machine import (
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    load_average,
    machine_info,
    write_results,
)

REDIS_URL = "redis://127.0.0.1:6379"
# Outside 1-14, the numbers tests/conftest.py's `redis_url` picks and flushes; the queue name
# is the run's own, so two benchmark runs at once do not mix either.
REDIS_DB = 15
# The rate limit (per key, per API process) would cap the benchmark's one key at 2 requests
# a second: off. The active-jobs cap stays on, raised above anything a run submits, so every
# POST still takes the tenant lock and counts the tenant's active jobs as in production.
SERVER_LIMITS = {"TUNERY_RATE_LIMIT_PER_MINUTE": "0",
                 "TUNERY_MAX_ACTIVE_JOBS_PER_TENANT": "1000000"}

TRIVIAL, POST, STATUS, LIST = "GET /v1/me", "POST /v1/finetune/llm", \
    "GET /v1/finetune/llm/{id}", "GET /v1/finetune/llm"
ENDPOINTS = (TRIVIAL, POST, STATUS, LIST)
POST_VS_TRIVIAL_THROUGHPUT = 0.5
STATUS_VS_TRIVIAL_P99 = 2.0


@dataclass(frozen=True)
class LoadPlan:
    history: HistoryPlan
    concurrency: int
    seconds_per_phase: float
    rounds: int
    """Each endpoint runs once per round, in turn, so a change in the machine's load during
    the run spreads over all of them instead of landing on one."""
    warmup_s: float
    mixed_s: float
    polls_per_submit: int = 3


FULL_PLAN = LoadPlan(HistoryPlan(jobs=100_000, tenants=50, bench_share=0.10), concurrency=16,
                     seconds_per_phase=8, rounds=3, warmup_s=2, mixed_s=16)
QUICK_PLAN = LoadPlan(HistoryPlan(jobs=2_000, tenants=5, bench_share=0.2), concurrency=4,
                      seconds_per_phase=1, rounds=1, warmup_s=0.5, mixed_s=2)


@contextmanager
def scratch_queue() -> Iterator[tuple[str, str]]:
    """(broker URL, queue name) of a queue of this run's own; its keys are deleted after."""
    import redis

    queue = f"bench-api-load-{uuid.uuid4().hex[:8]}"
    url = f"{REDIS_URL}/{REDIS_DB}"
    try:
        yield url, queue
    finally:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)


def waiting_messages(broker_url: str, queue: str) -> int:
    import redis

    return int(redis.Redis.from_url(broker_url).llen(queue))


def create_bench_key(database_url: str) -> tuple[str, str]:
    """(tenant id, plaintext) of the benchmark's key, made the way `tunery keys create` does."""
    from sqlalchemy.orm import Session

    from shared.db import make_engine
    from shared.keys import create_api_key

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            key = create_api_key(session, "bench-client", "bench-tenant")
            session.commit()
            return key.tenant_id, key.plaintext
    finally:
        engine.dispose()


def commit_latency_ms(database_url: str, commits: int = 50) -> float:
    """The median time of a one-row INSERT and its COMMIT: mostly PostgreSQL's WAL flush to
    this machine's disk. A submit holds its tenant's lock through its commit, so one tenant's
    submits can follow each other no faster than this."""
    import psycopg

    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("CREATE TABLE bench_commit_probe (n integer)")
        conn.commit()
        times = []
        for n in range(commits):
            started = time.perf_counter()
            conn.execute("INSERT INTO bench_commit_probe VALUES (%s)", (n,))
            conn.commit()
            times.append(time.perf_counter() - started)
        conn.execute("DROP TABLE bench_commit_probe")
        conn.commit()
    return 1000 * sorted(times)[len(times) // 2]


def finish_submitted_jobs(database_url: str, tenant_id: str, job_ids: list[str]) -> int:
    """Mark the jobs the clients submitted COMPLETED, as workers would have done in time.

    Every POST counts its tenant's queued and running jobs with the tenant locked. No worker
    runs here, so without this the count would grow by every job of every earlier phase and
    the POST figures would depend on the order and length of the run. Called between phases,
    outside the measured time.
    """
    import psycopg

    if not job_ids:
        return 0
    with psycopg.connect(libpq_url(database_url)) as conn:
        done = conn.execute(
            "UPDATE jobs SET status = 'COMPLETED', progress = 1, finished_at = now(), "
            "updated_at = now() WHERE tenant_id = %s AND status = 'QUEUED' AND id = ANY(%s)",
            (tenant_id, job_ids)).rowcount
        conn.commit()
    return done


def active_jobs_of(database_url: str, tenant_id: str) -> int:
    import psycopg

    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE tenant_id = %s AND status IN "
                           "('QUEUED', 'RUNNING')", (tenant_id,)).fetchone()
    return int(row[0]) if row else 0


class DatabaseWatch:
    """CPU of the PostgreSQL backends serving the benchmark's database, and the sessions
    opened on it: a pool too small for the load shows up as connections opened per request."""

    def __init__(self, database_url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(libpq_url(database_url), autocommit=True)

    def sample(self) -> tuple[dict[int, float], int]:
        pids = [row[0] for row in self.conn.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")]
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        sessions = self.conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return cpu_by_pid(pids), int(sessions[0]) if sessions else 0

    def close(self) -> None:
        self.conn.close()


@dataclass
class Steps:
    """The requests the clients send, sharing the job ids they know of."""

    job_ids: list[str]
    rng: random.Random

    def __post_init__(self) -> None:
        self.last_submitted: dict[int, str] = {}
        self.unfinished: list[str] = []
        """Submitted and not yet marked finished (see `finish_submitted_jobs`)."""
        self.submitted = 0

    def remember(self, response: httpx.Response, i: int) -> None:
        job_id = response.json()["job_id"]
        self.job_ids.append(job_id)
        self.unfinished.append(job_id)
        self.last_submitted[i] = job_id
        self.submitted += 1

    async def me(self, client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/v1/me")

    async def submit(self, client: httpx.AsyncClient, i: int) -> httpx.Response:
        # A client that retries safely sends an Idempotency-Key: the costlier path.
        return await client.post("/v1/finetune/llm", json=monsterapi_request(self.rng),
                                 headers={"Idempotency-Key": str(uuid.uuid4())})

    async def status(self, client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get(f"/v1/finetune/llm/{self.rng.choice(self.job_ids)}")

    async def own_status(self, client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get(f"/v1/finetune/llm/{self.last_submitted[i]}")

    async def listing(self, client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/v1/finetune/llm")

    def alone(self) -> dict[str, Step]:
        return {
            TRIVIAL: Step(TRIVIAL, self.me, 200),
            POST: Step(POST, self.submit, 201, self.remember),
            STATUS: Step(STATUS, self.status, 200),
            LIST: Step(LIST, self.listing, 200),
        }

    def submit_and_poll(self, polls: int) -> list[Step]:
        return [Step(POST, self.submit, 201, self.remember),
                *[Step(STATUS, self.own_status, 200)] * polls,
                Step(LIST, self.listing, 200)]


async def drive(base_url: str, plaintext: str, server_pid: int, database_url: str,
                tenant_id: str, plan: LoadPlan, job_ids: list[str]) -> dict[str, Any]:
    """Every phase against the running server; per endpoint, the tallies and CPU of all its
    phases together, and each phase on its own."""
    steps = Steps(list(job_ids), random.Random(42))
    alone = steps.alone()
    watch = DatabaseWatch(database_url)
    limits = httpx.Limits(max_connections=plan.concurrency,
                          max_keepalive_connections=plan.concurrency)
    totals = {name: {"tally": Tally(), "seconds": 0.0, "server_cpu_s": 0.0, "db_cpu_s": 0.0,
                     "client_cpu_s": 0.0, "db_sessions": 0} for name in ENDPOINTS}
    phases: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60,
                                 headers={"Authorization": f"Bearer {plaintext}"}) as client:

        async def measured(name: str, loop: list[Step], seconds: float) -> dict[str, Any]:
            server_before = cpu_by_pid(process_tree(server_pid))
            db_before, sessions_before = watch.sample()
            client_before = time.process_time()
            tallies, elapsed = await run_phase(client, loop, plan.concurrency, seconds)
            client_cpu = time.process_time() - client_before
            server_cpu = cpu_spent(server_before, cpu_by_pid(process_tree(server_pid)))
            db_after, sessions_after = watch.sample()
            return {"phase": name, "seconds": elapsed, "tallies": tallies,
                    "server_cpu_s": server_cpu, "db_cpu_s": cpu_spent(db_before, db_after),
                    "client_cpu_s": client_cpu, "db_sessions": sessions_after - sessions_before,
                    "load_average": load_average()}

        def finish_submitted() -> None:
            finish_submitted_jobs(database_url, tenant_id, steps.unfinished)
            steps.unfinished.clear()

        for name in ENDPOINTS:  # fills connection pools, caches, the clients' connections
            await run_phase(client, [alone[name]], plan.concurrency, plan.warmup_s)
        for round_no in range(plan.rounds):
            for name in ENDPOINTS:
                finish_submitted()
                phase = await measured(name, [alone[name]], plan.seconds_per_phase)
                total = totals[name]
                total["tally"].latencies_s.extend(phase["tallies"][name].latencies_s)
                total["tally"].errors.update(phase["tallies"][name].errors)
                total["tally"].error_samples.extend(phase["tallies"][name].error_samples)
                for field in ("seconds", "server_cpu_s", "db_cpu_s", "client_cpu_s",
                              "db_sessions"):
                    total[field] += phase[field]
                phases.append(_phase_record(phase, round_no))
                print(f"  round {round_no + 1} {name}: "
                      f"{phases[-1]['endpoints'][name]['requests_per_s']:.0f} req/s", flush=True)
        finish_submitted()
        mixed = await measured("submit and poll", steps.submit_and_poll(plan.polls_per_submit),
                               plan.mixed_s)
    watch.close()
    results = {}
    for name, total in totals.items():
        summary = summarize(total["tally"], total["seconds"])
        summary.update(_cpu_per_request(total, summary["requests"]))
        results[name] = summary
    return {"endpoints": results, "phases": phases, "mixed": _phase_record(mixed, None),
            "jobs_submitted": steps.submitted}


def _cpu_per_request(phase: dict[str, Any], requests: int) -> dict[str, Any]:
    per = (lambda s: 1000 * s / requests) if requests else (lambda s: None)
    return {"server_cpu_ms_per_request": per(phase["server_cpu_s"]),
            "db_cpu_ms_per_request": per(phase["db_cpu_s"]),
            "client_cpu_ms_per_request": per(phase["client_cpu_s"]),
            "db_sessions_opened": phase["db_sessions"]}


def _phase_record(phase: dict[str, Any], round_no: int | None) -> dict[str, Any]:
    tallies: dict[str, Tally] = phase["tallies"]
    endpoints = {name: summarize(t, phase["seconds"]) for name, t in tallies.items()}
    requests = sum(t.requests for t in tallies.values())
    return {"phase": phase["phase"], "round": round_no, "seconds": phase["seconds"],
            "load_average_at_end": phase["load_average"], "requests": requests,
            "requests_per_s": requests / phase["seconds"], "endpoints": endpoints,
            **_cpu_per_request(phase, requests)}


def ratios(endpoints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    trivial, post, status = endpoints[TRIVIAL], endpoints[POST], endpoints[STATUS]
    throughput = post["requests_per_s"] / trivial["requests_per_s"]
    p99 = status["p99_ms"] / trivial["p99_ms"]
    errors = sum(e["errors"] for e in endpoints.values())
    return {
        "post_vs_trivial_throughput": throughput,
        "post_vs_trivial_throughput_target": POST_VS_TRIVIAL_THROUGHPUT,
        "post_vs_trivial_throughput_met": throughput >= POST_VS_TRIVIAL_THROUGHPUT,
        "status_vs_trivial_p99": p99,
        "status_vs_trivial_p99_target": STATUS_VS_TRIVIAL_P99,
        "status_vs_trivial_p99_met": p99 <= STATUS_VS_TRIVIAL_P99,
        "errors": errors,
        "no_errors_met": errors == 0,
    }


def _ms(value: float | None, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value, fmt)


def table(endpoints: dict[str, dict[str, Any]], with_cpu: bool = True) -> str:
    headers = ["endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    cpu_headers = ["server CPU ms/req", "PostgreSQL CPU ms/req", "client CPU ms/req",
                   "DB sessions opened"]
    rows = []
    for name, r in endpoints.items():
        row = [name, str(r["requests"]), _ms(r["requests_per_s"], ".0f"), _ms(r["p50_ms"]),
               _ms(r["p95_ms"]), _ms(r["p99_ms"]), str(r["errors"])]
        if with_cpu:
            row += [_ms(r["server_cpu_ms_per_request"], ".2f"),
                    _ms(r["db_cpu_ms_per_request"], ".2f"),
                    _ms(r["client_cpu_ms_per_request"], ".2f"), str(r["db_sessions_opened"])]
        rows.append(row)
    return format_table(headers + (cpu_headers if with_cpu else []), rows)


def print_errors(endpoints: dict[str, dict[str, Any]]) -> None:
    for name, r in endpoints.items():
        for sample in r["error_samples"]:
            print(f"error on {name}: {sample}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 jobs and a second per endpoint: checks the script works")
    parser.add_argument("--workers", type=int, default=2,
                        help="uvicorn worker processes (default 2: one per core of the "
                             "2-core machine the figures in bench/README.md come from)")
    parser.add_argument("--launcher", choices=("tunery", "uvicorn"), default="tunery",
                        help="tunery: `tunery api --workers N`; uvicorn: `uvicorn --workers N`, "
                             "which leaves Nagle's algorithm on (api/serve.py)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients")
    parser.add_argument("--seconds", type=float, help="seconds per endpoint per round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--jobs", type=int, help="jobs in the database before the run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    plan = QUICK_PLAN if args.quick else FULL_PLAN
    history = plan.history if args.jobs is None else HistoryPlan(
        args.jobs, plan.history.tenants, plan.history.bench_share)
    plan = LoadPlan(history, args.concurrency or plan.concurrency,
                    args.seconds or plan.seconds_per_phase, args.rounds or plan.rounds,
                    plan.warmup_s, plan.mixed_s, plan.polls_per_submit)
    started = time.perf_counter()
    machine = machine_info()
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="api_load-", dir=SCRATCH_DIR))

    with scratch_database() as database_url, scratch_queue() as (broker_url, queue):
        from cryptography.fernet import Fernet

        from shared.migrate import upgrade_database

        upgrade_database(database_url)
        tenant_id, plaintext = create_bench_key(database_url)
        seeding = time.perf_counter()
        seeded: SeededHistory = seed_history(database_url, history, tenant_id)
        seed_s = time.perf_counter() - seeding
        print(f"seeded {history.jobs} jobs ({len(seeded.bench_job_ids)} the benchmark "
              f"tenant's) and {seeded.events} events over {history.tenants} tenants in "
              f"{seed_s:.1f} s", flush=True)
        commit_ms = commit_latency_ms(database_url)
        print(f"PostgreSQL INSERT + COMMIT on this machine: {commit_ms:.2f} ms (median)",
              flush=True)
        env = {
            "TUNERY_DATABASE_URL": database_url,
            "TUNERY_BROKER_URL": broker_url,
            "TUNERY_QUEUE_NAME": queue,
            "TUNERY_DATA_DIR": str(run_dir / "data"),
            "TUNERY_STORAGE_URL": (run_dir / "storage").as_uri(),
            # Given, not generated: N workers would each race to write data_dir/secret.key.
            "TUNERY_SECRET_KEY": Fernet.generate_key().decode(),
            # Migrated above, as `tunery db upgrade` does before the API image's uvicorn.
            "TUNERY_AUTO_MIGRATE": "false",
            **SERVER_LIMITS,
        }
        log_path = run_dir / "uvicorn.log"
        print(f"{args.launcher} --workers {args.workers}, {plan.concurrency} concurrent clients, "
              f"{plan.rounds} x {plan.seconds_per_phase:g} s per endpoint; log: {log_path}",
              flush=True)
        with api_server(env, args.workers, log_path, args.launcher) as (base_url, server_pid):
            measured = asyncio.run(drive(base_url, plaintext, server_pid, database_url,
                                         tenant_id, plan, seeded.bench_job_ids))
        published = waiting_messages(broker_url, queue)
        active_at_end = active_jobs_of(database_url, tenant_id)

    endpoints = measured["endpoints"]
    summary = ratios(endpoints)
    machine["load_average_at_end"] = load_average()
    print()
    print(f"{history.jobs} jobs in the database; uvicorn --workers {args.workers}; "
          f"{plan.concurrency} concurrent clients; load average "
          f"{machine['load_average_at_start']} at start, {machine['load_average_at_end']} at end")
    print(table(endpoints))
    mixed = measured["mixed"]
    print(f"\nsubmit and poll (POST, {plan.polls_per_submit} x GET status, GET list per "
          f"client loop, {plan.mixed_s:g} s): {mixed['requests_per_s']:.0f} req/s")
    print(table(mixed["endpoints"], with_cpu=False))
    print(f"CPU per request over the phase: server {_ms(mixed['server_cpu_ms_per_request'], '.2f')}"
          f" ms, PostgreSQL {_ms(mixed['db_cpu_ms_per_request'], '.2f')} ms, client "
          f"{_ms(mixed['client_cpu_ms_per_request'], '.2f')} ms; DB sessions opened "
          f"{mixed['db_sessions_opened']}")
    print()
    verdict = {True: "met", False: "MISSED"}
    print(f"POST / trivial throughput: {summary['post_vs_trivial_throughput']:.2f} "
          f"(target >= {POST_VS_TRIVIAL_THROUGHPUT}: "
          f"{verdict[summary['post_vs_trivial_throughput_met']]})")
    print(f"GET status p99 / trivial p99: {summary['status_vs_trivial_p99']:.2f} "
          f"(target <= {STATUS_VS_TRIVIAL_P99}: "
          f"{verdict[summary['status_vs_trivial_p99_met']]})")
    mixed_errors = sum(r["errors"] for r in mixed["endpoints"].values())
    all_errors = summary["errors"] + mixed_errors
    print(f"errors: {all_errors} (target: none: {verdict[all_errors == 0]})")
    print(f"wake-up messages on the queue: {published} for {measured['jobs_submitted']} jobs "
          f"submitted; the benchmark tenant's queued and running jobs at the end: "
          f"{active_at_end}")
    print_errors(endpoints)
    print_errors(mixed["endpoints"])

    total = time.perf_counter() - started
    path = write_results("api_load", {
        "benchmark": "api_load",
        "quick": args.quick,
        "machine": machine,
        "plan": asdict(plan),
        "uvicorn_workers": args.workers,
        "launcher": args.launcher,
        "server_settings": SERVER_LIMITS,
        "seed": {"seconds": seed_s, "jobs": history.jobs, "events": seeded.events,
                 "bench_tenant_jobs": len(seeded.bench_job_ids),
                 "jobs_per_tenant": sorted(seeded.jobs_per_tenant.values(), reverse=True)},
        "results": endpoints,
        "ratios": {**summary, "errors": all_errors, "no_errors_met": all_errors == 0},
        "mixed": mixed,
        "phases": measured["phases"],
        "database": database_url.rsplit("/", 1)[-1],
        "queue": queue,
        "commit_latency_ms": commit_ms,
        "jobs_submitted": measured["jobs_submitted"],
        "messages_published": published,
        "bench_tenant_active_jobs_at_end": active_at_end,
        "total_seconds": total,
    }, args.results_dir)
    print(f"total {total:.0f} s; wrote {path}")
    if all_errors:
        print(f"server log kept: {log_path}", file=sys.stderr)
        return 1
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
