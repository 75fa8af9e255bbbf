"""The worker's base model cache: jobs in a row on one cache train the same adapters as alone.

Real jobs (`run_job`) on the tiny Llama, LoRA and 4-bit QLoRA (bitsandbytes NF4 runs on the
CPU), with real training steps; the adapters are compared tensor by tensor, bit for bit.
"""

from __future__ import annotations

import gc
import os
import shutil
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.schema import FinetuneRequest, PretrainedModelConfig
from shared.settings import Settings
from tests.worker.test_preference import write_preference_dataset
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.base_cache import BaseModelCache, base_key, hub_revision
from worker.pipeline.base_state import restore_base, snapshot_base
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.model import (
    CpuBf16,
    attention_implementation,
    compute_dtype,
    load_base_model,
)
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

REUSED = "base model reused from this worker's cache"
LOADED = "base model loaded into this worker's cache"
Adapter = dict[str, torch.Tensor]


@dataclass
class Jobs:
    """Runs jobs on the tiny model, each in its own work dir, on a cache of the caller's."""

    tmp: Path
    settings: Settings
    make_request: Callable[..., FinetuneRequest]
    runs: int = 0

    def run(
        self, cache: BaseModelCache, request: FinetuneRequest,
        reporter: RecordingReporter | None = None,
    ) -> tuple[Adapter, RecordingReporter]:
        reporter = reporter or RecordingReporter()
        self.runs += 1
        result = run_job(request, self.tmp / f"job-{self.runs}", reporter, self.settings,
                         base_models=cache)
        return load_file(result.output_dir / "adapter_model.safetensors"), reporter


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, make_request: Any,
         tiny_model_dir: Path) -> Jobs:
    tmp = tmp_path_factory.mktemp("base-cache")
    settings = Settings(data_dir=tmp / "data",
                        allowed_local_dirs=[tmp, tiny_model_dir.parent, DATASET_PATH.parent])
    return Jobs(tmp, settings, make_request)


def job_b(jobs: Jobs, quantized: bool) -> FinetuneRequest:
    """The job whose adapter is compared: LoRA on two of the layers job A adapts, so that a
    LoRA layer job A left behind would train along (and be saved) here; no gradient
    checkpointing."""
    return jobs.make_request(
        model={"use_quantization": quantized, "lora_target_modules": ["q_proj", "v_proj"]}
    )


def job_a(jobs: Jobs, quantized: bool, **model: Any) -> FinetuneRequest:
    """Another job on the same base: LoRA on all linear layers with another rank, dropout,
    gradient checkpointing, another learning rate; it leaves as much behind in the base as a
    job can."""
    return jobs.make_request(
        model={"use_quantization": quantized, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
               "use_gradient_checkpointing": True, **model},
        training={"learning_rate": 0.02},
    )


@pytest.fixture(scope="module")
def alone(jobs: Jobs) -> Callable[[bool], Adapter]:
    """Job B's adapter run alone, on a fresh cache: once per quantization, for every test."""
    adapters: dict[bool, Adapter] = {}

    def adapter(quantized: bool) -> Adapter:
        if quantized not in adapters:
            adapters[quantized], reporter = jobs.run(BaseModelCache(), job_b(jobs, quantized))
            assert any(LOADED in line for line in reporter.lines)
        return adapters[quantized]

    return adapter


def assert_same_adapter(got: Adapter, expected: Adapter) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_a_job_after_another_on_the_cached_base_trains_the_same_adapter_as_alone(
    jobs: Jobs, alone: Callable[[bool], Adapter], quantized: bool
) -> None:
    cache = BaseModelCache()
    _, first = jobs.run(cache, job_a(jobs, quantized))
    assert any(LOADED in line for line in first.lines)
    adapter, second = jobs.run(cache, job_b(jobs, quantized))
    assert any(REUSED in line for line in second.lines)
    assert not any(line.startswith("base model loaded in") for line in second.lines)
    # Bit for bit: the same base weights, the same fresh LoRA (seeded), the same steps on
    # the same CPU kernels. Any leftover of job A (a LoRA layer, a hook, a flag, a changed
    # weight) would change the numbers or the adapter's keys.
    assert_same_adapter(adapter, alone(quantized))


def test_a_job_that_turned_checkpointing_on_for_lack_of_memory_leaves_the_base_clean(
    jobs: Jobs, alone: Callable[[bool], Adapter]
) -> None:
    cache = BaseModelCache()
    short = Jobs(jobs.tmp / "short", jobs.settings.model_copy(
        update={
            "training": jobs.settings.training.model_copy(update={
                "training_memory_gb": 2**-10,
            }),
        }), jobs.make_request)
    _, first = short.run(cache, jobs.make_request())
    assert any(line.startswith("gradient checkpointing on: ") for line in first.lines)

    adapter, second = jobs.run(cache, job_b(jobs, False))

    assert any(REUSED in line for line in second.lines)
    assert_same_adapter(adapter, alone(False))


class CrashAtStep(RecordingReporter):
    """A reporter whose metrics write fails at step 2: an unexpected error mid-training."""

    def metric(self, step: int, values: dict[str, float]) -> None:
        super().metric(step, values)
        if step >= 2:
            raise RuntimeError("simulated crash in the middle of training")


def cancelled(jobs: Jobs, cache: BaseModelCache) -> None:
    with pytest.raises(TrainingStopped):
        jobs.run(cache, job_a(jobs, False), RecordingReporter(stop_after_step=2))


def crashed(jobs: Jobs, cache: BaseModelCache) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        jobs.run(cache, job_a(jobs, False), CrashAtStep())


def failed_while_wrapping(jobs: Jobs, cache: BaseModelCache) -> None:
    # Gradient checkpointing is on (and its input hook registered) before the target check
    # fails: the job ends with the base half prepared.
    with pytest.raises(PipelineError, match="no_such_layer"):
        jobs.run(cache, job_a(jobs, False, lora_target_modules=["no_such_layer"]))


def orpo(jobs: Jobs, cache: BaseModelCache) -> None:
    data = write_preference_dataset(jobs.tmp / "preferences.jsonl")
    request = jobs.make_request(
        data, model={"use_gradient_checkpointing": True},
        data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"preference_optimization": "ORPO"},
    )
    jobs.run(cache, request)


def dpo(jobs: Jobs, cache: BaseModelCache) -> None:
    """DPO patches the base's forward with TRL's fused LM head and writes the pad id into its
    configs; a DPO job cancelled mid-run must undo both."""
    data = write_preference_dataset(jobs.tmp / "preferences.jsonl")
    request = jobs.make_request(
        data, data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"preference_optimization": "DPO"},
    )
    with pytest.raises(TrainingStopped):
        jobs.run(cache, request, RecordingReporter(stop_after_step=2))


@pytest.mark.parametrize("first_job", [cancelled, crashed, failed_while_wrapping, orpo, dpo])
def test_a_job_that_ends_any_way_leaves_the_base_as_loaded_for_the_next(
    jobs: Jobs, alone: Callable[[bool], Adapter], first_job: Callable[[Jobs, BaseModelCache], None]
) -> None:
    cache = BaseModelCache()
    first_job(jobs, cache)
    assert cache.key is not None, "the base was dropped instead of reset"
    adapter, reporter = jobs.run(cache, job_b(jobs, False))
    assert any(REUSED in line for line in reporter.lines)
    assert_same_adapter(adapter, alone(False))


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_after_a_job_with_gradient_checkpointing_the_kept_base_equals_a_fresh_load(
    jobs: Jobs, tiny_model_dir: Path, quantized: bool
) -> None:
    cache = BaseModelCache()
    jobs.run(cache, job_a(jobs, quantized))
    config = PretrainedModelConfig(model_path=str(tiny_model_dir), use_quantization=quantized)
    fresh = load_base_model(str(tiny_model_dir), config, allowed_local_dirs=[tiny_model_dir])
    with cache.checkout(cache.key, load=lambda: pytest.fail("loaded instead of reused")) as kept:
        assert not hasattr(kept, "peft_config")
        assert not kept.is_activation_checkpointing
        assert not any(getattr(m, "gradient_checkpointing", False) for m in kept.modules())
        assert kept.config.use_cache is True
        assert kept.config.to_dict() == fresh.config.to_dict()
        assert [type(m) for m in kept.modules()] == [type(m) for m in fresh.modules()]
        assert [m.training for m in kept.modules()] == [m.training for m in fresh.modules()]
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in kept.modules())
        assert not getattr(kept, "_require_grads_hooks", None)
        assert [(n, p.requires_grad) for n, p in kept.named_parameters()] == [
            (n, p.requires_grad) for n, p in fresh.named_parameters()
        ]
        assert all(p.grad is None for p in kept.parameters())
        kept_weights, fresh_weights = kept.state_dict(), fresh.state_dict()
        assert kept_weights.keys() == fresh_weights.keys()
        for name, tensor in fresh_weights.items():
            assert torch.equal(kept_weights[name], tensor), name
        if quantized:
            import bitsandbytes as bnb

            layers = [m for m in kept.modules() if isinstance(m, bnb.nn.Linear4bit)]
            assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
            assert not any(
                getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers
            )


def load_tiny(model_dir: Path, **config: Any) -> Callable[[], Any]:
    settings = PretrainedModelConfig(model_path=str(model_dir), **config)
    return lambda: load_base_model(str(model_dir), settings, allowed_local_dirs=[model_dir])


def key_of(model_dir: Path, token: str | None = None, cpu_bf16: CpuBf16 = "auto",
           **config: Any) -> Any:
    settings = PretrainedModelConfig(model_path=str(model_dir), **config)
    return base_key(str(model_dir), settings, allowed_local_dirs=[model_dir.parent], token=token,
                    cpu_bf16=cpu_bf16)


def test_a_base_the_job_changed_beyond_its_adapter_is_dropped(tiny_model_dir: Path) -> None:
    cache = BaseModelCache()
    key = key_of(tiny_model_dir)
    with cache.checkout(key, load_tiny(tiny_model_dir)) as base, torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert cache.key is None
    loads = []
    with cache.checkout(key, lambda: loads.append(1) or load_tiny(tiny_model_dir)()):
        pass
    assert loads == [1]


def test_hooks_a_job_registered_are_removed_and_unknown_attributes_drop_the_base(
    tiny_model_dir: Path,
) -> None:
    cache = BaseModelCache()
    key = key_of(tiny_model_dir)
    with cache.checkout(key, load_tiny(tiny_model_dir)) as base:
        base.model.norm.register_forward_hook(lambda *args: None)
        base.model.layers[1].register_forward_pre_hook(lambda *args: None)
    assert cache.key == key
    with cache.checkout(key, load_tiny(tiny_model_dir)) as base:
        assert not base.model.norm._forward_hooks
        assert not base.model.layers[1]._forward_pre_hooks
        base.model.layers[1].mlp.something_new = "left by a job"
    assert cache.key is None


def test_a_neftune_hook_left_by_a_training_cut_short_is_removed_and_the_base_kept(
    tiny_model_dir: Path,
) -> None:
    from transformers.integrations.neftune import activate_neftune

    cache = BaseModelCache()
    key = key_of(tiny_model_dir)
    with cache.checkout(key, load_tiny(tiny_model_dir)) as base:
        activate_neftune(base, 5.0)  # as Trainer.train() does; only its end removes it
    assert cache.key == key
    with cache.checkout(key, load_tiny(tiny_model_dir)) as base:
        embeddings = base.get_input_embeddings()
        assert not embeddings._forward_hooks
        assert not hasattr(embeddings, "neftune_noise_alpha")


def test_restore_names_what_it_could_not_undo(tiny_model_dir: Path) -> None:
    base = load_tiny(tiny_model_dir)()
    snapshot = snapshot_base(base)
    base.config.rope_theta = 1.0
    base.model.layers[0].self_attn.scaling = 0.5
    differences = restore_base(base, snapshot)
    assert any("config" in d and "rope_theta" in d for d in differences), differences
    assert any("model.layers.0.self_attn: scaling: " in d for d in differences), differences


def test_another_base_is_dropped_and_freed_before_the_next_one_loads(
    tiny_model_dir: Path,
) -> None:
    cache = BaseModelCache()
    with cache.checkout(key_of(tiny_model_dir), load_tiny(tiny_model_dir)) as first:
        first_ref = weakref.ref(first)
    del first

    def load_quantized() -> Any:
        assert first_ref() is None, "the cached base is still in memory while loading another"
        return load_tiny(tiny_model_dir, use_quantization=True)()

    quantized_key = key_of(tiny_model_dir, use_quantization=True)
    with cache.checkout(quantized_key, load_quantized) as second:
        assert second.is_loaded_in_4bit
    assert cache.key == quantized_key


def test_a_disabled_cache_loads_every_time_and_keeps_nothing(tiny_model_dir: Path) -> None:
    cache = BaseModelCache(enabled=False)
    refs = []
    for _ in range(2):
        with cache.use(str(tiny_model_dir), PretrainedModelConfig(model_path=str(tiny_model_dir)),
                       allowed_local_dirs=[tiny_model_dir.parent]) as base:
            refs.append(weakref.ref(base))
        del base
        assert cache.key is None
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_only_what_changes_the_loaded_base_is_in_the_key(tiny_model_dir: Path) -> None:
    plain = key_of(tiny_model_dir)
    # LoRA settings and gradient checkpointing are the job's, not the base's.
    assert key_of(tiny_model_dir, lora_r=64, lora_alpha=8, lora_dropout=0.3,
                  use_gradient_checkpointing=True, lora_target_modules=["q_proj"]) == plain
    quantized = key_of(tiny_model_dir, use_quantization=True)
    assert quantized != plain and quantized.source == plain.source
    assert '"load_in_4bit": true' in quantized.options
    # The precision and attention the machine trains in (and TUNERY_CPU_BF16) are the base's.
    dtype = compute_dtype()
    assert f'"dtype": "{dtype}"' in plain.options
    assert f'"{attention_implementation(dtype)}"' in plain.options
    assert key_of(tiny_model_dir, cpu_bf16="off") != key_of(tiny_model_dir, cpu_bf16="on")


def test_a_token_is_part_of_the_key_as_a_digest(tiny_model_dir: Path) -> None:
    none, a, b = (key_of(tiny_model_dir, token) for token in (None, "hf_tenant_a", "hf_tenant_b"))
    assert len({none, a, b}) == 3
    assert key_of(tiny_model_dir, "hf_tenant_a") == a
    assert "hf_tenant_a" not in repr(a)


def test_a_rewritten_weight_file_is_loaded_again(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before = key_of(model_dir)
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = key_of(model_dir)
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + " ")
    edited = key_of(model_dir)
    assert len({before, touched, edited}) == 3


def fake_hub_cache(cache_dir: Path, model_dir: Path, repo_id: str, commit: str) -> None:
    """Put `model_dir` in a hub cache laid out as huggingface_hub writes it, as `commit` of
    `repo_id`'s main branch."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_model_is_reused_only_with_the_same_token_and_commit(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # Offline, the hub cache answers for the hub (the same files from_pretrained reads).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo_id, first_commit, new_commit = "tunery/private-tiny", "a" * 40, "b" * 40
    fake_hub_cache(tmp_path / "hub", tiny_model_dir, repo_id, first_commit)
    assert hub_revision(repo_id, None) == first_commit
    assert hub_revision("tunery/not-there", None) is None

    cache = BaseModelCache()
    config = PretrainedModelConfig(model_path=repo_id)
    reused: list[bool] = []

    def job(token: str | None) -> None:
        reporter = RecordingReporter()
        with cache.use(repo_id, config, allowed_local_dirs=[], token=token, log=reporter.log):
            pass
        reused.append(any(REUSED in line for line in reporter.lines))

    job("hf_tenant_a")
    job(None)  # another tenant, no token: never gets tenant A's base
    job("hf_tenant_a")
    job("hf_tenant_a")
    fake_hub_cache(tmp_path / "hub", tiny_model_dir, repo_id, new_commit)
    job("hf_tenant_a")  # main moved on: the new commit is loaded
    assert reused == [False, False, False, True, False]
    assert cache.key is not None and cache.key.revision == new_commit


def test_the_worker_setting_turns_the_cache_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.tasks
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_BASE_MODEL_CACHE", "false")
    monkeypatch.setattr(worker.tasks, "_base_models", None)
    get_settings.cache_clear()
    try:
        assert worker.tasks.base_model_cache().enabled is False
    finally:
        get_settings.cache_clear()
    monkeypatch.delenv("TUNERY_BASE_MODEL_CACHE")
    assert Settings().training.base_model_cache is True  # the default
