"""LoRA variants (use_dora, use_rslora, lora_init) on the tiny Llama: each reaches peft, trains
another adapter than plain LoRA, resumes as the same variant, leaves no rewritten base in the
cache, and exports an adapter the original base can use.

Real jobs (`run_job`) and real training steps; the in-job models for the logits comparisons
are built and trained here with the pipeline's own stages, in fp32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.schema import FinetuneRequest, PretrainedModelConfig
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.storage_keys import INITIAL_ADAPTER_FILE
from tests.worker.test_pause import PausesAt
from tests.worker.test_preference import write_preference_dataset
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.base_cache import BaseModelCache
from worker.pipeline.base_state import restore_base, snapshot_base
from worker.pipeline.checkpoints import (
    CheckpointStore,
    download_starting_point,
    restore_starting_point,
)
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.export import export_adapter
from worker.pipeline.merge import merge_adapter
from worker.pipeline.model import add_lora, load_base_model
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

# The exported adapter on a fresh base against the model the job trained: both fp32.
LOGITS_ATOL = 1e-4
# No validation split: the final adapter is the last step's, as in the last checkpoint.
NO_EVAL = {"data_split_config": {"train": 0.08, "validation": 0.0}}
Adapter = dict[str, torch.Tensor]


@dataclass
class Job:
    adapter: Adapter
    config: dict[str, Any]
    reporter: RecordingReporter
    output_dir: Path


@dataclass
class Jobs:
    tmp: Path
    settings: Settings
    make_request: Callable[..., FinetuneRequest]
    runs: int = 0

    def request(self, **model: Any) -> FinetuneRequest:
        return self.make_request(model=model, data=NO_EVAL)

    def run(self, request: FinetuneRequest, *, reporter: RecordingReporter | None = None,
            checkpoints: CheckpointStore | None = None,
            cache: BaseModelCache | None = None) -> Job:
        reporter = reporter or RecordingReporter()
        self.runs += 1
        result = run_job(request, self.tmp / f"job-{self.runs}", reporter, self.settings,
                         checkpoints=checkpoints, base_models=cache)
        out = result.output_dir
        return Job(load_file(out / "adapter_model.safetensors"),
                   json.loads((out / "adapter_config.json").read_text()), reporter, out)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, make_request: Any,
         tiny_model_dir: Path) -> Jobs:
    tmp = tmp_path_factory.mktemp("lora-variants")
    settings = Settings(data_dir=tmp / "data",
                        allowed_local_dirs=[tmp, tiny_model_dir.parent, DATASET_PATH.parent])
    return Jobs(tmp, settings, make_request)


@pytest.fixture(scope="module")
def plain(jobs: Jobs) -> Job:
    return jobs.run(jobs.request())


@pytest.fixture(scope="module")
def pissa(jobs: Jobs) -> Job:
    return jobs.run(jobs.request(lora_init="pissa"))


def tiny_config(tiny_model_dir: Path, **model: Any) -> PretrainedModelConfig:
    return PretrainedModelConfig(model_path=str(tiny_model_dir), **model)


def fp32_base(tiny_model_dir: Path, config: PretrainedModelConfig | None = None) -> Any:
    return load_base_model(str(tiny_model_dir), config or tiny_config(tiny_model_dir),
                           allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")


def q_proj(model: Any) -> Any:
    return model.get_base_model().model.layers[0].self_attn.q_proj


def sample_ids() -> torch.Tensor:
    return torch.arange(3, 35).reshape(2, 16) % 100


@torch.no_grad()
def logits_of(model: Any) -> torch.Tensor:
    model.eval()
    return model(input_ids=sample_ids()).logits.float()


def train_steps(model: Any, steps: int = 3) -> None:
    """A few real optimizer steps on fixed tokens."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_each_option_reaches_peft(tiny_model_dir: Path) -> None:
    dora = add_lora(fp32_base(tiny_model_dir), tiny_config(tiny_model_dir, use_dora=True))
    assert dora.peft_config["default"].use_dora
    assert "default" in q_proj(dora).lora_magnitude_vector

    rslora = add_lora(fp32_base(tiny_model_dir), tiny_config(tiny_model_dir, use_rslora=True))
    assert rslora.peft_config["default"].use_rslora
    assert q_proj(rslora).scaling["default"] == pytest.approx(16 / math.sqrt(8))

    gaussian = add_lora(fp32_base(tiny_model_dir),
                        tiny_config(tiny_model_dir, lora_init="gaussian"))
    assert gaussian.peft_config["default"].init_lora_weights == "gaussian"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_decomposing_init_moves_part_of_the_base_into_the_adapter(
    tiny_model_dir: Path, init: str
) -> None:
    original = logits_of(fp32_base(tiny_model_dir))
    model = add_lora(fp32_base(tiny_model_dir), tiny_config(tiny_model_dir, lora_init=init))
    assert model.peft_config["default"].init_lora_weights == init
    assert q_proj(model).lora_B["default"].weight.abs().sum() > 0
    # Residual base plus adapter: the function the model started from.
    torch.testing.assert_close(logits_of(model), original, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("model", [
    {"use_dora": True}, {"use_rslora": True}, {"lora_init": "gaussian"},
    {"lora_init": "pissa"}, {"lora_init": "olora"},
], ids=["dora", "rslora", "gaussian", "pissa", "olora"])
def test_each_variant_trains_another_adapter_than_plain_lora(
    jobs: Jobs, plain: Job, model: dict[str, Any]
) -> None:
    variant = jobs.run(jobs.request(**model))
    assert len(variant.reporter.values("loss")) == len(plain.reporter.values("loss")) == 6
    assert variant.reporter.values("loss") != plain.reporter.values("loss")
    shared = variant.adapter.keys() & plain.adapter.keys()
    assert any(variant.adapter[k].shape != plain.adapter[k].shape
               or not torch.equal(variant.adapter[k], plain.adapter[k]) for k in shared)
    if model.get("use_dora"):
        assert any("lora_magnitude_vector" in k for k in variant.adapter)
        assert variant.config["use_dora"] is True
    if model.get("use_rslora"):
        assert variant.config["use_rslora"] is True
    if model.get("lora_init") in ("pissa", "olora"):
        # Converted for the original base: [A | A0], [B | -B0].
        assert variant.config["r"] == 16
        assert variant.config["init_lora_weights"] is True


@pytest.fixture(scope="module")
def qlora(jobs: Jobs) -> Job:
    return jobs.run(jobs.request(use_quantization=True))


def test_dora_trains_on_a_4bit_base(jobs: Jobs, qlora: Job) -> None:
    dora = jobs.run(jobs.request(use_quantization=True, use_dora=True))
    assert any("lora_magnitude_vector" in k for k in dora.adapter)
    losses = dora.reporter.values("loss")
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses != qlora.reporter.values("loss")


def test_loftq_starts_from_the_quantization_error_and_trains_another_adapter(
    jobs: Jobs, qlora: Job
) -> None:
    loftq = jobs.run(jobs.request(use_quantization=True, lora_init="loftq"))
    assert any("lora_init 'loftq'" in line for line in loftq.reporter.lines)
    assert loftq.reporter.values("loss") != qlora.reporter.values("loss")
    assert loftq.adapter.keys() == qlora.adapter.keys()
    assert any(not torch.equal(loftq.adapter[k], qlora.adapter[k]) for k in qlora.adapter)


@pytest.mark.parametrize("model", [
    {"lora_init": "pissa"}, {"lora_init": "olora"}, {"use_dora": True},
    {"use_rslora": True, "lora_init": "pissa"},
], ids=["pissa", "olora", "dora", "rslora-pissa"])
def test_the_exported_adapter_and_its_merge_give_the_trained_models_logits_on_the_original_base(
    tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path, model: dict[str, Any]
) -> None:
    from peft import PeftModel

    trained = add_lora(fp32_base(tiny_model_dir), tiny_config(tiny_model_dir, **model))
    train_steps(trained)
    expected = logits_of(trained)
    out = export_adapter(trained, tiny_tokenizer, tmp_path / "output",
                         base_model=str(tiny_model_dir), work_dir=tmp_path)

    on_original = PeftModel.from_pretrained(fp32_base(tiny_model_dir), str(out))
    torch.testing.assert_close(logits_of(on_original), expected, atol=LOGITS_ATOL, rtol=0)

    merged_dir = merge_adapter(str(tiny_model_dir), out, tmp_path / "merged",
                               allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    torch.testing.assert_close(logits_of(merged), expected, atol=LOGITS_ATOL, rtol=0)


def test_an_orpo_job_with_olora_exports_an_adapter_for_the_original_base(
    jobs: Jobs, tiny_model_dir: Path
) -> None:
    from peft import PeftModel

    data = write_preference_dataset(jobs.tmp / "preferences.jsonl")
    request = jobs.make_request(
        data, model={"lora_init": "olora"},
        data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"preference_optimization": "ORPO"},
    )
    job = jobs.run(request)
    assert job.config["r"] == 16 and job.config["init_lora_weights"] is True
    # Loads on the original base, and trained: not the base's logits.
    on_original = PeftModel.from_pretrained(fp32_base(tiny_model_dir), str(job.output_dir))
    assert not torch.allclose(logits_of(on_original), logits_of(fp32_base(tiny_model_dir)),
                              atol=LOGITS_ATOL)


def test_a_paused_pissa_job_resumes_on_the_same_residual_to_the_uninterrupted_adapter(
    jobs: Jobs, pissa: Job, tmp_path: Path
) -> None:
    request = jobs.request(lora_init="pissa")
    checkpoints = CheckpointStore(LocalStorage(tmp_path / "storage"), "job", every_steps=0)
    with pytest.raises(TrainingStopped):
        jobs.run(request, reporter=PausesAt(2), checkpoints=checkpoints)
    stored = checkpoints.latest()
    assert stored is not None and INITIAL_ADAPTER_FILE in stored.files

    resumed = jobs.run(request, checkpoints=checkpoints)
    assert any("base residual rebuilt from the checkpoint" in line
               for line in resumed.reporter.lines)
    assert not any("initialized from the base weights" in line
                   for line in resumed.reporter.lines)
    assert resumed.adapter.keys() == pissa.adapter.keys()
    for name, tensor in resumed.adapter.items():
        torch.testing.assert_close(tensor, pissa.adapter[name], atol=1e-6, rtol=0)


def test_resume_checkpoint_path_from_a_pissa_checkpoint_starts_from_that_jobs_model(
    jobs: Jobs, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    storage = LocalStorage(tmp_path / "storage")
    earlier = jobs.run(jobs.request(lora_init="pissa"),
                       checkpoints=CheckpointStore(storage, "earlier", every_steps=6))
    config = tiny_config(tiny_model_dir, resume_checkpoint_path="jobs/earlier/checkpoints/step-6")
    start = download_starting_point(config, CheckpointStore(storage, "later"), tmp_path / "w")
    assert start.initial_adapter is not None

    base = fp32_base(tiny_model_dir)
    snapshot = snapshot_base(base)
    model = add_lora(base, config, initial_adapter=start.initial_adapter)
    assert restore_starting_point(model, config, start) is None
    # The earlier job's final adapter, converted for the original base, is the same model.
    on_original = PeftModel.from_pretrained(fp32_base(tiny_model_dir), str(earlier.output_dir))
    torch.testing.assert_close(logits_of(model), logits_of(on_original),
                               atol=LOGITS_ATOL, rtol=0)
    assert any("rewritten" in d for d in restore_base(base, snapshot))


def test_a_resumed_adapter_of_another_variant_is_refused(
    jobs: Jobs, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from worker.pipeline.checkpoints import load_initial_adapter
    from worker.pipeline.errors import PipelineError

    dora = add_lora(fp32_base(tiny_model_dir), tiny_config(tiny_model_dir, use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    plain = add_lora(fp32_base(tiny_model_dir), tiny_config(tiny_model_dir))
    with pytest.raises(PipelineError, match="use_dora=True, this job use_dora=False"):
        load_initial_adapter(plain, tmp_path / "dora", tiny_config(tiny_model_dir))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_after_a_base_decomposing_job_the_next_job_gets_a_base_equal_to_a_fresh_load(
    jobs: Jobs, tiny_model_dir: Path, init: str
) -> None:
    cache = BaseModelCache()
    request = jobs.request(lora_init=init)
    rewriting = jobs.run(request, cache=cache)
    assert any("base model not kept" in line for line in rewriting.reporter.lines)
    assert cache.key is None

    config = jobs.request().pretrainedmodel_config
    fresh = load_base_model(str(tiny_model_dir), config,
                            allowed_local_dirs=jobs.settings.sources.allowed_local_dirs)
    with cache.use(str(tiny_model_dir), config,
                   allowed_local_dirs=jobs.settings.sources.allowed_local_dirs) as base:
        expected = fresh.state_dict()
        got = base.state_dict()
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name


def test_olora_rewrites_weights_unseen_by_version_counters_and_the_cache_still_drops_them(
    tiny_model_dir: Path,
) -> None:
    base = fp32_base(tiny_model_dir)
    snapshot = snapshot_base(base)
    weight = base.model.layers[0].self_attn.q_proj.weight
    before = (weight.data_ptr(), weight._version, weight.detach().clone())
    add_lora(base, tiny_config(tiny_model_dir, lora_init="olora"))
    # OLoRA subtracts through `.data` in place on an fp32 base: same storage, same version.
    assert (weight.data_ptr(), weight._version) == before[:2]
    assert not torch.equal(weight, before[2])
    assert any("rewritten by the LoRA initialization" in d for d in restore_base(base, snapshot))
