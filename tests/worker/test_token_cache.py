"""An uploaded dataset's tokenized examples are kept in storage: a resumed attempt, a retry
and a repeated job read them instead of downloading and tokenizing the dataset again."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from shared.datasets import discard_objects
from shared.settings import Settings
from shared.storage import storage_from_settings
from shared.storage_keys import dataset_key, tokenized_prefix
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job
from worker.pipeline.token_cache import MANIFEST

from .conftest import DATASET_PATH

DATASET_ID = "ds_" + "2" * 32
READ_FROM_CACHE = "tokenized examples read from the cache"


@pytest.fixture
def uploaded(settings: Settings) -> str:
    storage_from_settings(settings).put_file(dataset_key(DATASET_ID, DATASET_PATH.name),
                                             DATASET_PATH)
    return DATASET_ID


def run_to_first_step(request: Any, settings: Settings, work: Path) -> RecordingReporter:
    reporter = RecordingReporter(stop_after_step=1)
    with contextlib.suppress(TrainingStopped):
        run_job(request, work, reporter, settings)
    assert reporter.metrics, reporter.lines
    return reporter


def split_line(reporter: RecordingReporter) -> str:
    return next(line for line in reporter.lines if line.startswith("split"))


def test_a_second_job_on_the_same_upload_reads_its_tokens_from_the_cache(
    settings: Settings, make_request: Any, uploaded: str, tmp_path: Path,
) -> None:
    request = make_request(uploaded)

    first = run_to_first_step(request, settings, tmp_path / "first")
    second = run_to_first_step(request, settings, tmp_path / "second")

    assert not any(line.startswith(READ_FROM_CACHE) for line in first.lines)
    assert any(line.startswith("tokenized examples kept for later") for line in first.lines)
    assert any(line.startswith(READ_FROM_CACHE) for line in second.lines)
    # Neither downloaded nor tokenized again, yet the same examples and the same split.
    assert not any(line.startswith("downloaded uploaded dataset") for line in second.lines)
    tokenized = [line for line in first.lines if line.startswith("tokenized 300 examples")]
    assert tokenized and all(line in second.lines for line in tokenized)
    # In the order of a first run: the template, then what the cache holds, said as such.
    order = [next(i for i, line in enumerate(second.lines) if line.startswith(start))
             for start in ("prompt_template: ", READ_FROM_CACHE, "tokenized 300 examples")]
    assert order == sorted(order), second.lines
    assert split_line(first) == split_line(second)
    assert first.metrics[0] == second.metrics[0]


def test_another_cutoff_len_tokenizes_again_and_a_cut_off_copy_is_not_read(
    settings: Settings, make_request: Any, uploaded: str, tmp_path: Path,
) -> None:
    run_to_first_step(make_request(uploaded), settings, tmp_path / "first")
    other = run_to_first_step(make_request(uploaded, data={"cutoff_len": 48}), settings,
                              tmp_path / "other")
    assert not any(line.startswith(READ_FROM_CACHE) for line in other.lines)

    # An upload of the cache cut off before its manifest: tokenized again, then kept whole.
    storage = storage_from_settings(settings)
    for item in storage.list(tokenized_prefix(DATASET_ID)):
        if item.key.endswith(MANIFEST):
            storage.delete_prefix(item.key.removesuffix(MANIFEST))
            break
    again = run_to_first_step(make_request(uploaded), settings, tmp_path / "again")
    assert not any(line.startswith(READ_FROM_CACHE) for line in again.lines)
    cached = run_to_first_step(make_request(uploaded), settings, tmp_path / "cached")
    assert any(line.startswith(READ_FROM_CACHE) for line in cached.lines)


def test_deleting_the_dataset_deletes_its_tokens(
    settings: Settings, make_request: Any, uploaded: str, tmp_path: Path,
) -> None:
    run_to_first_step(make_request(uploaded), settings, tmp_path / "first")
    storage = storage_from_settings(settings)
    assert storage.list(tokenized_prefix(DATASET_ID))

    discard_objects(storage, DATASET_ID)

    assert storage.list(tokenized_prefix(DATASET_ID)) == []
