"""Dataset objects in storage that no dataset row owns, removed by the maintenance sweep.

They come from an upload the store took in after the API had given up on it (a hung store
answers the API's timeout, then stores the bytes once it wakes): the API answered 503 and
committed no row, so nothing else would ever remove them, and no tenant's quota counts them.

An object is only removed once it has stayed without a row for `grace_s`: an upload in
progress stores its object a moment before it commits its row. Storage keeps no time a
listing could show for every backend, so the age is this sweeper's own: when it first saw
the object without a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select

from shared.datasets import discard_objects
from shared.db import session_scope
from shared.models import Dataset
from shared.storage import Storage

log = logging.getLogger("tunery.maintenance")

DATASETS_ROOT = "datasets/"


class OrphanedDatasetObjects:
    """Remembers the dataset ids it found in storage without a row; removes their objects
    once they have stayed so for `grace_s`."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.clock = clock
        self._first_seen: dict[str, float] = {}

    def sweep(self, storage: Storage) -> list[str]:
        """One pass; returns the dataset ids whose objects it removed."""
        stored = {obj.key.split("/", 2)[1] for obj in storage.list(DATASETS_ROOT)
                  if obj.key.count("/") >= 2}
        if not stored:
            self._first_seen.clear()
            return []
        with session_scope() as session:
            owned = set(session.scalars(select(Dataset.id).where(Dataset.id.in_(stored))))
        now = self.clock()
        orphans = stored - owned
        # An id that got its row meanwhile, or whose objects went, is forgotten.
        self._first_seen = {i: t for i, t in self._first_seen.items() if i in orphans}
        removed = []
        for dataset_id in sorted(orphans):
            first = self._first_seen.setdefault(dataset_id, now)
            if now - first >= self.grace_s:
                discard_objects(storage, dataset_id)
                del self._first_seen[dataset_id]
                removed.append(dataset_id)
        if removed:
            log.warning("maintenance: removed the stored files of %d upload(s) that have no "
                        "dataset (stored after the API gave up on them): %s",
                        len(removed), ", ".join(removed))
        return removed
