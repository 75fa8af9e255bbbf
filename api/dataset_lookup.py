"""An uploaded dataset as a request names it: the dataset routes and the job preflight read
datasets through `resolve_dataset`, so an upload that arrived by presigned PUT is checked the
first time anything refers to it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from shared import datasets
from shared.models import Dataset, DatasetStatus
from shared.settings import Settings
from shared.storage import Storage
from shared.tenancy import Scope


def resolve_dataset(
    session: Session, storage: Storage, settings: Settings, scope: Scope, dataset_id: str
) -> Dataset:
    """The dataset if `scope` sees it, its upload checked first if the bytes arrived by
    presigned PUT.

    Raises `DatasetNotFound`, or `DatasetRejected` when that first check fails (the row then
    records the failure, so it is committed either way).
    """
    dataset = datasets.get_dataset(session, scope, dataset_id)
    if dataset.status == DatasetStatus.PENDING.value:
        with tempfile.TemporaryDirectory(prefix="tunery-upload-") as tmp:
            usage = datasets.tenant_usage(session, dataset.tenant_id)
            try:
                datasets.check_pending(
                    storage, dataset, Path(tmp), max_bytes=settings.limits.max_dataset_bytes,
                    quota_problem=lambda size: datasets.dataset_bytes_problem(
                        usage, size, settings.limits.max_tenant_dataset_bytes),
                )
            finally:
                session.commit()
    return dataset
