"""Loading the base model with LoRA, gradient checkpointing, and 4-bit QLoRA on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.schema import PretrainedModelConfig
from worker.pipeline import model as model_module
from worker.pipeline.errors import PipelineError
from worker.pipeline.model import (
    CpuBf16,
    compute_dtype,
    cpu_multiplies_bf16,
    load_model,
    load_tokenizer,
    loaded_dtype,
)

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _load(model_dir: Path, cpu_bf16: CpuBf16 = "off", **config: Any) -> Any:
    # fp32 unless asked: these tests call the model outside the Trainer's autocast, which a
    # bf16 model's LoRA layers need (see `train_lora_inputs_in_half_precision`).
    return load_model(
        str(model_dir),
        PretrainedModelConfig(model_path=str(model_dir), **config),
        allowed_local_dirs=[model_dir.parent],
        cpu_bf16=cpu_bf16,
    )


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 900, (2, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def _randomize_lora_b(model: Any) -> None:
    # lora_B starts at zero, which makes every lora_A gradient zero; give it a value so
    # lora_A gradients measure what flows back through the base weights.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _lora_a_grads(model: Any) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**_batch()).loss.backward()
    return {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if "lora_A" in name and "layers.0." in name
    }


def test_lora_wraps_every_linear_layer_and_trains_only_the_adapter(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir, lora_r=4, lora_alpha=8)

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    wrapped = {name.split(".")[-4] for name in trainable}  # ...q_proj.lora_A.default.weight
    assert wrapped == LINEAR_NAMES
    assert model.peft_config["default"].r == 4


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir: Path) -> None:
    plain = _load(tiny_model_dir)
    checkpointed = _load(tiny_model_dir, use_gradient_checkpointing=True)
    _randomize_lora_b(plain)
    _randomize_lora_b(checkpointed)

    assert checkpointed.base_model.model.is_activation_checkpointing
    assert not plain.base_model.model.is_activation_checkpointing
    expected, got = _lora_a_grads(plain), _lora_a_grads(checkpointed)
    assert expected.keys() == got.keys() and len(got) == 7
    for name in expected:
        assert got[name].norm() > 0
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_qlora_with_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir: Path) -> None:
    # Quantization is deterministic: both models hold the same 4-bit weights.
    plain = _load(tiny_model_dir, use_quantization=True)
    checkpointed = _load(tiny_model_dir, use_quantization=True, use_gradient_checkpointing=True)
    _randomize_lora_b(plain)
    _randomize_lora_b(checkpointed)

    assert checkpointed.is_loaded_in_4bit
    assert checkpointed.base_model.model.is_activation_checkpointing
    assert not plain.base_model.model.is_activation_checkpointing
    expected, got = _lora_a_grads(plain), _lora_a_grads(checkpointed)
    assert expected.keys() == got.keys() and len(got) == 7
    for name in expected:
        # Gradients must still flow back through the frozen 4-bit layers of later blocks.
        assert got[name].norm() > 1e-5
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def _bf16_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model saved in bf16, as most hub checkpoints are."""
    from safetensors.torch import load_file, save_file

    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, bf16_dir)
    weights = load_file(bf16_dir / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()},
              bf16_dir / "model.safetensors", metadata={"format": "pt"})
    _add_to_json(bf16_dir / "config.json", dtype="bfloat16")
    return bf16_dir


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU worker computes in bf16 or fp16")
@pytest.mark.parametrize(
    ("setting", "cpu_has_bf16", "expected"),
    [
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float32),
        ("on", False, torch.bfloat16),
        ("off", True, torch.float32),
    ],
)
def test_cpu_precision_follows_the_cpus_bf16_instructions_unless_the_setting_says(
    monkeypatch: pytest.MonkeyPatch, setting: CpuBf16, cpu_has_bf16: bool,
    expected: torch.dtype,
) -> None:
    # The CPU's instruction set is the edge a test cannot change: its probe answers as told.
    monkeypatch.setattr(model_module, "cpu_multiplies_bf16", lambda: cpu_has_bf16)
    assert compute_dtype(setting) == expected


def test_the_cpu_probe_reads_the_cpus_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_multiplies_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU worker computes in bf16 or fp16")
def test_bf16_checkpoint_is_trained_in_float32_where_the_cpu_lacks_bf16(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # from_pretrained keeps a checkpoint's dtype unless told otherwise; emulated bf16 is slow.
    bf16_dir = _bf16_copy(tiny_model_dir, tmp_path)
    lines: list[str] = []

    model = load_model(
        str(bf16_dir),
        PretrainedModelConfig(model_path=str(bf16_dir)),
        allowed_local_dirs=[tmp_path],
        cpu_bf16="off",
        log=lines.append,
    )

    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert loaded_dtype(model) == torch.float32
    assert "base model loaded in torch.float32" in lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU worker computes in bf16 or fp16")
def test_bf16_training_on_cpu_keeps_the_adapter_and_its_optimizer_in_fp32(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    lines: list[str] = []

    model = load_model(
        str(tiny_model_dir),
        PretrainedModelConfig(model_path=str(tiny_model_dir)),
        allowed_local_dirs=[tiny_model_dir.parent],
        cpu_bf16="on",
        log=lines.append,
    )

    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert (trainable, frozen) == ({torch.float32}, {torch.bfloat16})
    assert loaded_dtype(model) == torch.bfloat16
    assert any(line.startswith("base model loaded in torch.bfloat16, mixed precision")
               for line in lines)
    # The Trainer computes under bf16 autocast; AdamW keeps its moments like its weights.
    from shared.schema import TrainingConfig
    from worker.pipeline.training_args import training_arguments

    args = training_arguments(
        TrainingConfig(), output_dir=tmp_path, has_validation=True, quantized=False,
        dtype=loaded_dtype(model),
    )
    assert (args.bf16, args.fp16, args.optim) == (True, False, "adamw_torch_fused")
    # Under autocast peft's cast of each LoRA input to fp32 would only be undone again.
    lora_layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)


def test_pickled_checkpoint_is_refused_with_a_pipeline_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Unpickling a .bin checkpoint can run arbitrary code; only safetensors are loaded.
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")

    with pytest.raises(PipelineError, match=r"only safetensors checkpoints are accepted"):
        load_model(
            str(pickled),
            PretrainedModelConfig(model_path=str(pickled)),
            allowed_local_dirs=[tmp_path],
        )


def test_custom_code_named_by_auto_map_is_never_imported(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A model repo can name its own Python classes in auto_map; transformers imports them only
    # with trust_remote_code. Each module here leaves a marker file when imported.
    model_dir = tmp_path / "custom-code"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "custom-code-was-imported"
    for module in ("configuration_custom", "modeling_custom", "tokenization_custom"):
        (model_dir / f"{module}.py").write_text(
            "from pathlib import Path\n"
            f"Path({str(marker)!r}).write_text(__name__)\n"
            "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
            "class CustomConfig(LlamaConfig): pass\n"
            "class CustomModel(LlamaForCausalLM): config_class = CustomConfig\n"
            "class CustomTokenizer(PreTrainedTokenizerFast): pass\n"
        )
    _add_to_json(model_dir / "config.json", auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    })
    _add_to_json(model_dir / "tokenizer_config.json",
                 auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})

    tokenizer = load_tokenizer(str(model_dir), allowed_local_dirs=[tmp_path])
    model = _load(model_dir)

    assert not marker.exists()
    assert type(model.base_model.model).__name__ == "LlamaForCausalLM"
    assert "Custom" not in type(tokenizer).__name__


def _add_to_json(path: Path, **values: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_qlora_loads_the_base_in_4bit_nf4_with_double_quantization(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    model = _load(tiny_model_dir, use_quantization=True)

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(LINEAR_NAMES)
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested
    assert model.is_loaded_in_4bit


def test_qlora_gradients_survive_an_eval_forward(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On avx512_bf16 CPUs an eval forward repacks 4-bit weights for good, cutting gradients.

    The Linear4bit layers are built as on such a CPU (bitsandbytes asks the native library
    at construction), so this test fails without the pipeline's fix on any CPU.
    """
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = _load(tiny_model_dir, use_quantization=True)
    _randomize_lora_b(model)
    before = _lora_a_grads(model)

    model.eval()
    with torch.no_grad():
        model(**_batch(seed=1))
    after = _lora_a_grads(model)

    for name in before:
        assert before[name].norm() > 1e-5
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-7)


def test_missing_4bit_support_fails_at_once_without_fallback(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes.functional

    def no_backend(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_backend)

    with pytest.raises(PipelineError, match="use_quantization .* not available"):
        _load(tiny_model_dir, use_quantization=True)


def test_directory_without_a_model_is_a_pipeline_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(PipelineError, match="could not load model"):
        load_model(
            str(tmp_path / "empty"),
            PretrainedModelConfig(model_path=str(tmp_path / "empty")),
            allowed_local_dirs=[tmp_path],
        )


def test_model_outside_allowed_dirs_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="model_path: .*outside"):
        load_tokenizer(str(tiny_model_dir), allowed_local_dirs=[tmp_path])


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "tok")
    lines: list[str] = []

    loaded = load_tokenizer(str(tmp_path / "tok"), allowed_local_dirs=[tmp_path], log=lines.append)

    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert "no pad token" in lines[0]


def test_hub_id_that_names_a_local_directory_is_refused(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # from_pretrained("tiny-llama") would load ./tiny-llama: a way around allowed_local_dirs.
    monkeypatch.chdir(tiny_model_dir.parent)

    with pytest.raises(PipelineError, match="also a path on the worker"):
        load_tokenizer("tiny-llama", allowed_local_dirs=[])


def test_lora_initialisation_is_seeded(tiny_model_dir: Path) -> None:
    torch.manual_seed(1)
    first = _load(tiny_model_dir).state_dict()
    torch.manual_seed(2)
    second = _load(tiny_model_dir).state_dict()

    lora_keys = [key for key in first if "lora_A" in key]
    assert lora_keys
    for key in lora_keys:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_lora_target_modules_adapt_only_the_named_layers(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir, lora_target_modules=["q_proj", "mlp.down_proj"])

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "down_proj"}
    assert len(trainable) == 2 * 2 * 2  # 2 layers x 2 targets x (lora_A, lora_B)


def test_lora_target_module_matching_no_linear_layer_fails_with_the_available_names(
    tiny_model_dir: Path,
) -> None:
    # peft itself would silently skip "qproj" here, because "v_proj" matches.
    with pytest.raises(PipelineError) as info:
        _load(tiny_model_dir, lora_target_modules=["v_proj", "qproj"])

    message = str(info.value)
    assert "['qproj'] match no linear layer" in message
    assert str(sorted(LINEAR_NAMES | {"lm_head"})) in message
