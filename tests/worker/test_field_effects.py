"""Payload fields that act only when a job runs, checked through `run_job` rather than the inner
function that acts on them: a field dropped on the way from the request fails here."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.errors import PipelineError
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import TrainResult, run_job

HUB_MODEL = "tunery-tests/private-tiny-llama"
HUB_DATASET = "tunery-tests/alpaca-mini"
HF_TOKEN = "hf_field_effects_token"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubJob:
    result: TrainResult
    reporter: RecordingReporter
    # (method, url path, Authorization header) of every request that reached the fake hub
    hub_requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    # (dataset id, subset, token) of every datasets.load_dataset call
    dataset_calls: list[tuple[str, str | None, str | None]] = field(default_factory=list)


def fake_private_hub(model_dir: Path, requests: list[tuple[str, str, str | None]]) -> Any:
    """An httpx transport answering as huggingface.co does for a private model repo that holds
    `model_dir`'s files: without `HF_TOKEN` the repo does not exist."""
    import httpx2

    def handle(request: httpx2.Request) -> httpx2.Response:
        authorization = request.headers.get("authorization")
        requests.append((request.method, request.url.path, authorization))
        path = request.url.path
        if HUB_MODEL not in path:
            return httpx2.Response(404)
        if authorization != f"Bearer {HF_TOKEN}":
            # What the hub answers for a private repo, so as not to reveal that it exists.
            return httpx2.Response(401, headers={"X-Error-Code": "RepoNotFound"})
        if path.startswith(f"/api/models/{HUB_MODEL}/tree"):
            return httpx2.Response(200, json=[])
        if path.startswith(f"/api/models/{HUB_MODEL}"):
            siblings = [{"rfilename": p.name} for p in model_dir.iterdir()]
            return httpx2.Response(
                200, json={"id": HUB_MODEL, "sha": HUB_COMMIT, "siblings": siblings}
            )
        # /{repo}/resolve/{revision}/{filename}
        file = model_dir / path.removeprefix(f"/{HUB_MODEL}/resolve/").split("/", 1)[1]
        if not file.is_file():
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
        body = file.read_bytes()
        headers = {
            "X-Repo-Commit": HUB_COMMIT,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Length": str(len(body)),
        }
        return httpx2.Response(
            200, headers=headers, content=b"" if request.method == "HEAD" else body
        )

    return httpx2.MockTransport(handle)


@pytest.fixture(scope="module")
def hub_job(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> Iterator[HubJob]:
    """One job whose base model and dataset both come from the hub, with a subset and a token.

    The hub is the edge this machine cannot reach. For the model, huggingface_hub's HTTP client
    gets a transport that serves the tiny model as a private repo, so transformers and
    huggingface_hub run unchanged down to the request. For the dataset, datasets.load_dataset is
    replaced by a stand-in that records its arguments and returns a real in-memory Dataset.
    """
    import datasets
    import httpx2
    import huggingface_hub.constants
    from huggingface_hub.utils import _http

    tmp = tmp_path_factory.mktemp("hub-job")
    settings = Settings(data_dir=tmp / "data", allowed_local_dirs=[tmp])
    rows = [json.loads(line) for line in DATASET_PATH.read_text().splitlines()]
    job = HubJob(None, RecordingReporter())  # type: ignore[arg-type]

    def load_hub_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        job.dataset_calls.append((path, name, kwargs.get("token")))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    transport = fake_private_hub(tiny_model_dir, job.hub_requests)
    request = make_request(
        HUB_DATASET,
        model={"model_path": HUB_MODEL},
        data={"data_subset": "en", "data_split_config": {"train": 0.08, "validation": 0.0}},
        hf={"hf_token": HF_TOKEN},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("HF_TOKEN", raising=False)  # only the request's token may reach the hub
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hub-cache"))
        patch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp / "no-token"))
        patch.setattr(_http, "_GLOBAL_CLIENT", None)
        patch.setattr(
            _http,
            "_GLOBAL_CLIENT_FACTORY",
            lambda: httpx2.Client(transport=transport, follow_redirects=True),
        )
        patch.setattr(datasets, "load_dataset", load_hub_dataset)
        patch.chdir(tmp)  # hub ids that are also local paths are refused
        job.result = run_job(request, tmp / "work", job.reporter, settings)
        yield job


def _downloads(job: HubJob, filename: str) -> list[str | None]:
    """The Authorization headers of the hub requests for one file of the model repo."""
    return [
        authorization
        for method, path, authorization in job.hub_requests
        if method == "GET"
        and path.startswith(f"/{HUB_MODEL}/resolve/")
        and path.endswith("/" + filename)
    ]


def test_hf_token_reaches_the_hub_for_the_tokenizer_and_the_model(hub_job: HubJob) -> None:
    # The tokenizer and the weights come from two loaders (load_tokenizer, load_model); each
    # must send the request's token, or the private repo answers "not found".
    assert _downloads(hub_job, "tokenizer.json") == [f"Bearer {HF_TOKEN}"]
    assert _downloads(hub_job, "model.safetensors") == [f"Bearer {HF_TOKEN}"]
    assert hub_job.result.steps == 6


def test_data_subset_and_hf_token_reach_the_hub_dataset_loader(hub_job: HubJob) -> None:
    assert hub_job.dataset_calls == [(HUB_DATASET, "en", HF_TOKEN)]
    assert f"dataset {HUB_DATASET} (subset en): 300 rows" in " ".join(hub_job.reporter.lines)
    assert hub_job.result.train_rows == 24


def test_presigned_source_type_with_a_local_path_fails_through_run_job(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(data={"data_source_type": "s3_presigned_link"})
    reporter = RecordingReporter()

    with pytest.raises(PipelineError, match="'s3_presigned_link' needs an https URL"):
        run_job(request, tmp_path / "work", reporter, settings)

    assert reporter.phases == ["loading_data"]


def test_qlora_job_with_gradient_checkpointing_trains(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(
        model={"use_quantization": True, "use_gradient_checkpointing": True},
        data={"data_split_config": {"train": 0.08, "validation": 0.0}},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert any("4-bit NF4" in line for line in reporter.lines)
    assert "gradient checkpointing on" in reporter.lines
    assert result.steps == 6
    losses = reporter.values("loss")
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert result.last_loss is not None and result.first_loss is not None
    assert result.last_loss < result.first_loss
    assert all(norm > 0 for norm in reporter.values("grad_norm")[1:])
