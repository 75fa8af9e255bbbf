"""The benchmarks still run end to end, in their quick mode (the training ones on the tiny
random Llama).

Only that they finish and write well-formed results is checked: timings on a shared CI
machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.settings import PROJECT_ROOT


def _run(module: str, results_dir: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--results-dir", str(results_dir), *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = module.rsplit(".", 1)[-1]
    return json.loads((results_dir / f"{name}.json").read_text())


def test_train_throughput_quick_runs_every_recipe(tmp_path: Path) -> None:
    # One dataset keeps it under a minute; the long dataset's builder still runs for its stats.
    result = _run("bench.train_throughput", tmp_path, "--datasets", "short")
    assert result["machine"]["cpu_cores"] >= 1
    assert set(result["dataset_stats"]) >= {"sample_file_all_rows", "short"}
    rows = result["results"]["short"]
    assert [r["recipe"] for r in rows] == ["a", "b", "b16", "c", "t"]
    assert [r["precision"] for r in rows if r["recipe"] in ("b", "b16")] == ["fp32", "bf16"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["steps"] > 0, row
        assert 0.0 <= row["padding_share"] < 1.0, row
        assert row["eval_loss"] > 0 and row["peak_rss_bytes"] > 0, row
    # Every full-epoch recipe trains on the same tokens.
    assert len({r["real_tokens"] for r in rows if r["recipe"] != "a"}) == 1


def test_memory_quick_compares_lora_and_qlora(tmp_path: Path) -> None:
    result = _run("bench.memory", tmp_path)
    rows = {r["variant"]: r for r in result["results"]}
    assert list(rows) == ["lora-fp32", "lora-bf16", "qlora-fp32", "qlora-bf16"]
    assert [r["quantized"] for r in rows.values()] == [False, False, True, True]
    assert [r["dtype"] for r in rows.values()] == ["float32", "bfloat16"] * 2
    # Against bf16 LoRA it depends on the model: 4-bit preparation keeps the embeddings in fp32.
    lora, qlora = rows["lora-fp32"], rows["qlora-fp32"]
    assert qlora["footprint_bytes"]["parameters"] < lora["footprint_bytes"]["parameters"]
    for row in rows.values():
        assert row["peak_rss_bytes"] > 0 and len(row["losses"]) == result["steps"], row


def test_api_load_quick_drives_every_endpoint_and_cleans_up(tmp_path: Path) -> None:
    import psycopg
    import redis

    from bench.api_load import REDIS_DB, REDIS_URL
    from tests.conftest import POSTGRES_ADMIN_URL

    result = _run("bench.api_load", tmp_path)
    machine = result["machine"]
    assert machine["cpu_cores"] >= 1 and machine["load_average_at_end"] is not None
    assert set(result["results"]) == {"GET /v1/me", "POST /v1/finetune/llm",
                                      "GET /v1/finetune/llm/{id}", "GET /v1/finetune/llm"}
    for name, row in [*result["results"].items(), *result["mixed"]["endpoints"].items()]:
        assert row["requests"] > 0 and row["errors"] == 0, (name, row["error_samples"])
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], name
    ratios = result["ratios"]
    assert ratios["errors"] == 0 and ratios["post_vs_trivial_throughput"] > 0
    assert ratios["status_vs_trivial_p99"] > 0
    # Every accepted job sent its wake-up message.
    assert result["messages_published"] == result["jobs_submitted"] > 0
    with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=5) as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (result["database"],)).fetchall()
    assert left == [], "the benchmark's database was not dropped"
    broker = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    assert not list(broker.scan_iter(match=f"*{result['queue']}*")), "its queue was left"


def test_queue_latency_quick_times_cold_and_warm_jobs_on_the_real_stack(tmp_path: Path) -> None:
    # The real stack: the machine's PostgreSQL and Redis (a database of its own on each).
    result = _run("bench.queue_latency", tmp_path)
    assert result["machine"]["cpu_cores"] >= 1 and result["machine"]["load_average_at_end"]
    jobs = result["jobs"]
    assert [(j["series"], j["kind"]) for j in jobs] == [
        ("lora", "cold (fresh worker)"), ("lora", "warm"),
        ("lora", "cold (other base)"), ("lora", "warm"),
        ("qlora", "cold (other base)"), ("qlora", "warm"),
    ]
    for job in jobs:
        assert job["error"] is None and job["status"] == "COMPLETED", job
        assert job["claim_ms"] is not None and job["first_step_s"] is not None, job
        assert all(value is not None for value in job["spans_s"].values()), job
    summary = result["summary"]
    assert summary["cache_hits_as_planned"] is True
    assert set(summary["series"]) == {"lora", "qlora"}
    for series in summary["series"].values():
        assert series["paired_cold_over_warm_first_step"] is not None
        assert set(series["groups"]) >= {"cold (all)", "warm"}


def test_data_phase_quick_measures_every_contender(tmp_path: Path) -> None:
    result = _run("bench.data_phase", tmp_path)
    (size, measured), = result["results"].items()
    assert size == "2000" and measured["file_bytes"] > 0
    for kind in ("loop", "map", "tunery", "cached"):
        assert "error" not in measured[kind], measured[kind]
        assert measured[kind]["seconds"] > 0 and measured[kind]["peak_rss_bytes"] > 0
    # Tunery's run went on past its data phase to a first optimizer step.
    assert measured["tunery"]["first_step_seconds"] is not None
    assert any(line.startswith("tokenized 2000 examples") for line in measured["tunery"]["log"])
    # The second run read what the first tokenized.
    assert (measured["tunery"]["from_cache"], measured["cached"]["from_cache"]) == (False, True)


def test_inference_quick_measures_the_engine_and_the_generate_baseline(tmp_path: Path) -> None:
    result = _run("bench.inference", tmp_path, "--max-tokens", "4")
    assert isinstance(result["machine"]["cpu_bf16_instructions"], bool)
    [row] = result["results"]
    assert row["model"] == "tiny-llama" and row["engine"]["precision"] in ("float32", "bfloat16")
    engine, baseline = row["engine"], row["baseline"]
    assert engine["streams_mixed"]["streams"] == result["streams"] == 8
    assert engine["streams_mixed"]["tokens"] > 0 and baseline["tokens"] > 0
    assert engine["ttft_s"] > 0 and engine["one_stream_tokens_per_s"] > 0
    assert set(row["ratios"]) == {
        "streams8_vs_one_stream", "streams8_vs_sequential_generate", "one_stream_vs_generate",
        "mixed_adapters_vs_one_adapter", "adapter_switch_share", "adapter_first_load_share"}


def test_scaling_quick_trains_on_one_and_two_processes(tmp_path: Path) -> None:
    result = _run("bench.scaling", tmp_path)
    rows = result["results"]
    assert [row["devices"] for row in rows] == [1, 2]
    assert rows[1]["group"] == "process group: 2 ranks, DDP over gloo"
    for row in rows:
        assert row["steps"] == rows[0]["steps"] > 0 and row["tokens_per_s"] > 0, row
    assert result["machine"]["accelerator"].startswith("CPU")


def test_service_overhead_quick_trains_the_same_job_both_ways(tmp_path: Path) -> None:
    result = _run("bench.service_overhead", tmp_path)
    direct, service = result["direct"], result["service"]
    # The same job: the same steps, tokens and, seeded alike, the same last loss.
    assert direct["steps"] == service["steps"] > 0
    assert direct["trained_tokens"] == service["trained_tokens"] > 0
    assert abs(direct["last_loss"] - service["last_loss"]) < 1e-3
    for arm in (direct, service):
        assert arm["steady_tokens_per_s"] > 0 and arm["training_tokens_per_s"] > 0, arm
    assert result["ratios"]["training"] > 0


def test_gpu_check_quick_runs_each_peer_beside_tunery(tmp_path: Path) -> None:
    # On CPU: the recipes and the table, not the GPU figures (no memory or MFU here).
    result = _run("bench.gpu_check", tmp_path)
    rows = result["results"]
    assert [r["recipe"] for r in rows] == ["f", "t", "fq", "tq"]
    for row in rows:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["steps"] > 0 and row["eval_loss"] > 0, row
    assert [r["vs_peer"] is not None for r in rows] == [False, True, False, True]
    assert result["machine"]["device"] == "CPU" and rows[0]["mfu"] is None
