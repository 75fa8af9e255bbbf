"""OpenAI's `client.models.delete`, unchanged, against a real uvicorn on SQLite and
PostgreSQL: a fine-tuned model is deleted by its `ft:` name with its job and files; a base
model and another tenant's model are refused."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from openai import NotFoundError, OpenAI, PermissionDeniedError

from shared.settings import get_settings
from shared.storage import storage_from_settings
from tests.api.conftest import new_key
from tests.api.test_job_delete import job_files, job_with_everything, objects_of, rows_of


@pytest.fixture
def offered_base(monkeypatch: pytest.MonkeyPatch) -> str:
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setenv("TUNERY_INFERENCE_BASE_MODELS", f'["{base}"]')
    get_settings.cache_clear()
    return base


def test_the_openai_client_deletes_a_fine_tuned_model_by_its_ft_name(
        offered_base: str, served: tuple[str, Callable[[], int]]) -> None:
    url, _ = served
    key = new_key("tenant-a")
    client = OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
    other = OpenAI(api_key=new_key("tenant-b"), base_url=f"{url}/v1", max_retries=0)
    storage = storage_from_settings(get_settings())

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        job_id = job_with_everything(http)
    model = next(m.id for m in client.models.list() if m.id.startswith("ft:"))
    assert model.endswith(job_id[:8])

    with pytest.raises(NotFoundError):
        other.models.delete(model)
    with pytest.raises(PermissionDeniedError):
        client.models.delete(offered_base)
    assert sorted(objects_of(storage, job_id)) == sorted(job_files(job_id))

    deleted = client.models.delete(model)

    assert (deleted.id, deleted.object, deleted.deleted) == (model, "model", True)
    assert objects_of(storage, job_id) == []
    assert rows_of(job_id) == dict.fromkeys(rows_of(job_id), 0)
    assert model not in [m.id for m in client.models.list()]
    with pytest.raises(NotFoundError):
        client.models.delete(model)
