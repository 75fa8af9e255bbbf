"""Training throughput: Tunery's worker against the recipes a skilled user would run by hand.

    .venv/bin/python -m bench.train_throughput            # SmolLM2-135M, both datasets
    .venv/bin/python -m bench.train_throughput --quick    # tiny random Llama, seconds

Recipes (a) Trainer padded to cutoff, (b) Trainer with group_by_length, (c) TRL packing (bfd),
optionally (c') TRL packing "wrapped", and (t) Tunery's `run_job`, each in its own process on
the same examples with the same LoRA, seed, batch size, learning rate and schedule, fp32, loss
on the response only. Prints one table per dataset and writes
bench/results/train_throughput.json. See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common.datasets import build_data, length_stats, read_sample_rows, tokenize_rows  # noqa: E402
from bench.common.machine import (  # noqa: E402
    PROJECT_ROOT,
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    gb,
    load_average,
    machine_info,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402
from bench.common.recipes import RECIPES  # noqa: E402

PEERS = ("a", "b", "b16", "c", "c2")


@dataclass(frozen=True)
class DatasetPlan:
    name: str
    cutoff_len: int
    n_train: int
    n_eval: int
    # (a) pads every example to cutoff_len and runs ~10x slower: it gets this many batches
    # instead of the epoch. tokens/s is a rate, so it stays comparable.
    a_steps: int
    rows_per_long_example: int = 13

    @property
    def data(self) -> str:
        """Which examples: "short" or "long" ("short-all" is every short row)."""
        return self.name.removesuffix("-all")


# Sized so the five default recipes on both datasets finish in under 5 minutes on 2 cores
# (311 s with 12 long examples and 8 held out, on this Zen 5 machine: too close).
FULL_PLANS = (
    DatasetPlan("short", cutoff_len=512, n_train=64, n_eval=30, a_steps=2),
    DatasetPlan("long", cutoff_len=1024, n_train=10, n_eval=6, a_steps=1),
)
# Every row of the sample file but the 30 held out: a longer epoch (68 steps) for eval loss
# across seeds (`--datasets short-all --seeds 42,43,44 --recipes b,b16,t`); not in the default
# run, which must stay under 5 minutes.
EXTRA_PLANS = (
    DatasetPlan("short-all", cutoff_len=512, n_train=270, n_eval=30, a_steps=2),
)
QUICK_PLANS = (
    DatasetPlan("short", cutoff_len=128, n_train=16, n_eval=8, a_steps=2),
    DatasetPlan("long", cutoff_len=256, n_train=8, n_eval=4, a_steps=1, rows_per_long_example=4),
)


def model_costs(model_dir: Path, threads: int) -> dict[str, Any]:
    """Parameters and FLOPs per token of the model (built on the meta device, no weights) and
    the matmul FLOP/s this machine reaches at its shapes, in fp32 and in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common.flops import flops_per_token, matmul_flops, model_shapes

    torch.set_num_threads(threads)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        **flops_per_token(model),
        "matmul": {
            precision: matmul_flops(**model_shapes(config), dtype=dtype)
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        },
    }


def dataset_stats(model_dir: Path, plans: tuple[DatasetPlan, ...]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stats: dict[str, Any] = {
        "sample_file_all_rows": length_stats(tokenize_rows(read_sample_rows(), tokenizer, 10**6))
    }
    for plan in plans:
        data = build_data(plan.data, n_train=plan.n_train, n_eval=plan.n_eval,
                          cutoff_len=plan.cutoff_len,
                          rows_per_long_example=plan.rows_per_long_example)
        stats[plan.name] = {
            "train": length_stats(tokenize_rows(data.train_rows, tokenizer, plan.cutoff_len)),
            "eval": length_stats(tokenize_rows(data.eval_rows, tokenizer, plan.cutoff_len)),
        }
    return stats


def run_child(recipe: str, plan: DatasetPlan, model_dir: Path, threads: int,
              timeout_s: float, run_dir: Path, seed: int) -> dict[str, Any]:
    """Run one recipe in a fresh process; its result, or {"error": ...}."""
    work = run_dir / f"{plan.name}-{recipe}-{seed}"
    work.mkdir(parents=True)
    spec = {
        "recipe": recipe,
        "seed": seed,
        "dataset": plan.data,
        "n_train": plan.n_train,
        "n_eval": plan.n_eval,
        "cutoff_len": plan.cutoff_len,
        "rows_per_long_example": plan.rows_per_long_example,
        "max_steps": plan.a_steps if recipe == "a" else None,
        "model_dir": str(model_dir),
        "work_dir": str(work / "run"),
        "threads": threads,
    }
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", work / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=2))
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.common.recipes", str(spec_path), str(result_path)],
                cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
            )
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    wall = time.perf_counter() - started
    if returncode == 0 and result_path.is_file():
        return {**json.loads(result_path.read_text()), "process_seconds": wall}
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    reason = "timed out" if returncode is None else f"exit code {returncode}"
    return {"recipe": recipe, "dataset": plan.name, "error": reason, "log_tail": tail,
            "process_seconds": wall}


def add_derived(results: list[dict[str, Any]], costs: dict[str, Any]) -> None:
    """Machine fraction (against the matmul rate of the precision each recipe trained in) and
    the ratios against the best peer and against (b)."""
    ok = [r for r in results if r.get("tokens_per_s")]
    peers = [r for r in ok if r["recipe"] in PEERS]
    best = max(peers, key=lambda r: r["tokens_per_s"], default=None)
    b = next((r for r in ok if r["recipe"] == "b"), None)
    for r in ok:
        r["model_flops_per_s"] = costs["flops_per_token"] * r["tokens_per_s"]
        machine = costs["matmul"][r["precision"]]["model_mix_flops_per_s"]
        r["machine_fraction"] = r["model_flops_per_s"] / machine
        others = [p for p in peers if p is not r]
        rival = max(others, key=lambda p: p["tokens_per_s"], default=None)
        r["best_other_peer"] = rival["recipe"] if rival else None
        r["vs_best_other_peer"] = r["tokens_per_s"] / rival["tokens_per_s"] if rival else None
        r["vs_b"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        r["eval_loss_vs_b"] = r["eval_loss"] / b["eval_loss"] - 1 if b else None
        r["is_best_peer"] = r is best


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def print_tunery_line(results: list[dict[str, Any]]) -> None:
    tunery = next((r for r in results if r["recipe"] == "t" and r.get("vs_b")), None)
    if tunery:
        b = next(r for r in results if r["recipe"] == "b")
        print(f"Tunery / best peer ({tunery['best_other_peer']}): "
              f"{tunery['vs_best_other_peer']:.2f}x tokens/s; Tunery / (b): "
              f"{tunery['vs_b']:.2f}x tokens/s, eval loss "
              f"{100 * tunery['eval_loss_vs_b']:+.2f}%, peak RSS "
              f"{gb(tunery['peak_rss_bytes'])} vs {gb(b['peak_rss_bytes'])}")


def seeds_table(plan: DatasetPlan, results: list[dict[str, Any]], seeds: list[int]) -> str:
    """Per recipe over the seeds: mean tokens/s and eval loss, the eval loss's range, and the
    mean eval loss against (b)'s mean."""
    headers = ["recipe", "seeds", "mean real tok/s", "mean eval loss", "eval loss min-max",
               "mean eval loss vs (b)"]
    ok = [r for r in results if "error" not in r]
    means: dict[str, tuple[float, float, float, float, int]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in ok):
        runs = [r for r in ok if r["recipe"] == recipe]
        losses = [r["eval_loss"] for r in runs]
        means[recipe] = (sum(r["tokens_per_s"] for r in runs) / len(runs),
                         sum(losses) / len(losses), min(losses), max(losses), len(runs))
    b_mean = means["b"][1] if "b" in means else None
    rows = [
        [RECIPES[recipe], str(n), f"{rate:.1f}", f"{loss:.4f}", f"{low:.4f}-{high:.4f}",
         f"{100 * (loss / b_mean - 1):+.2f}%" if b_mean else "n/a"]
        for recipe, (rate, loss, low, high, n) in means.items()
    ]
    title = f"{plan.name}: means over seeds {', '.join(map(str, seeds))}"
    return title + "\n" + format_table(headers, rows)


def table(plan: DatasetPlan, results: list[dict[str, Any]], seed: int | None = None) -> str:
    headers = ["recipe", "precision", "real tok/s", "vs best other peer", "vs (b)", "padding",
               "steps", "peak RSS", "eval loss", "machine fraction"]
    rows = []
    for r in results:
        name = RECIPES[r["recipe"]]
        if "error" in r:
            rows.append([name, f"failed: {r['error']}"] + [""] * (len(headers) - 2))
            continue
        if r["recipe"] == "a":
            name += f" ({r['steps']} batches)"
        rival = r.get("best_other_peer")
        rows.append([
            name,
            r["precision"],
            _f(r["tokens_per_s"], ".1f"),
            f"{_f(r['vs_best_other_peer'], '.2f')}x ({rival})" if rival else "n/a",
            f"{_f(r['vs_b'], '.2f')}x",
            f"{_f(100 * r['padding_share'] if r['padding_share'] is not None else None, '.0f')}%",
            str(r["steps"]),
            gb(r["peak_rss_bytes"]),
            f"{r['eval_loss']:.4f}",
            f"{_f(100 * r['machine_fraction'], '.1f')}%",
        ])
    title = (f"{plan.name}: cutoff {plan.cutoff_len}, {plan.n_train} training examples "
             f"((a): {plan.a_steps} batches), {plan.n_eval} held-out for eval"
             + (f", seed {seed}" if seed is not None else ""))
    return title + "\n" + format_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny random Llama and a few examples: checks the script works")
    parser.add_argument("--model-dir", type=Path, help="a local causal LM instead of SmolLM2")
    parser.add_argument("--recipes", default="a,b,b16,c,t",
                        help=f"comma-separated, among {','.join(RECIPES)} (c2 = (c') wrapped)")
    parser.add_argument("--datasets", default="short,long",
                        help="comma-separated, among short, long, short-all (every short row)")
    parser.add_argument("--seeds", default="42",
                        help="comma-separated data seeds (batch order); each recipe runs once "
                             "per seed, and several seeds add a table of means")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per recipe")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose among {list(RECIPES)}")
    plans = tuple(p for p in (QUICK_PLANS if args.quick else FULL_PLANS + EXTRA_PLANS)
                  if p.name in args.datasets.split(","))
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    machine = machine_info()
    model_dir = prepare_model(args.quick, args.model_dir)
    costs = model_costs(model_dir, args.threads)
    stats = dataset_stats(model_dir, plans)
    print(f"model {model_dir.name}: {costs['nonembedding_params'] / 1e6:.1f}M non-embedding + "
          f"{costs['head_params'] / 1e6:.1f}M LM head parameters, "
          f"{costs['flops_per_token'] / 1e9:.3f} GFLOP per trained token (6 x (N + V x H))")
    for precision, mm in costs["matmul"].items():
        print(f"matmul {precision}, {mm['threads']} threads: MLP shape "
              f"{mm['mlp_flops_per_s'] / 1e9:.1f}, LM head shape "
              f"{mm['lm_head_flops_per_s'] / 1e9:.1f}, model mix "
              f"{mm['model_mix_flops_per_s'] / 1e9:.1f} GFLOP/s")
    for name, s in stats.items():
        print(f"{name}: {json.dumps(s)}")

    # A directory of its own per run: two runs at once (CI and a developer) never share files.
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="train_throughput-", dir=SCRATCH_DIR))
    print(f"work dirs and child logs: {run_dir}")
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for plan in plans:
        by_dataset[plan.name] = []
        for seed in seeds:
            results = []
            for recipe in recipes:
                print(f"running {plan.name} {RECIPES[recipe]} seed {seed} ...", flush=True)
                results.append(run_child(recipe, plan, model_dir, args.threads, args.timeout,
                                         run_dir, seed))
                if "error" in results[-1]:
                    print("\n".join(results[-1]["log_tail"]), file=sys.stderr)
            add_derived(results, costs)
            by_dataset[plan.name] += [{**r, "seed": seed} for r in results]
            print()
            print(table(plan, results, seed if len(seeds) > 1 else None))
            print_tunery_line(results)
            print(flush=True)
        if len(seeds) > 1:
            print(seeds_table(plan, by_dataset[plan.name], seeds))
            print(flush=True)

    total = time.perf_counter() - started
    machine["load_average_at_end"] = load_average()
    path = write_results("train_throughput", {
        "benchmark": "train_throughput",
        "quick": args.quick,
        "machine": machine,
        "model": str(model_dir.name),
        "model_costs": costs,
        "plans": [asdict(p) for p in plans],
        "seeds": seeds,
        "dataset_stats": stats,
        "results": by_dataset,
        "total_seconds": total,
    }, args.results_dir)
    print(f"total {total:.0f} s; wrote {path}")
    failed = any("error" in r for rs in by_dataset.values() for r in rs)
    if not failed:
        shutil.rmtree(run_dir, ignore_errors=True)  # kept when a recipe failed: its log is there
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
