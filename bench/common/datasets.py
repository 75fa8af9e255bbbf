"""The two benchmark datasets, rendered and tokenized the way Tunery does it.

short: `worker/assets/alpaca_sample.jsonl` as it is (300 short instruction rows).
long: deterministic synthetic rows, each joining `k` rows of the same file into one numbered
multi-task instruction and one numbered answer (median about 400 SmolLM2 tokens at k=13).

Both hold out the last `EVAL_FRACTION` of the file's rows: the eval examples are built only
from those rows, the training examples only from the others.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.machine import PROJECT_ROOT

SAMPLE_PATH = PROJECT_ROOT / "worker" / "assets" / "alpaca_sample.jsonl"
# The template Tunery's tests and docs use; everything before {output} is the prompt.
ALPACA_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
EVAL_FRACTION = 0.1
LONG_SEED = 1234
IGNORE_INDEX = -100

Row = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One tokenized example: labels are -100 on the prompt, the ids on the response + EOS."""

    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class BenchData:
    name: str
    cutoff_len: int
    train_rows: list[Row]
    eval_rows: list[Row]


def read_sample_rows(path: Path = SAMPLE_PATH) -> list[Row]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [{k: str(row.get(k) or "") for k in ("instruction", "input", "output")} for row in rows]


def split_rows(rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """(train pool, held-out rows): the held-out rows are the file's last `EVAL_FRACTION`."""
    n_eval = max(1, round(len(rows) * EVAL_FRACTION))
    return list(rows[:-n_eval]), list(rows[-n_eval:])


def join_rows(rows: Sequence[Row]) -> Row:
    """Several rows as one long row: tasks numbered in the instruction, answers in the output."""
    tasks = []
    for i, row in enumerate(rows, 1):
        task = f"Task {i}: {row['instruction']}"
        if row["input"]:
            task += f"\nInput: {row['input']}"
        tasks.append(task)
    return {
        "instruction": f"Answer each of the following {len(rows)} tasks, in order.\n\n"
        + "\n\n".join(tasks),
        "input": "",
        "output": "\n".join(f"{i}. {row['output']}" for i, row in enumerate(rows, 1)),
    }


def long_rows(pool: Sequence[Row], n: int, rows_per_example: int, seed: int) -> list[Row]:
    """`n` long rows, each joining `rows_per_example` rows drawn without replacement from
    `pool` by a seeded generator: the same arguments always give the same rows."""
    rng = random.Random(seed)
    k = min(rows_per_example, len(pool))
    return [join_rows(rng.sample(list(pool), k)) for _ in range(n)]


def build_data(
    name: str, *, n_train: int, n_eval: int, cutoff_len: int, rows_per_long_example: int = 13
) -> BenchData:
    """The `short` or `long` dataset: `n_train` training rows and `n_eval` held-out rows."""
    train_pool, eval_pool = split_rows(read_sample_rows())
    if name == "short":
        return BenchData(name, cutoff_len, train_pool[:n_train], eval_pool[:n_eval])
    if name == "long":
        return BenchData(
            name,
            cutoff_len,
            long_rows(train_pool, n_train, rows_per_long_example, LONG_SEED),
            long_rows(eval_pool, n_eval, rows_per_long_example, LONG_SEED + 1),
        )
    raise ValueError(f"unknown dataset {name!r}; use 'short' or 'long'")


def render(row: Row) -> tuple[str, str]:
    """(prompt, completion) as Tunery's `render_example` splits the template: the completion
    is the last placeholder's value, here {output}."""
    prompt = ALPACA_TEMPLATE.split("{output}")[0].format(
        instruction=row["instruction"], input=row["input"]
    )
    return prompt, row["output"]


def tokenize_rows(rows: Sequence[Row], tokenizer: Any, cutoff_len: int) -> list[Example]:
    """prompt + completion + EOS, cut to `cutoff_len`, labels -100 on the prompt.

    Same rules as Tunery's `tokenize`: the prompt mask comes from character offsets (a token
    straddling the boundary is trained), EOS is appended and trained, a cut example gets no
    EOS. Rows with no response token left are dropped.
    """
    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        prompt, completion = render(row)
        enc = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        trained = [end > len(prompt) for _start, end in enc["offset_mapping"]]
        if ids and ids[-1] == eos:
            trained[-1] = True
        else:
            ids, trained = [*ids, eos], [*trained, True]
        ids, trained = ids[:cutoff_len], trained[:cutoff_len]
        if not any(trained):
            continue
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
        out.append(Example(ids, labels))
    return out


def length_stats(examples: Sequence[Example]) -> dict[str, float]:
    lengths = sorted(len(e.input_ids) for e in examples)
    response = sum(e.response_tokens for e in examples)
    total = sum(lengths)
    return {
        "examples": len(lengths),
        "tokens": total,
        "median": statistics.median(lengths),
        "p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))],
        "max": lengths[-1],
        "response_share": round(response / total, 3) if total else 0.0,
    }


def write_jsonl(rows: Sequence[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
