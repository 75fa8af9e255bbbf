"""Dataset files that no dataset row owns (an upload the store took in after the API had
answered 503) are removed by the maintenance sweep once they have stayed so for the grace
period; a dataset's own files, and an upload whose row arrives within the grace, stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import datasets
from shared.db import session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.orphaned_objects import OrphanedDatasetObjects
from shared.settings import get_settings
from shared.storage import (
    LocalStorage,
    Storage,
    StorageUnreachable,
    storage_from_settings,
)
from shared.storage_keys import dataset_key, dataset_prefix
from tests.fake_clock import FakeClock

GRACE_S = 600.0


def stored_dataset(storage: Storage, tmp_path: Path) -> str:
    """A dataset as an upload leaves it: its file in storage and its row."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    with session_scope() as session:
        tenant_id = create_api_key(session, "owner").tenant_id
        return datasets.create_dataset(session, storage, tenant_id, path, name="rows.jsonl",
                                       content_type=None, max_bytes=1 << 20).id


def test_a_file_without_a_dataset_goes_after_the_grace_and_nothing_else_does(
        tunery_env: Path, tmp_path: Path) -> None:
    upgrade_database(get_settings().database.url)
    storage = storage_from_settings(get_settings())
    owned = stored_dataset(storage, tmp_path)
    storage.put_bytes(dataset_key("ds_stored_after_a_503", "rows.jsonl"), b"{}")
    clock = FakeClock()
    orphans = OrphanedDatasetObjects(GRACE_S, clock=clock)

    assert orphans.sweep(storage) == []  # first seen now
    clock.now += GRACE_S - 1
    assert orphans.sweep(storage) == []
    clock.now += 1
    assert orphans.sweep(storage) == ["ds_stored_after_a_503"]

    assert storage.list(dataset_prefix("ds_stored_after_a_503")) == []
    assert len(storage.list(dataset_prefix(owned))) == 1


def test_an_upload_whose_row_arrives_within_the_grace_is_kept(
        tunery_env: Path, tmp_path: Path) -> None:
    upgrade_database(get_settings().database.url)
    storage = storage_from_settings(get_settings())
    clock = FakeClock()
    orphans = OrphanedDatasetObjects(GRACE_S, clock=clock)
    # What the sweep sees between an upload's put and its commit: a file, no row yet.
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    with session_scope() as session:
        tenant_id = create_api_key(session, "owner").tenant_id
        dataset = datasets.create_dataset(session, storage, tenant_id, path, name="rows.jsonl",
                                          content_type=None, max_bytes=1 << 20)
        assert orphans.sweep(storage) == []
    # Committed now; much later, the file is still the dataset's.
    clock.now += GRACE_S * 3
    assert orphans.sweep(storage) == []
    assert len(storage.list(dataset_prefix(dataset.id))) == 1


class UnreachableStore(LocalStorage):
    """A store whose server stopped answering mid-upload: the put times out; every clean-up
    call is counted, since against a hung server each would wait as long again. A test
    double of the server's state only; the real hung server is in
    tests/chaos/test_storage_outage.py."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cleanups = 0

    def put_file(self, key: str, path: Path) -> None:
        raise StorageUnreachable(f"cannot put {key}: Read timeout on endpoint URL")

    def delete_prefix(self, prefix: str) -> None:
        self.cleanups += 1
        super().delete_prefix(prefix)


def test_an_upload_the_store_does_not_answer_fails_at_once_without_a_cleanup(
        tunery_env: Path, tmp_path: Path) -> None:
    upgrade_database(get_settings().database.url)
    storage = UnreachableStore(tmp_path / "store")
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    with session_scope() as session:
        tenant_id = create_api_key(session, "owner").tenant_id
        with pytest.raises(StorageUnreachable):
            datasets.create_dataset(session, storage, tenant_id, path, name="rows.jsonl",
                                    content_type=None, max_bytes=1 << 20)
    assert storage.cleanups == 0
