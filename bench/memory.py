"""Memory: model footprint and peak RSS of a few training steps, LoRA vs QLoRA NF4, each in
fp32 and in bf16 mixed precision.

    .venv/bin/python -m bench.memory            # SmolLM2-135M
    .venv/bin/python -m bench.memory --quick    # tiny random Llama

Each variant runs in its own process: Tunery's `load_model` (LoRA r 8, alpha 16, all-linear;
`use_quantization` false or true; `cpu_bf16` off or on), then `STEPS` optimizer steps on one
fixed batch of 4 long examples with Tunery's own loss, under autocast when the base is bf16,
as the worker's Trainer runs them. Prints a table and writes bench/results/memory.json.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common.machine import (  # noqa: E402
    PROJECT_ROOT,
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    gb,
    load_average,
    machine_info,
    peak_rss_bytes,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402

# variant: (use_quantization, cpu_bf16). On a GPU both precisions are the GPU's own.
VARIANTS = {
    "lora-fp32": (False, "off"),
    "lora-bf16": (False, "on"),
    "qlora-fp32": (True, "off"),
    "qlora-bf16": (True, "on"),
}
LABELS = {
    "lora-fp32": "LoRA fp32",
    "lora-bf16": "LoRA bf16 mixed",
    "qlora-fp32": "QLoRA NF4, fp32 compute",
    "qlora-bf16": "QLoRA NF4, bf16 compute",
}
STEPS = 3
BATCH_SIZE = 4


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def footprint_bytes(model: Any) -> dict[str, int]:
    """Bytes of the parameters and buffers as stored (4-bit weights packed two per byte), the
    4-bit quantization constants beside them, and the trainable (LoRA) part."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    quant = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, getattr(state, "code", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            tensors += [nested.absmax, getattr(nested, "code", None)]
        quant += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"parameters": params, "buffers": buffers, "quant_constants": quant,
            "total": params + buffers + quant, "trainable": trainable}


def run_variant(variant: str, model_dir: Path, cutoff_len: int, rows_per_example: int,
                threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bench.common.datasets import build_data, tokenize_rows
    from bench.common.evaluation import pad_batch
    from shared.schema import PretrainedModelConfig
    from worker.pipeline.labelled_loss import causal_lm_parts, labelled_causal_lm_loss
    from worker.pipeline.model import load_model, loaded_dtype
    from worker.pipeline.training_args import optimizer_name

    torch.set_num_threads(threads)
    rss_start = current_rss_bytes()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    data = build_data("long", n_train=BATCH_SIZE, n_eval=1, cutoff_len=cutoff_len,
                      rows_per_long_example=rows_per_example)
    examples = tokenize_rows(data.train_rows, tokenizer, cutoff_len)
    batch = pad_batch(examples, pad_id)
    quantize, cpu_bf16 = VARIANTS[variant]
    config = PretrainedModelConfig(
        model_path=str(model_dir), lora_r=8, lora_alpha=16, lora_dropout=0.0,
        use_quantization=quantize,
    )
    model = load_model(str(model_dir), config, allowed_local_dirs=[model_dir.parent],
                       cpu_bf16=cpu_bf16)
    dtype = loaded_dtype(model)
    parts = causal_lm_parts(model)
    assert parts is not None, "a Llama-architecture model has a plain LM head"
    rss_loaded = current_rss_bytes()
    footprint = footprint_bytes(model)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    optim = optimizer_name(quantized=quantized, cuda=torch.cuda.is_available())
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optim.startswith("adamw_torch"):
        optimizer: Any = torch.optim.AdamW(trainable, lr=2e-4, fused=optim.endswith("_fused"))
    else:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=2e-4)
    model.train()
    device = parts.lm_head.weight.device
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    losses, times = [], []
    for _ in range(STEPS):
        start = time.perf_counter()
        # What TuneryTrainer.compute_loss does, under the autocast the Trainer would use.
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hidden = parts.decoder(**inputs, use_cache=False).last_hidden_state
            loss = labelled_causal_lm_loss(hidden, batch["labels"], parts.lm_head)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "variant": variant,
        "quantized": quantized,
        "dtype": str(dtype).removeprefix("torch."),
        "optimizer": optim,
        "footprint_bytes": footprint,
        "rss_before_load_bytes": rss_start,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "batch_shape": list(batch["input_ids"].shape),
        "real_tokens": int(batch["attention_mask"].sum()),
        "losses": losses,
        "step_seconds": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cutoff, rows_per_example = (256, 4) if args.quick else (1024, 13)

    if args.child:
        model_dir = args.model_dir
        assert model_dir is not None and args.child_out is not None
        result = run_variant(args.child, model_dir, cutoff, rows_per_example, args.threads)
        args.child_out.write_text(json.dumps(result, indent=2))
        return 0

    started = time.perf_counter()
    machine = machine_info()
    model_dir = prepare_model(args.quick, args.model_dir).resolve()
    # A directory of its own per run: two runs at once never share files.
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=SCRATCH_DIR))
    results = []
    for variant in VARIANTS:
        out, log = work / f"{variant}.json", work / f"{variant}.log"
        with log.open("w") as stream:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.memory", "--child", variant, "--model-dir",
                 str(model_dir), "--child-out", str(out), "--threads", str(args.threads)]
                + (["--quick"] if args.quick else []),
                cwd=PROJECT_ROOT, stdout=stream, stderr=subprocess.STDOUT,
            )
        if proc.returncode == 0 and out.is_file():
            results.append(json.loads(out.read_text()))
        else:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            results.append({"variant": variant, "error": f"exit code {proc.returncode}",
                            "log_tail": tail})

    headers = ["variant", "footprint (params+buffers)", "trainable", "RSS after load",
               "peak RSS, training", f"s/step (mean of {STEPS})", "losses", "optimizer"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], f"failed: {r['error']}"] + [""] * (len(headers) - 2))
            continue
        f = r["footprint_bytes"]
        rows.append([
            LABELS[r["variant"]],
            f"{f['total'] / 1024**2:.1f} MB",
            f"{f['trainable'] / 1024**2:.1f} MB",
            gb(r["rss_after_load_bytes"]),
            gb(r["peak_rss_bytes"]),
            f"{sum(r['step_seconds']) / len(r['step_seconds']):.2f}",
            " ".join(f"{x:.3f}" for x in r["losses"]),
            r["optimizer"],
        ])
    shape = next((r["batch_shape"] for r in results if "batch_shape" in r), None)
    print(f"model {model_dir.name}, one batch {shape} (long examples), {STEPS} steps")
    print(format_table(headers, rows))
    machine["load_average_at_end"] = load_average()
    path = write_results("memory", {
        "benchmark": "memory", "quick": args.quick, "machine": machine,
        "model": model_dir.name, "steps": STEPS, "results": results,
        "total_seconds": time.perf_counter() - started,
    }, args.results_dir)
    print(f"wrote {path}")
    failed = any("error" in r for r in results)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)  # kept when a variant failed: its log is there
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
