"""The data phase at scale: Tunery's against what a skilled user does by hand, and how soon
Tunery's first optimizer step follows it.

    .venv/bin/python -m bench.data_phase                         # 10k and 100k rows, SmolLM2
    .venv/bin/python -m bench.data_phase --sizes 10000,100000,1000000
    .venv/bin/python -m bench.data_phase --quick                 # tiny Llama, 2k rows

For each size one generated instruction/input/output JSONL file (about 88 SmolLM2 tokens a
row), then each contender in its own process, one after the other:

- **loop**: read the file line by line, render the alpaca template, and call the fast
  tokenizer on batches of 1000 texts (truncated to cutoff_len + 1), keeping the ids;
- **map**: `datasets.load_dataset("json")` then `.map(tokenize, batched=True,
  num_proc=<cores>)`, which writes Arrow files to disk (its cache is in the scratch dir);
- **tunery**: `worker.pipeline.run.run_job` on the same file and template, uploaded (put in
  the local storage as the API stores an upload), as the worker runs it: from the start of
  the job to the "loading_model" phase is its data phase (reading, rendering, tokenizing,
  labelling, the split and the evaluation sample); it then goes on to its first optimizer
  step and is stopped there. Its tokenized-examples cache is emptied first;
- **cached**: the same job again, as a resumed attempt or a repeated job runs it: the
  tokenized examples come from the cache the tunery run kept.

Time is wall time in the contender's process. Peak memory is the process's VmHWM plus, for
`map`, the largest of its worker processes' (they run at once); its growth over the data
phase is that peak less the process's resident memory when the phase starts (imports and the
tokenizer loaded), the part that grows with the file. Tunery's peak is read when
its data phase ends, before the model loads. "first step" is the time from the log line
`training N steps` to the first step's metrics, the evaluation before training included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common.machine import (  # noqa: E402
    RESULTS_DIR,
    SCRATCH_DIR,
    format_table,
    gb,
    load_average,
    machine_info,
    peak_rss_bytes,
    rss_bytes,
    write_results,
)
from bench.common.models import prepare_model  # noqa: E402

TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
CUTOFF_LEN = 256
BATCH = 1000
CONTENDERS = ("loop", "map", "tunery", "cached")
WORDS = [
    "the", "model", "data", "train", "answer", "question", "river", "city", "water", "light",
    "small", "large", "green", "blue", "red", "number", "write", "read", "list", "reverse",
    "sort", "count", "first", "last", "word", "sentence", "explain", "why", "how", "what",
    "when", "where", "short", "long", "simple", "clear", "example", "value", "result", "step",
    "time", "people", "world", "work", "system", "change", "group", "point", "problem", "fact",
    "hand", "part", "place", "case", "week", "company", "program",
]


def write_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` rows of instruction (14 words), input (20) and output (36): about 88 SmolLM2
    tokens a row with the template."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for _ in range(rows):
            row = {"instruction": words(14), "input": words(20), "output": words(36) + "."}
            out.write(json.dumps(row) + "\n")
    return path


def _loop(data: Path, model_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rss_at_start = rss_bytes()
    started = time.perf_counter()
    ids: list[list[int]] = []
    texts: list[str] = []

    def flush() -> None:
        enc = tokenizer(texts, truncation=True, max_length=CUTOFF_LEN + 1)
        ids.extend(enc["input_ids"])
        texts.clear()

    with data.open() as lines:
        for line in lines:
            texts.append(TEMPLATE.format(**json.loads(line)) + tokenizer.eos_token)
            if len(texts) == BATCH:
                flush()
    if texts:
        flush()
    return {"seconds": time.perf_counter() - started, "examples": len(ids),
            "tokens": sum(map(len, ids)), "peak_rss_bytes": peak_rss_bytes(),
            "rss_at_start_bytes": rss_at_start}


def _map(data: Path, model_dir: Path, scratch: Path) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cache = scratch / "hf-datasets-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rss_at_start = rss_bytes()
    started = time.perf_counter()
    table = datasets.load_dataset("json", data_files=str(data), cache_dir=str(cache),
                                  split="train")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        texts = [TEMPLATE.format(instruction=i, input=x, output=o) + tokenizer.eos_token
                 for i, x, o in zip(batch["instruction"], batch["input"], batch["output"],
                                    strict=True)]
        return tokenizer(texts, truncation=True, max_length=CUTOFF_LEN + 1)

    tokenized = table.map(tokenize, batched=True, batch_size=BATCH,
                          num_proc=os.cpu_count() or 1, remove_columns=table.column_names)
    seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "examples": len(tokenized),
            "peak_rss_bytes": peak_rss_bytes() + children, "rss_at_start_bytes": rss_at_start,
            "note": f"process {gb(peak_rss_bytes())} + largest worker {gb(children)}"}


def _tunery(data: Path, model_dir: Path, scratch: Path, *, cached: bool) -> dict[str, Any]:
    from dataclasses import dataclass, field

    from shared.schema import FinetuneRequest
    from shared.settings import Settings
    from shared.storage_keys import dataset_prefix, tokenized_prefix
    from worker.pipeline import run as tunery_run
    from worker.pipeline.errors import TrainingStopped
    from worker.pipeline.report import RecordingReporter

    @dataclass
    class TimedReporter(RecordingReporter):
        times: dict[str, float] = field(default_factory=dict)
        peak_at_data_end: int = 0

        def phase(self, name: str) -> None:
            if name == "loading_model":
                self.peak_at_data_end = peak_rss_bytes()
            self.times.setdefault(f"phase:{name}", time.perf_counter())
            super().phase(name)

        def log(self, line: str) -> None:
            if line.startswith("training ") and " steps" in line:
                self.times.setdefault("training_line", time.perf_counter())
            super().log(line)

        def metric(self, step: int, values: dict[str, float]) -> None:
            if "loss" in values:
                self.times.setdefault("first_step", time.perf_counter())
            super().metric(step, values)

    # An uploaded dataset, as the API stores one: the worker copies it into the job's dir.
    dataset_id = "ds_" + "0" * 32
    stored = scratch / "tunery" / "storage" / dataset_prefix(dataset_id) / data.name
    stored.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data, stored)
    if not cached:
        shutil.rmtree(scratch / "tunery" / "storage" / tokenized_prefix(dataset_id),
                      ignore_errors=True)
    request = FinetuneRequest.model_validate({
        "pretrainedmodel_config": {"model_path": str(model_dir), "use_quantization": False},
        "data_config": {"data_path": dataset_id, "prompt_template": TEMPLATE,
                        "cutoff_len": CUTOFF_LEN},
        "training_config": {"num_train_epochs": 1},
        "logging_config": {},
    })
    work = scratch / "tunery-job"
    shutil.rmtree(work, ignore_errors=True)
    settings = Settings(data_dir=scratch / "tunery", allowed_local_dirs=[data.parent,
                        model_dir.parent], max_dataset_rows=10_000_000)
    import transformers  # noqa: F401 - loaded before the start, as the baselines' is

    reporter = TimedReporter(stop_after_step=1)
    rss_at_start = rss_bytes()
    started = time.perf_counter()
    # Stopped after its first step, by the reporter, as a cancel would.
    with contextlib.suppress(TrainingStopped):
        tunery_run.run_job(request, work, reporter, settings)
    times = reporter.times
    first_step = (times["first_step"] - times["training_line"]
                  if {"first_step", "training_line"} <= times.keys() else None)
    return {"seconds": times["phase:loading_model"] - started,
            "peak_rss_bytes": reporter.peak_at_data_end, "rss_at_start_bytes": rss_at_start,
            "first_step_seconds": first_step,
            "log": [line for line in reporter.lines
                    if line.startswith(("tokenized", "split", "evaluation", "training "))],
            "from_cache": any(line.startswith("tokenized examples read from the cache")
                              for line in reporter.lines)}


def child(kind: str, data: Path, model_dir: Path, scratch: Path, out: Path) -> None:
    if kind == "loop":
        result = _loop(data, model_dir)
    elif kind == "map":
        result = _map(data, model_dir, scratch)
    else:
        result = _tunery(data, model_dir, scratch, cached=kind == "cached")
    out.write_text(json.dumps(result))


def run_contender(kind: str, data: Path, model_dir: Path, scratch: Path,
                  timeout_s: float) -> dict[str, Any]:
    out = scratch / f"{kind}.json"
    out.unlink(missing_ok=True)
    log_path = scratch / f"{kind}.log"
    with log_path.open("w") as log_file:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.data_phase", "--child", kind, "--data", str(data),
                 "--model-dir", str(model_dir), "--scratch", str(scratch), "--out", str(out)],
                stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:g} s"}
    if proc.returncode != 0 or not out.exists():
        tail = log_path.read_text()[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return dict(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 2000 rows")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", choices=CONTENDERS)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.model_dir, args.scratch, args.out)
        return 0

    model_dir = prepare_model(args.quick, args.model_dir)
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    contenders = [c for c in args.contenders.split(",") if c]
    load_at_start = load_average()
    results: dict[str, dict[str, Any]] = {}
    rows_out: list[list[str]] = []
    for size in sizes:
        scratch = SCRATCH_DIR / "data_phase" / str(size)
        data = scratch / "rows.jsonl"
        if not data.exists():
            write_rows(data, size)
        file_bytes = data.stat().st_size
        measured = {kind: run_contender(kind, data, model_dir, scratch, args.timeout_s)
                    for kind in contenders}
        results[str(size)] = {"file_bytes": file_bytes, **measured}
        tunery = measured.get("tunery", {})
        for kind, result in measured.items():
            if "error" in result:
                rows_out.append([f"{size:,}", kind, result["error"][:80], "", "", "", "", ""])
                continue
            ratio = (f"{result['seconds'] / tunery['seconds']:.2f}x"
                     if "seconds" in tunery else "n/a")
            first = result.get("first_step_seconds")
            grown = result["peak_rss_bytes"] - (result.get("rss_at_start_bytes") or 0)
            rows_out.append([
                f"{size:,}", kind, f"{result['seconds']:.2f} s", ratio,
                gb(result["peak_rss_bytes"]), gb(grown), f"{grown / file_bytes:.1f}x",
                "" if first is None else f"{first:.1f} s",
            ])
    payload = {"machine": machine_info(), "load_average_at_start": load_at_start,
               "load_average_at_end": load_average(), "cutoff_len": CUTOFF_LEN,
               "model_dir": str(model_dir), "results": results}
    path = write_results("data_phase", payload, args.results_dir)
    headers = ["rows", "contender", "data phase", "its time / Tunery's", "peak memory",
               "growth over the data phase", "growth / file",
               "first step after `training N steps`"]
    print(format_table(headers, rows_out))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
