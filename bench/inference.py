"""Inference: Tunery's embedded engine against plain `generate`, on one base and three LoRA
adapters.

    .venv/bin/python -m bench.inference            # SmolLM2-135M-Instruct (and the tiny Llama)
    .venv/bin/python -m bench.inference --quick    # tiny random Llama only

For each model, one run: the engine as a real process (`python -m inference`) on a free local
port, three adapters with random weights stored as jobs export them, requests over HTTP with
streaming (`/v1/completions`, greedy, `max_tokens` each):

- time to first token (median of a few single requests, adapter loaded);
- tokens/s of one stream (completion tokens / request time, the same requests);
- aggregate tokens/s of 8 concurrent streams on 3 adapters (total tokens / wall time), and of
  8 streams on one adapter, which tells what mixing adapters in a batch costs;
- adapter switching: sequential requests alternating the three adapters against the same
  requests on one adapter, as the share of a request's time; and loading an adapter from
  storage on its first use, as the share of that first request's time;
- the baseline, in this process once the engine is stopped: the same 8 requests one after
  the other with `model.generate` on the same base (loaded as the engine loads it) and peft's
  adapters switched with `set_adapter`.

Prints the tables and the ratios side by side and writes bench/results/inference.json with
the machine, its CPU's bf16 instructions and the precision the engine computed in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from bench.common.machine import (  # noqa: E402
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    load_average,
    machine_info,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402
from cli.local_stack import engine_alone  # noqa: E402

PROMPTS = [
    "### Instruction: Name three primary colors and say what mixing two of them gives.\n"
    "### Response:",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "### Instruction: Explain in simple words why the sky is blue.\n### Response:",
    "List five things to pack for a weekend of hiking in the mountains:",
    "The history of the printing press begins",
    "### Instruction: Give three tips for learning a new language.\n### Response:",
    "Dear team, I am writing to share the results of our last quarter.",
    "Once upon a time, in a small village by the sea,",
]
ADAPTERS = 3
STREAMS = 8

# The engine refuses calls without the token it was started with.
ENGINE_TOKEN = "bench-engine-token"


def run_model(model_dir: Path, work: Path, max_tokens: int, repeats: int,
              threads: int) -> dict[str, Any]:
    """Every measurement on one base model; the engine's process lives for the engine's part."""
    data_dir = work / "data"
    env = {
        **os.environ,
        # torch's intra-op threads in the engine's process, as `--threads` sets them here.
        "OMP_NUM_THREADS": str(threads),
        "TUNERY_DATA_DIR": str(data_dir),
        "TUNERY_ALLOWED_LOCAL_DIRS": json.dumps([str(model_dir.parent)]),
        "TUNERY_INFERENCE_MAX_BATCH_SIZE": str(STREAMS),
        "TUNERY_INFERENCE_MAX_ADAPTERS": str(ADAPTERS + 1),
        "TUNERY_INFERENCE_ENGINE_TOKEN": ENGINE_TOKEN,
    }
    env.pop("TUNERY_STORAGE_URL", None)
    adapters = store_adapters(model_dir, work, data_dir, ADAPTERS + 1)
    cold_adapter, adapters = adapters[-1], adapters[:-1]
    requests = [(adapters[i % ADAPTERS], PROMPTS[i % len(PROMPTS)]) for i in range(STREAMS)]
    engine: dict[str, Any] = {}
    with engine_alone(env, work, timeout_s=300) as url, \
            httpx.Client(base_url=url, timeout=600,
                         headers={"Authorization": f"Bearer {ENGINE_TOKEN}"}) as client:
        for adapter in adapters:  # loaded once, so that only the cold test loads one
            stream(client, adapter, PROMPTS[0], 2)
        stream(client, adapters[0], PROMPTS[0], max_tokens)  # warm-up

        singles = [stream(client, adapters[0], PROMPTS[i % len(PROMPTS)], max_tokens)
                   for i in range(repeats)]
        engine["ttft_s"] = statistics.median(r["ttft_s"] for r in singles)
        engine["one_stream_tokens_per_s"] = statistics.median(
            r["tokens"] / r["seconds"] for r in singles)

        engine["streams_mixed"] = concurrent(client, requests, max_tokens)
        one_adapter = [(adapters[0], prompt) for _, prompt in requests]
        engine["streams_one_adapter"] = concurrent(client, one_adapter, max_tokens)

        alternating = [stream(client, adapters[i % ADAPTERS], PROMPTS[0], max_tokens)
                       for i in range(2 * ADAPTERS)]
        same = [stream(client, adapters[0], PROMPTS[0], max_tokens)
                for _ in range(2 * ADAPTERS)]
        # Per token: greedy requests on different adapters stop at different lengths.
        engine["alternating_s_per_token"] = per_token(alternating)
        engine["same_adapter_s_per_token"] = per_token(same)
        first_use = stream(client, cold_adapter, PROMPTS[0], max_tokens)
        warm = stream(client, cold_adapter, PROMPTS[0], max_tokens)
        engine["first_use_s_per_token"] = per_token([first_use])
        engine["loaded_s_per_token"] = per_token([warm])
        engine["precision"] = engine_precision(client)
    baseline = run_generate_baseline(model_dir, work, data_dir, requests, max_tokens)
    return {"model": model_dir.name, "max_tokens": max_tokens, "engine": engine,
            "baseline": baseline, "ratios": ratios(engine, baseline)}


def store_adapters(model_dir: Path, work: Path, data_dir: Path, count: int) -> list[str]:
    from shared import served_models
    from shared.storage import LocalStorage
    from worker.assets.random_adapter import build_random_adapter

    storage = LocalStorage(data_dir / "storage")
    names = []
    for seed in range(count):
        job_id = str(uuid.uuid4())
        # Small B: the adapters change the answers without turning them into noise.
        folder = build_random_adapter(model_dir, work / f"adapter-{seed}", seed + 1, r=8,
                                      scale=0.02)
        for file_name, key in served_models.adapter_keys(job_id).items():
            storage.put_file(key, folder / file_name)
        names.append(served_models.adapter_name(job_id))
    return names


def stream(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion: seconds to the first text, in all, and its tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"]))
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    return {"ttft_s": first if first is not None else seconds, "seconds": seconds,
            "tokens": tokens}


def per_token(results: list[dict[str, Any]]) -> float:
    return sum(r["seconds"] for r in results) / max(1, sum(r["tokens"] for r in results))


def concurrent(client: httpx.Client, requests: list[tuple[str, str]],
               max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: stream(client, r[0], r[1], max_tokens), requests))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"streams": len(requests), "tokens": tokens, "wall_s": wall,
            "aggregate_tokens_per_s": tokens / wall,
            "median_ttft_s": statistics.median(r["ttft_s"] for r in results)}


def engine_precision(client: httpx.Client) -> str:
    """The dtype the engine computes in: the worker's choice for this machine, as the
    engine reads the same settings."""
    from shared.settings import get_settings
    from worker.pipeline.model import compute_dtype

    client.get("/health").raise_for_status()
    return str(compute_dtype(get_settings().training.cpu_bf16)).removeprefix("torch.")


def run_generate_baseline(model_dir: Path, work: Path, data_dir: Path,
                          requests: list[tuple[str, str]], max_tokens: int) -> dict[str, Any]:
    """The same requests, one after the other, with `generate` on the base the engine loads
    (same loader, same precision) and the adapters switched by `set_adapter`."""
    import torch
    from peft import PeftModel

    from shared.schema import PretrainedModelConfig
    from shared.settings import get_settings
    from worker.pipeline.model import load_base_model, load_tokenizer

    os.environ["TUNERY_DATA_DIR"] = str(data_dir)
    get_settings.cache_clear()
    allowed = [model_dir.parent]
    config = PretrainedModelConfig(model_path=str(model_dir), use_quantization=False)
    tokenizer = load_tokenizer(str(model_dir), allowed_local_dirs=allowed)
    base = load_base_model(str(model_dir), config, allowed_local_dirs=allowed,
                           cpu_bf16=get_settings().training.cpu_bf16).eval()
    names = sorted({adapter for adapter, _ in requests})
    model: Any = None
    for seed, name in enumerate(names):
        folder = work / f"adapter-{seed}"
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    model.eval()
    eos = tokenizer.eos_token_id

    def generate(adapter: str, prompt: str) -> tuple[int, float]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
        start = time.perf_counter()
        model.set_adapter(adapter)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - ids.shape[1], time.perf_counter() - start

    generate(*requests[0])  # warm-up
    start = time.perf_counter()
    runs = [generate(adapter, prompt) for adapter, prompt in requests]
    wall = time.perf_counter() - start
    tokens = sum(n for n, _ in runs)
    return {"requests": len(runs), "tokens": tokens, "wall_s": wall,
            "sequential_tokens_per_s": tokens / wall,
            "one_request_tokens_per_s": statistics.median(n / s for n, s in runs)}


def ratios(engine: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    mixed = engine["streams_mixed"]["aggregate_tokens_per_s"]
    return {
        "streams8_vs_one_stream": mixed / engine["one_stream_tokens_per_s"],
        "streams8_vs_sequential_generate": mixed / baseline["sequential_tokens_per_s"],
        "one_stream_vs_generate": engine["one_stream_tokens_per_s"]
        / baseline["one_request_tokens_per_s"],
        "mixed_adapters_vs_one_adapter": mixed
        / engine["streams_one_adapter"]["aggregate_tokens_per_s"],
        "adapter_switch_share": max(0.0, 1 - engine["same_adapter_s_per_token"]
                                    / engine["alternating_s_per_token"]),
        "adapter_first_load_share": max(0.0, 1 - engine["loaded_s_per_token"]
                                        / engine["first_use_s_per_token"]),
    }


def print_results(results: list[dict[str, Any]]) -> None:
    headers = ["model", "precision", "TTFT", "1 stream tok/s", "8 streams, 3 adapters tok/s",
               "8 streams, 1 adapter tok/s", "generate, sequential tok/s"]
    rows = []
    for r in results:
        e, b = r["engine"], r["baseline"]
        rows.append([r["model"], e["precision"], f"{e['ttft_s'] * 1000:.0f} ms",
                     f"{e['one_stream_tokens_per_s']:.1f}",
                     f"{e['streams_mixed']['aggregate_tokens_per_s']:.1f}",
                     f"{e['streams_one_adapter']['aggregate_tokens_per_s']:.1f}",
                     f"{b['sequential_tokens_per_s']:.1f}"])
    print(format_table(headers, rows))
    names = list(results[0]["ratios"])
    targets = {"streams8_vs_one_stream": ">= 3", "adapter_switch_share": "< 0.10"}
    print()
    print(format_table(["ratio", *[r["model"] for r in results], "target"],
                       [[n, *[f"{r['ratios'][n]:.2f}" for r in results], targets.get(n, "")]
                        for n in names]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama only")
    parser.add_argument("--model-dir", type=Path, help="one model instead of the defaults")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, in the engine and for the baseline")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    machine = machine_info()
    from worker.pipeline.model import cpu_multiplies_bf16

    machine["cpu_bf16_instructions"] = cpu_multiplies_bf16()
    if args.model_dir is not None:
        models = [args.model_dir.resolve()]
    elif args.quick:
        models = [prepare_model(True, None).resolve()]
    else:
        models = [prepare_model(True, None).resolve(), prepare_model(False, None).resolve()]
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    repeats = 2 if args.quick else 3
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    results = []
    for model_dir in models:
        work = Path(tempfile.mkdtemp(prefix="inference-", dir=SCRATCH_DIR))
        results.append(run_model(model_dir, work, max_tokens, repeats, args.threads))
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU {machine['cpu_model']}, {machine['cpu_cores']} cores, bf16 instructions: "
          f"{machine['cpu_bf16_instructions']}, GPU: {machine['cuda']}; {args.threads} torch "
          f"threads; greedy, max_tokens {max_tokens}")
    print_results(results)
    machine["load_average_at_end"] = load_average()
    path = write_results("inference", {
        "benchmark": "inference", "quick": args.quick, "machine": machine,
        "streams": STREAMS, "adapters": ADAPTERS, "threads": args.threads, "results": results,
        "total_seconds": time.perf_counter() - started,
    }, args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
