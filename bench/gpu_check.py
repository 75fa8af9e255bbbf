"""On a GPU: Tunery's worker against the HF Trainer + FlashAttention-2 recipe, LoRA and QLoRA,
on SmolLM2-135M and on a ~1B Llama built from a config, in one run.

    .venv/bin/python -m bench.gpu_check                 # on a CUDA machine
    .venv/bin/python -m bench.gpu_check --quick         # tiny random Llama; runs on CPU too

Recipes (`bench.common.recipes`, each in a child process of its own):
(f)  transformers `Trainer` + peft, bf16 autocast over a bf16 base, FlashAttention-2 where
     `flash_attn` is installed (SDPA otherwise; the table says which), length-grouped batches;
(t)  Tunery's `run_job` with the same settings (its own choice of batches and kernels);
(fq) (f) on a 4-bit NF4 base with double quantization and bf16 compute, paged 8-bit AdamW;
(tq) Tunery's `run_job` with `use_quantization` (QLoRA).

For each: real tokens/s over training time (the first forward to the last step), Tunery over
its peer, peak GPU memory (`torch.cuda.max_memory_allocated`, loading included), and the model
FLOPs utilisation: tokens/s x 6 x (non-embedding parameters + LM head) over the GPU's dense
bf16 peak (`--peak-tflops`, or the table below by device name). 6N is the standard count; a
LoRA backward computes no base weight gradients, so the work done is nearer 4N.

The ~1B model (`llama-1b`: TinyLlama-1.1B's shapes with SmolLM2's tokenizer) has random
weights: tokens/s, memory and MFU depend on the shapes only; its losses mean nothing.
Writes bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common.machine import (  # noqa: E402
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    gb,
    machine_info,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402
from bench.train_throughput import DatasetPlan, run_child  # noqa: E402

RECIPE_PAIRS = (("f", "t"), ("fq", "tq"))
# Dense bf16 tensor-core peak, TFLOP/s, by a substring of the device name (SXM parts; a PCIe
# H100 peaks at 756: pass --peak-tflops there).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0}
PLANS = (DatasetPlan("short-all", cutoff_len=512, n_train=270, n_eval=30, a_steps=2),)
QUICK_PLANS = (DatasetPlan("short", cutoff_len=128, n_train=16, n_eval=8, a_steps=2),)


def one_b_model(tokenizer_dir: Path, dest: Path) -> Path:
    """A ~1B Llama with random weights in bf16 and `tokenizer_dir`'s tokenizer, built once."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # TinyLlama-1.1B's shapes.
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(dtype=torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def model_flops_per_token(model_dir: Path) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common.flops import flops_per_token

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return float(flops_per_token(model)["flops_per_token"])


def peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, the device's name); None where unknown or on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None, "CPU"
    name = torch.cuda.get_device_name(0)
    if args.peak_tflops:
        return args.peak_tflops * 1e12, name
    known = next((tflops for part, tflops in BF16_PEAK_TFLOPS.items() if part in name), None)
    return (known * 1e12 if known else None), name


def run_model(model_name: str, model_dir: Path, plan: DatasetPlan, args: argparse.Namespace,
              peak: float | None) -> list[dict[str, Any]]:
    per_token = model_flops_per_token(model_dir)
    rows = []
    for peer, tunery in RECIPE_PAIRS:
        pair = [run_child(recipe, plan, model_dir, args.threads, args.timeout_s,
                          args.run_dir / model_name, seed=42) for recipe in (peer, tunery)]
        peer_rate = pair[0].get("tokens_per_s")
        for result in pair:
            rate = result.get("tokens_per_s")
            rows.append({
                **result, "model": model_name,
                "mfu": rate * per_token / peak if rate and peak else None,
                "vs_peer": (rate / peer_rate if rate and peer_rate
                            and result["recipe"] == tunery else None),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tiny random Llama only, a few steps; runs on CPU")
    parser.add_argument("--models", default="smollm2,llama-1b")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, if not in the built-in table")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import torch

    if not args.quick and not torch.cuda.is_available():
        print("bench.gpu_check measures GPUs: no CUDA device here (--quick runs on CPU)",
              file=sys.stderr)
        return 2
    args.run_dir = SCRATCH_DIR / "gpu_check"
    shutil.rmtree(args.run_dir, ignore_errors=True)
    plan = (QUICK_PLANS if args.quick else PLANS)[0]
    peak, device = peak_flops(args)
    smollm2 = prepare_model(args.quick, None)
    models = {"tiny-llama": smollm2} if args.quick else {
        "smollm2": smollm2, "llama-1b": one_b_model(smollm2, SCRATCH_DIR / "models" / "llama-1b")}
    chosen = list(models) if args.quick else [m for m in args.models.split(",") if m]
    rows = [row for name in chosen for row in run_model(name, models[name], plan, args, peak)]

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    print(format_table(
        ["model", "recipe", "attention", "steps", "tok/s", "Tunery / peer", "peak GPU mem",
         "MFU", "eval loss"],
        [[r["model"], r["recipe"], str(r.get("notes", {}).get("attention", "tunery")),
          str(r.get("steps", "–")), fmt(r.get("tokens_per_s"), ".0f"), fmt(r["vs_peer"], ".2f"),
          gb(r.get("peak_gpu_bytes")), fmt(r["mfu"], ".1%"), fmt(r.get("eval_loss"), ".4f")]
         if "error" not in r else [r["model"], r["recipe"], "error", r["error"], "", "", "", "",
                                   ""]
         for r in rows]))
    print(f"\n{device}; dense bf16 peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s; "
          f"{plan.n_train} rows, cutoff {plan.cutoff_len}")
    path = write_results("gpu_check", {
        "machine": {**machine_info(), "device": device, "bf16_peak_flops": peak},
        "plan": asdict(plan), "results": rows,
    }, args.results_dir)
    print(f"results: {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
