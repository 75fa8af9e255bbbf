"""Full fine-tuning (`use_lora` false) with real training on the tiny model: every weight
trains, a stopped job resumes exactly, the memory plan picks the optimizer or refuses, the
base model cache never keeps a base a job trained, and the export loads as the trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared import jobs
from shared.artifacts import list_artifacts
from shared.db import session_scope
from shared.exports import ExportClaim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job as DbJob
from shared.models import JobStatus
from shared.settings import Settings, get_settings
from shared.storage import LocalStorage, storage_from_settings
from shared.storage_keys import CHECKPOINT_MARKER, job_artifact_key, job_checkpoint_prefix
from tests.worker.resume_stack import Job, Stack, make_stack, store
from worker.assets.build_dataset import DATASET_PATH
from worker.export_run import export_files
from worker.pipeline.base_cache import BaseModelCache
from worker.pipeline.checkpoints import find_latest_checkpoint
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.full_finetune import (
    plan_static_memory,
    prepare_full_finetune,
    static_bytes,
)
from worker.pipeline.memory_plan import USABLE_SHARE
from worker.pipeline.model import load_base_model
from worker.pipeline.model_export import export_full_model
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job
from worker.tasks import run_claimed_job

FULL = {"use_lora": False}
# As for LoRA (test_checkpoints): a resumed run ends bit-identical here; the tolerance only
# leaves room for kernels that are not bit-deterministic elsewhere.
RESUME_ATOL = 1e-6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Stack:
    return make_stack(tmp_path_factory, "full-finetune", tiny_model_dir)


@pytest.fixture(scope="module")
def uninterrupted(stack: Stack, make_request: Any) -> Job:
    """Six steps of a full fine-tune in one go, a checkpoint every two."""
    reporter = RecordingReporter()
    request = make_request(model={**FULL, "lora_r": 4})
    result = run_job(request, stack.work / "a", reporter, stack.settings, store(stack, "job-a"))
    return Job(result, reporter)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_full_finetune_changes_every_weight_and_lowers_the_loss(
    uninterrupted: Job, tiny_model_dir: Path,
) -> None:
    trained, base = weights(uninterrupted.result.output_dir), weights(tiny_model_dir)
    assert trained.keys() == base.keys()
    unchanged = [name for name in base if torch.equal(trained[name].to(base[name].dtype),
                                                      base[name])]
    assert unchanged == []
    assert {t.dtype for t in trained.values()} == {torch.float32}
    losses = uninterrupted.reporter.values("loss")
    assert len(losses) == 6 and losses[-1] < losses[0]
    lines = uninterrupted.reporter.lines
    assert any(line.startswith("full fine-tuning: all ") and "fp32 master weights" in line
               for line in lines)
    assert any("AdamW moments" in line for line in lines)
    # lora_r set in the request: unused, and the job says so.
    assert any("lora_r: unused, use_lora is false" in w for w in uninterrupted.reporter.warnings)
    names = {p.name for p in uninterrupted.result.output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json"} <= names
    assert "adapter_model.safetensors" not in names


def test_stopped_full_finetune_resumes_like_an_uninterrupted_one(
    stack: Stack, uninterrupted: Job, make_request: Any,
) -> None:
    request = make_request(model={**FULL, "lora_r": 4})
    first = RecordingReporter(stop_after_step=3)
    with pytest.raises(TrainingStopped):
        run_job(request, stack.work / "b1", first, stack.settings, store(stack, "job-b"))
    latest = find_latest_checkpoint(stack.storage, "job-b")
    assert latest is not None and latest.step == 2
    assert "model.safetensors" in latest.files and "optimizer.pt" in latest.files

    second = RecordingReporter()
    result = run_job(request, stack.work / "b2", second, stack.settings,
                     store(stack, "job-b", attempt=2))

    assert "resumed from step 2 (attempt 2)" in second.lines
    assert second.steps("loss") == [3, 4, 5, 6]
    assert second.values("loss") == pytest.approx(uninterrupted.reporter.values("loss")[2:],
                                                  abs=1e-6)
    resumed, reference = weights(result.output_dir), weights(uninterrupted.result.output_dir)
    assert resumed.keys() == reference.keys()
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, reference[name], atol=RESUME_ATOL, rtol=0)


def test_export_loads_with_transformers_and_gives_the_trained_models_logits(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any,
) -> None:
    from transformers import AutoModelForCausalLM

    model = load_base_model(str(tiny_model_dir), _full_config(),
                            allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")
    prepare_full_finetune(model, _full_config(), compute=torch.float32,
                          reporter=RecordingReporter())
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    out = export_full_model(model, tiny_tokenizer, tmp_path / "out", base_model="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = model.state_dict()
    assert all(torch.equal(tensor, trained[name])
               for name, tensor in loaded.state_dict().items())
    # The same weights; only the attention kernel differs (transformers' default, not the
    # worker's blocked CPU attention), by rounding.
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert loaded.config.use_cache is True


def test_merged_export_of_a_full_finetune_is_its_model_and_gguf_converts_it_directly(
    tmp_path: Path, uninterrupted: Job, settings: Settings,
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    for path in uninterrupted.result.output_dir.iterdir():
        storage.put_file(job_artifact_key("job-full", path.name), path)
    lines: list[str] = []

    def claim(kind: str) -> ExportClaim:
        return ExportClaim("export-1", "job-full", "tenant", kind, 1, "test")

    names = export_files(claim("merged"), "unused/base", tmp_path / "merged", settings,
                         storage, lines.append)
    assert "exported as it is, unmerged" in lines[0]
    assert "exports/merged/model.safetensors" in names
    exported = tmp_path / "exported.safetensors"
    storage.download_file(job_artifact_key("job-full", "exports/merged/model.safetensors"),
                          exported)
    assert load_file(exported).keys() == weights(uninterrupted.result.output_dir).keys()
    # The converter reads the model directory itself: it gets as far as the tiny model's
    # tokenizer, which it refuses (test_export_gguf: a known tokenizer converts).
    (tmp_path / "gguf" / "cwd").mkdir(parents=True)  # run_export's working directory
    with pytest.raises(PipelineError, match="does not know this model's BPE pre-tokenizer"):
        export_files(claim("gguf-f16"), "unused/base", tmp_path / "gguf", settings, storage,
                     lines.append)


def test_memory_plan_takes_8bit_adamw_then_refuses_as_memory_shrinks(
    tiny_model_dir: Path,
) -> None:
    model = load_base_model(str(tiny_model_dir), _full_config(),
                            allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")
    parameters = sum(p.numel() for p in model.parameters())
    fp32 = static_bytes(parameters, eight_bit=False)
    eight_bit = static_bytes(parameters, eight_bit=True)
    lines: list[str] = []

    roomy = plan_static_memory(model, limit_bytes=None, log=lines.append)
    between = (fp32 + eight_bit) / 2 / USABLE_SHARE
    tight = plan_static_memory(model, limit_bytes=between, log=lines.append)
    with pytest.raises(PipelineError, match="GiB available on this worker") as refused:
        plan_static_memory(model, limit_bytes=eight_bit / 2, log=lines.append)

    assert roomy.optimizer == "adamw_torch_fused" and roomy.static_bytes == fp32
    assert tight.optimizer == "adamw_8bit" and tight.static_bytes == eight_bit
    assert tight.activation_limit_bytes == pytest.approx(between - eight_bit)
    assert "8-bit AdamW (adamw_8bit, bitsandbytes) instead" in lines[1]
    assert f"{parameters:,} parameters" in str(refused.value)


def test_full_finetune_short_of_memory_trains_with_8bit_adamw_or_fails_before_training(
    tmp_path: Path, settings: Settings, make_request: Any, tiny_model_dir: Path,
) -> None:
    model = load_base_model(str(tiny_model_dir), _full_config(),
                            allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")
    parameters = sum(p.numel() for p in model.parameters())
    # Room for 8-bit AdamW's 10 bytes a parameter, not for AdamW's 16.
    between = 13 * parameters / USABLE_SHARE / 2**30
    reporter = RecordingReporter()
    result = run_job(make_request(model=FULL), tmp_path / "tight", reporter,
                     _with_memory(settings, between))
    assert any("8-bit AdamW (adamw_8bit, bitsandbytes) instead" in x for x in reporter.lines)
    assert result.last_loss < result.first_loss  # type: ignore[operator]

    starved = RecordingReporter()
    with pytest.raises(PipelineError, match="needs .* GiB .* GiB available"):
        run_job(make_request(model=FULL), tmp_path / "starved", starved,
                _with_memory(settings, 5 * parameters / 2**30))
    assert starved.steps("loss") == []


def test_base_cache_never_keeps_a_fully_trained_base(
    tmp_path: Path, settings: Settings, make_request: Any, tiny_model_dir: Path,
) -> None:
    cache = BaseModelCache()
    first = RecordingReporter()
    run_job(make_request(), tmp_path / "lora-1", first, settings, base_models=cache)
    assert cache.key is not None

    full = RecordingReporter()
    run_job(make_request(model=FULL), tmp_path / "full", full, settings, base_models=cache)
    assert cache.key is None
    assert ("base model loaded; not kept for later jobs (full fine-tuning changes it)"
            in full.lines)

    third = RecordingReporter()
    run_job(make_request(), tmp_path / "lora-2", third, settings, base_models=cache)
    assert "base model loaded into this worker's cache (empty before)" in third.lines
    # What job 3 trained on (and the cache keeps, reset) is bit for bit a fresh load.
    with cache.checkout(cache.key, _unexpected_load) as kept:
        fresh = load_base_model(str(tiny_model_dir), make_request().pretrainedmodel_config,
                                allowed_local_dirs=[tiny_model_dir.parent])
        kept_state, fresh_state = kept.state_dict(), fresh.state_dict()
        assert kept_state.keys() == fresh_state.keys()
        for name, tensor in fresh_state.items():
            assert torch.equal(kept_state[name], tensor), name


def test_a_full_finetune_job_completes_with_its_model_as_artifacts(
    tunery_env: Path, tiny_model_dir: Path, make_request: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "TUNERY_ALLOWED_LOCAL_DIRS", f'["{DATASET_PATH.parent}", "{tiny_model_dir.parent}"]'
    )
    monkeypatch.setenv("TUNERY_CHECKPOINT_EVERY_STEPS", "2")
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_database(settings.database.url)
    storage = storage_from_settings(settings)
    request = make_request(model=FULL)
    with session_scope() as session:
        tenant_id = create_api_key(session, "full").tenant_id
        job_id = jobs.create_job(session, tenant_id, request, max_attempts=1,
                                 device_class="train").id
        claim = jobs.claim_job(session, job_id, "worker-1", settings.leases.lease_seconds)
    assert claim is not None

    run_claimed_job(claim, request)

    with session_scope() as session:
        job = session.get_one(DbJob, job_id)
        assert job.status == JobStatus.COMPLETED, job.error
    artifacts = {a.name for a in list_artifacts(storage, job_id)}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json"} <= artifacts
    # Completed: the checkpoints' copies of the whole model and optimizer are gone.
    kept = {obj.key.rsplit("/", 1)[1] for obj in storage.list(job_checkpoint_prefix(job_id))}
    assert kept == {CHECKPOINT_MARKER}


def _unexpected_load() -> Any:
    raise AssertionError("the cache should have kept job 3's base")


def _full_config() -> Any:
    from shared.schema import PretrainedModelConfig

    return PretrainedModelConfig(use_lora=False)


def _with_memory(settings: Settings, gigabytes: float) -> Settings:
    return settings.model_copy(update={
        "training": settings.training.model_copy(update={"training_memory_gb": gigabytes}),
    })


def test_full_finetune_on_bf16_hardware_keeps_fp32_weights_and_computes_in_bf16(
    tmp_path: Path, settings: Settings, make_request: Any,
) -> None:
    # TUNERY_CPU_BF16=on: the dtype a LoRA job would load its base in is bf16.
    bf16 = settings.model_copy(update={
        "training": settings.training.model_copy(update={"cpu_bf16": "on"}),
    })
    reporter = RecordingReporter()
    result = run_job(make_request(model=FULL), tmp_path / "bf16", reporter, bf16)

    assert "base model loaded in torch.float32" in reporter.lines
    assert any(line.startswith("full fine-tuning: all ")
               and line.endswith("fp32 master weights, forward and backward in bfloat16 "
                                 "autocast") for line in reporter.lines)
    assert {t.dtype for t in weights(result.output_dir).values()} == {torch.float32}
    assert result.last_loss < result.first_loss  # type: ignore[operator]
