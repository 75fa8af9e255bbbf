"""`data_config.validation_data_path`: an uploaded dataset is the eval set, read, rendered and
tokenized as data_path is, instead of a split of data_path. The data stage on the tiny model's
tokenizer, and one real job on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from shared.storage import storage_from_settings
from shared.storage_keys import dataset_key, tokenized_prefix
from worker.pipeline.errors import PipelineError
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import PreparedData, prepare_data, run_job

from .conftest import DATASET_PATH

TRAINING_ID = "ds_" + "1" * 32
VALIDATION_ID = "ds_" + "5" * 32
HELD_OUT = 20
# Rows no bundled training row resembles, each naming its own number.
HELD_OUT_ROWS = [{"instruction": f"Spell the held-out number {k}.", "input": "",
                  "output": f"held-out {k}"} for k in range(HELD_OUT)]
HELD_OUT_NUMBER = re.compile(r"held-out number (\d+)\.")


def evaluated_on(validation_id: str, **data: Any) -> dict[str, Any]:
    """The data_config of a job evaluated on `validation_id`; the worker tests' usual split
    holds rows out, which a validation dataset does not allow."""
    return {"validation_data_path": validation_id, "data_split_config": {"train": 1.0}, **data}


def upload(settings: Settings, tmp_path: Path, dataset_id: str,
           rows: list[dict[str, Any]] | None = None) -> str:
    """Put a dataset into storage as an accepted upload leaves it: the bundled 300 alpaca
    rows, or `rows`."""
    path = DATASET_PATH
    if rows is not None:
        path = tmp_path / f"{dataset_id}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    storage_from_settings(settings).put_file(dataset_key(dataset_id, path.name), path)
    return dataset_id


@pytest.fixture
def datasets(settings: Settings, tmp_path: Path) -> tuple[str, str]:
    return (upload(settings, tmp_path, TRAINING_ID),
            upload(settings, tmp_path, VALIDATION_ID, HELD_OUT_ROWS))


def prepared(request: Any, settings: Settings, work: Path) -> tuple[PreparedData,
                                                                    RecordingReporter]:
    reporter = RecordingReporter()
    return prepare_data(request, work, reporter, settings), reporter


def texts(examples: Any, tokenizer: Any) -> list[str]:
    return [tokenizer.decode(example.input_ids) for example in examples]


def held_out_numbers(examples: Any, tokenizer: Any) -> list[int]:
    return [int(match.group(1)) for text in texts(examples, tokenizer)
            if (match := HELD_OUT_NUMBER.search(text))]


def test_the_eval_set_is_every_row_of_the_validation_dataset_and_no_training_row(
    settings: Settings, make_request: Any, datasets: tuple[str, str], tmp_path: Path,
) -> None:
    training_id, validation_id = datasets
    request = make_request(training_id, data=evaluated_on(validation_id),
                           training={"max_eval_examples": 1000})

    data, reporter = prepared(request, settings, tmp_path / "work")

    # Each held-out row once, and nothing else: every eval example names a held-out number.
    assert len(data.eval_set) == HELD_OUT
    assert sorted(held_out_numbers(data.eval_set, data.tokenizer)) == list(range(HELD_OUT))
    # data_path trains whole, and none of its examples is a held-out row.
    assert len(data.train_set) == 300
    assert held_out_numbers(data.train_set, data.tokenizer) == []
    assert (f"split (seed 42): 300 train examples; the validation examples are those of "
            f"validation_data_path {validation_id}") in reporter.lines
    assert f"validation (seed 42): {HELD_OUT} examples of validation_data_path " \
           f"{validation_id}" in reporter.lines
    # Rendered through the job's template and tokenized to its cutoff_len as data_path is.
    assert any(line.startswith(f"validation_data_path: tokenized {HELD_OUT} examples: 0 "
                               "truncated to cutoff_len 64") for line in reporter.lines)
    assert not any("evaluation and early stopping are disabled" in line
                   for line in reporter.lines)


def test_the_validation_dataset_renders_through_the_jobs_template(
    settings: Settings, make_request: Any, datasets: tuple[str, str], tmp_path: Path,
) -> None:
    training_id, validation_id = datasets
    request = make_request(training_id, data=evaluated_on(
                               validation_id, prompt_template="Q: {instruction} A: {output}",
                               data_split_config={"train": 0.1}),
                           training={"max_eval_examples": 1000})

    data, _ = prepared(request, settings, tmp_path / "work")

    assert len(data.train_set) == 30  # the train fraction applies to data_path
    shown = sorted(texts(data.eval_set, data.tokenizer), key=len)[0]
    assert re.search(r"Q: Spell the held-out number \d\. A: held-out \d", shown), shown


def test_max_eval_examples_takes_a_seeded_sample_of_the_validation_dataset(
    settings: Settings, make_request: Any, datasets: tuple[str, str], tmp_path: Path,
) -> None:
    training_id, validation_id = datasets
    request = make_request(training_id, data=evaluated_on(validation_id),
                           training={"max_eval_examples": 5})

    first, _ = prepared(request, settings, tmp_path / "first")
    again, _ = prepared(request, settings, tmp_path / "again")

    numbers = held_out_numbers(first.eval_set, first.tokenizer)
    assert len(first.eval_set) == len(numbers) == 5
    assert numbers == held_out_numbers(again.eval_set, again.tokenizer)
    assert numbers != list(range(5))  # a seeded sample, not the file's first rows


def test_orpo_evaluates_on_the_validation_datasets_preference_rows(
    settings: Settings, make_request: Any, tmp_path: Path,
) -> None:
    def pairs(prefix: str, n: int) -> list[dict[str, str]]:
        return [{"prompt": f"{prefix} {i}?", "chosen": f"yes {i}", "rejected": "no"}
                for i in range(n)]

    training_id = upload(settings, tmp_path, TRAINING_ID, pairs("train", 16))
    validation_id = upload(settings, tmp_path, VALIDATION_ID, pairs("held out", 6))
    request = make_request(training_id, data=evaluated_on(validation_id),
                           training={"preference_optimization": "ORPO"})

    data, _ = prepared(request, settings, tmp_path / "work")

    assert sorted(row["prompt"] for row in data.eval_set) == sorted(
        row["prompt"] for row in pairs("held out", 6))
    assert sorted(row["prompt"] for row in data.train_set) == sorted(
        row["prompt"] for row in pairs("train", 16))


def test_each_dataset_keeps_its_own_tokens_and_a_second_job_reads_both_from_the_cache(
    settings: Settings, make_request: Any, datasets: tuple[str, str], tmp_path: Path,
) -> None:
    training_id, validation_id = datasets
    request = make_request(training_id, data=evaluated_on(validation_id),
                           training={"max_eval_examples": 1000})

    first, first_log = prepared(request, settings, tmp_path / "first")
    second, second_log = prepared(request, settings, tmp_path / "second")

    storage = storage_from_settings(settings)
    for dataset_id in datasets:
        assert storage.list(tokenized_prefix(dataset_id)), dataset_id
    assert any(line.startswith("tokenized examples read from the cache: 300 examples")
               for line in second_log.lines)
    assert any(line.startswith(f"validation_data_path: tokenized examples read from the "
                               f"cache: {HELD_OUT} examples") for line in second_log.lines)
    assert not any("downloaded uploaded dataset" in line for line in second_log.lines)
    assert first.train_set == second.train_set and first.eval_set == second.eval_set
    assert not any("read from the cache" in line for line in first_log.lines)


def test_a_validation_dataset_without_the_templates_columns_fails_naming_it(
    settings: Settings, make_request: Any, tmp_path: Path,
) -> None:
    validation_id = upload(settings, tmp_path, VALIDATION_ID, [{"question": "?"}] * 3)
    request = make_request(upload(settings, tmp_path, TRAINING_ID),
                           data=evaluated_on(validation_id))

    with pytest.raises(PipelineError, match=r"^validation_data_path: prompt_template uses "
                                            r"columns the dataset does not have"):
        prepared(request, settings, tmp_path / "work")


def test_a_plateau_scheduled_job_evaluates_on_the_validation_dataset_and_keeps_its_best(
    settings: Settings, make_request: Any, datasets: tuple[str, str], tmp_path: Path,
) -> None:
    training_id, validation_id = datasets
    request = make_request(training_id, data=evaluated_on(validation_id,
                                                 data_split_config={"train": 0.08}),
                           training={"lr_scheduler_type": "reduce_lr_on_plateau",
                                     "max_eval_examples": 1000})
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert (result.train_rows, result.eval_rows) == (24, HELD_OUT)
    evaluations = [values["eval_loss"] for _, values in reporter.metrics
                   if "eval_loss" in values]
    assert len(evaluations) >= 2  # the baseline before the first step, and after training
    assert result.best_eval_loss == min(evaluations)
