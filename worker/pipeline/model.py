"""Model stages: load the tokenizer, load the base model (full precision or 4-bit), add LoRA."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from shared import local_files
from shared.schema import PretrainedModelConfig
from shared.sources import SourceError, classify_source
from shared.training_plan import DEFAULT_SEED
from worker.pipeline import lora_init
from worker.pipeline.errors import PipelineError
from worker.pipeline.ranks import in_process_group, local_rank
from worker.pipeline.report import LogFn, no_log

LORA_INIT_SEED = DEFAULT_SEED


def resolve_model_path(model_path: str, allowed_local_dirs: Iterable[Path]) -> str:
    """The resolved local directory or the hub id `model_path` names; `PipelineError` if it
    is refused. Loading goes through `opened_model_source`, which also checks every file."""
    try:
        source = classify_source(model_path, allowed_local_dirs, allow_urls=False,
                                 bare_hub_names=True)
    except SourceError as exc:
        raise PipelineError(f"model_path: {exc}") from None
    if source.kind == "local":
        assert source.path is not None
        if not source.path.is_dir():
            raise PipelineError(f"model_path {model_path!r} is not a directory on the worker")
        return str(source.path)
    # from_pretrained tries a local directory of that name first: a hub id must never become
    # a way around allowed_local_dirs.
    if Path(model_path).exists():
        raise PipelineError(
            f"model id {model_path!r} is also a path on the worker; refusing the ambiguity"
        )
    return model_path


@dataclass(frozen=True)
class ModelSource:
    """A base model's source, ready to load: what `from_pretrained` gets (`load_from`), what
    identifies it (`source`, the resolved directory or the hub id) and, for a local
    directory, `local_revision`: its files' names, sizes and modification times."""

    load_from: str
    source: str
    local_revision: str | None = None


@contextmanager
def opened_model_source(
    model_path: str, allowed_local_dirs: Iterable[Path]
) -> Iterator[ModelSource]:
    """The source to load `model_path` from, valid for the block.

    A local directory has every file opened and verified first (`shared.local_files`): a link
    inside it that leads outside the allowed directories fails the job, naming the entry as
    the user would. transformers then loads from a private view whose files link to those
    open descriptors, so it reads exactly the files that were checked. A hub id is passed on.
    """
    allowed = list(allowed_local_dirs)
    resolved = resolve_model_path(model_path, allowed)
    if not os.path.isabs(resolved):
        yield ModelSource(load_from=resolved, source=resolved)
        return
    with ExitStack() as stack:
        try:
            tree = stack.enter_context(
                local_files.open_tree(Path(resolved), allowed, shown=model_path, recursive=True)
            )
        except local_files.LocalFileRefused as exc:
            raise PipelineError(f"model_path {exc}") from None
        view = stack.enter_context(local_files.linked_view(tree))
        yield ModelSource(load_from=str(view), source=resolved, local_revision=tree.revision())


def hub_options(token: str | None, cache_dir: Path | None) -> dict[str, Any]:
    """`from_pretrained`'s hub arguments: the job's token and, when the job has its own, its
    cache directory (None: the shared Hugging Face cache)."""
    options: dict[str, Any] = {"token": token}
    if cache_dir is not None:
        options["cache_dir"] = str(cache_dir)
    return options


def load_tokenizer(
    model_path: str,
    *,
    allowed_local_dirs: Iterable[Path],
    token: str | None = None,
    cache_dir: Path | None = None,
    log: LogFn = no_log,
) -> Any:
    """The base model's tokenizer, with a pad token (its EOS if it has none). `cache_dir`:
    see `hub_options`."""
    from transformers import AutoTokenizer

    with opened_model_source(model_path, allowed_local_dirs) as source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source.load_from, trust_remote_code=False, **hub_options(token, cache_dir)
            )
        except Exception as exc:  # any failure here means "this tokenizer cannot be loaded"
            raise PipelineError(
                f"could not load the tokenizer of {model_path!r}: {type(exc).__name__}: {exc}"
            ) from None
    # Named by its source, not by the private view it was read through.
    tokenizer.name_or_path = source.source
    if tokenizer.pad_token is None:
        # Labels are masked by position, never by pad id, so pad == EOS is safe; adding a new
        # token would need an embedding row the adapter cannot carry.
        tokenizer.pad_token = tokenizer.eos_token
        log(f"tokenizer has no pad token; padding with EOS {tokenizer.eos_token!r}")
    tokenizer.padding_side = "right"
    return tokenizer


CpuBf16 = Literal["auto", "on", "off"]


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512_BF16 or AMX). There bf16 matmuls
    run about 4x faster than fp32 (Zen 5 EPYC, SmolLM2's shapes: 870 vs 200 GFLOP/s on 2
    cores); elsewhere oneDNN emulates bf16, slower than fp32."""
    # torch.cpu's probes are private, hence the defaults; a torch without them answers no.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def compute_dtype(cpu_bf16: CpuBf16 = "auto") -> torch.dtype:
    """bf16 on a CUDA GPU that supports it, fp16 on an older GPU; on CPU bf16 where it
    multiplies bf16 in hardware (or `cpu_bf16` says "on"), fp32 elsewhere (or "off").

    The base weights are loaded in this dtype and the Trainer computes in it (autocast); the
    LoRA weights and the optimizer stay in fp32.
    """
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_bf16 == "on" or (cpu_bf16 == "auto" and cpu_multiplies_bf16()):
        return torch.bfloat16
    return torch.float32


# Set by `full_finetune.prepare_full_finetune` on a base loaded in fp32 master weights: the
# dtype its forward passes compute in (autocast), which the loaded dtype no longer tells.
COMPUTE_DTYPE_ATTRIBUTE = "tunery_compute_dtype"


def loaded_dtype(model: Any) -> torch.dtype:
    """The dtype `load_model` loaded the base in: the Trainer's mixed precision follows it.
    (The parameters cannot say: 4-bit preparation casts the unquantized ones to fp32.) A full
    fine-tune keeps fp32 weights and answers the dtype it computes in instead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    computes_in = getattr(base, COMPUTE_DTYPE_ATTRIBUTE, None)
    if isinstance(computes_in, torch.dtype):
        return computes_in
    dtype = getattr(base.config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def attention_implementation(dtype: torch.dtype) -> str:
    """flash-attention where its variable-length kernels run (CUDA, `flash_attn` installed,
    half precision), so that training batches can go without padding (`batching`); PyTorch's
    SDPA elsewhere on GPUs; on CPU `cpu_attention`'s blocked causal attention, which trains
    faster there than SDPA's fused CPU kernel."""
    if not torch.cuda.is_available():
        from worker.pipeline import cpu_attention

        return cpu_attention.register()
    if dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def base_weights_dir(
    model_path: str, *, allowed_local_dirs: Iterable[Path], token: str | None = None,
    cache_dir: Path | None = None,
) -> str:
    """The directory of the base's safetensors files, which loading already fetched: the
    allowed local directory, or the hub snapshot in the job's hub cache."""
    resolved = resolve_model_path(model_path, allowed_local_dirs)
    if os.path.isabs(resolved):
        return resolved
    from huggingface_hub import snapshot_download

    return str(snapshot_download(resolved, token=token, local_files_only=True,
                                 cache_dir=None if cache_dir is None else str(cache_dir)))


def check_4bit_available() -> None:
    """Raise `PipelineError` unless bitsandbytes can quantize to 4 bit on this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # import errors, missing native library, unsupported device
        raise PipelineError(
            f"use_quantization (4-bit QLoRA) is not available on this worker ({device}): "
            f"{type(exc).__name__}: {exc}. Set use_quantization to false to train plain LoRA."
        ) from None


def load_model(
    model_path: str,
    config: PretrainedModelConfig,
    *,
    allowed_local_dirs: Iterable[Path],
    token: str | None = None,
    cache_dir: Path | None = None,
    cpu_bf16: CpuBf16 = "auto",
    log: LogFn = no_log,
) -> Any:
    """Load the base model and wrap it with a fresh LoRA adapter; returns the `PeftModel`.

    `load_base_model` then `add_lora`; a worker that keeps base models between jobs calls the
    two itself (`base_cache`). `cpu_bf16` is the worker's `TUNERY_CPU_BF16` (see
    `compute_dtype`).
    """
    base = load_base_model(
        model_path, config, allowed_local_dirs=allowed_local_dirs, token=token,
        cache_dir=cache_dir, cpu_bf16=cpu_bf16, log=log,
    )
    return add_lora(base, config, log=log)


def base_model_options(
    config: PretrainedModelConfig, cpu_bf16: CpuBf16 = "auto"
) -> dict[str, Any]:
    """What `from_pretrained` gets besides the source and the token: dtype, device map, 4-bit
    quantization, attention. Together with the source they decide the loaded base."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(cpu_bf16)
    options: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": False,
        # Pickled .bin checkpoints can run code when loaded.
        "use_safetensors": True,
    }
    if torch.cuda.is_available() and in_process_group():
        # One process per GPU (`ranks`): each rank's model lives on its own device; FSDP
        # shards it from there.
        options["device_map"] = {"": local_rank()}
    elif torch.cuda.is_available():
        # "nmp", naive model parallel: layers spread over the GPUs of this worker.
        options["device_map"] = "auto"
    if not config.use_lora:
        # Full fine-tuning updates the weights themselves: they stay fp32 master weights
        # (a bf16 weight loses updates smaller than its rounding step); the forward passes
        # still compute in `dtype` under autocast (`full_finetune`).
        options["dtype"] = torch.float32
    if config.use_quantization:
        # fp16 compute overflows too easily for training; without bf16, compute in fp32.
        options["dtype"] = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=options["dtype"],
        )
    options["attn_implementation"] = attention_implementation(options["dtype"])
    return options


def load_base_model(
    model_path: str,
    config: PretrainedModelConfig,
    *,
    allowed_local_dirs: Iterable[Path],
    token: str | None = None,
    cache_dir: Path | None = None,
    cpu_bf16: CpuBf16 = "auto",
    log: LogFn = no_log,
) -> Any:
    """Load the base model, frozen and ready for `add_lora`.

    With `config.use_quantization` the base is 4-bit NF4 with double quantization (QLoRA);
    there is no silent fallback when 4-bit is unavailable. Only `base_model_options(config)`
    and the source decide what is loaded: the LoRA settings of `config` play no part.
    """
    with opened_model_source(model_path, allowed_local_dirs) as source:
        return load_base_model_from(source, model_path, config, token=token,
                                    cache_dir=cache_dir, cpu_bf16=cpu_bf16, log=log)


def load_base_model_from(
    source: ModelSource,
    model_path: str,
    config: PretrainedModelConfig,
    *,
    token: str | None = None,
    cache_dir: Path | None = None,
    cpu_bf16: CpuBf16 = "auto",
    log: LogFn = no_log,
) -> Any:
    """`load_base_model` from a source `opened_model_source` holds open; `model_path` is how
    errors name it."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    options = base_model_options(config, cpu_bf16)
    if config.use_quantization:
        check_4bit_available()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            source.load_from, **hub_options(token, cache_dir), **options
        )
    except Exception as exc:  # any failure here means "this model cannot be loaded"
        hint = " (only safetensors checkpoints are accepted)" if "safetensors" in str(exc) else ""
        raise PipelineError(
            f"could not load model {model_path!r}: {type(exc).__name__}: {exc}{hint}"
        ) from None
    # Named by the source, not by the private view the files were read through; the exported
    # adapter names its base as the user did (`export_adapter`).
    model.config._name_or_path = model.name_or_path = source.source
    if config.use_quantization:
        keep_4bit_weights_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        log(f"base model loaded in 4-bit NF4 (double quantization), compute {options['dtype']}")
    elif options["dtype"] == torch.bfloat16 and not torch.cuda.is_available():
        log(f"base model loaded in {options['dtype']}, mixed precision on CPU "
            f"(TUNERY_CPU_BF16={cpu_bf16})")
    else:
        log(f"base model loaded in {options['dtype']}")
    log(f"attention: {model.config._attn_implementation}")
    return model


def add_lora(
    model: Any, config: PretrainedModelConfig, *, seed: int = LORA_INIT_SEED,
    resumed: bool = False, initial_adapter: Path | None = None,
    base_weights_dir: str | None = None, log: LogFn = no_log,
) -> Any:
    """Wrap a base model from `load_base_model` with a fresh LoRA adapter as `config` says,
    drawn with `seed` (the job's, `training_plan.job_seed`); returns the `PeftModel`.
    Gradient checkpointing, when asked for, is turned on here.

    `resumed`: the adapter's weights will come from a checkpoint, so no initialization reads
    the base. `initial_adapter`: the `lora_init.INITIAL_ADAPTER_FILE` of the checkpoint or
    earlier adapter this job starts from; the base residual of PiSSA/OLoRA is rebuilt from
    it, never decomposed again.
    `base_weights_dir`: the base's safetensors directory, which LoftQ reads the unquantized
    weights from (`base_weights_dir()`)."""
    from peft import LoraConfig, get_peft_model, replace_lora_weights_loftq

    if config.use_gradient_checkpointing:
        enable_gradient_checkpointing(model)
        log("gradient checkpointing on")
    targets = config.lora_target_modules
    if targets is not None:
        check_target_modules(model, targets)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        bias=config.lora_bias,
        # A list is matched by exact name or dotted suffix, never as a regex.
        target_modules=list(targets) if targets is not None else "all-linear",
        task_type="CAUSAL_LM",
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        # Resumed, the adapter's start comes from the checkpoint: nothing to decompose.
        init_lora_weights=(True if resumed or initial_adapter is not None
                           else lora_init.peft_init_lora_weights(config.lora_init)),
    )
    # lora_A is drawn from torch's global generator, and the Trainer seeds only later: seed
    # here, or two runs of the same request start from different adapters.
    torch.manual_seed(seed)
    fresh = not resumed and initial_adapter is None
    if resumed and initial_adapter is None and lora_init.rewrites_base(config.lora_init):
        raise PipelineError(f"lora_init {config.lora_init!r}: the checkpoint to resume from "
                            "lacks its initial adapter; the base residual cannot be rebuilt")
    model = get_peft_model(model, lora)
    if initial_adapter is not None:
        lora_init.rebuild_residual_base(model, initial_adapter)
        log(f"lora_init {config.lora_init!r}: base residual rebuilt from the checkpoint's "
            "initial adapter")
    elif fresh and lora_init.rewrites_base(config.lora_init):
        lora_init.decompose_base(model, config.lora_init)
        log(f"lora_init {config.lora_init!r}: adapter initialized from the base weights")
    elif fresh and config.lora_init == "loftq":
        if base_weights_dir is None:
            raise PipelineError("lora_init 'loftq' needs the base's safetensors files")
        replace_lora_weights_loftq(model, model_path=base_weights_dir)
        log("lora_init 'loftq': adapter initialized against the 4-bit quantization error")
    if loaded_dtype(model) != torch.float32:
        train_lora_inputs_in_half_precision(model)
    trainable, total = model.get_nb_trainable_parameters()
    where = ", ".join(targets) if targets is not None else "all linear layers"
    variant = "".join((" DoRA" if config.use_dora else "", " rsLoRA" if config.use_rslora else ""))
    log(
        f"LoRA{variant} r={config.lora_r} alpha={config.lora_alpha} on {where}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    return model


def train_lora_inputs_in_half_precision(model: torch.nn.Module) -> None:
    """Stop peft casting each LoRA layer's input to the adapter's fp32 in a half-precision run.

    Training and evaluation run under autocast (the Trainer's, and `TuneryTrainer`'s own for
    the labelled loss), which casts that input straight back to bf16 for the matmul: the same
    values, and two copies (and their backward) per LoRA layer for nothing; 8-10% of a SmolLM2
    step on CPU. Outside autocast a bf16 input would now meet the fp32 adapter and fail with a
    dtype error, never compute something else. The flag lives on the LoRA layers, which leave
    the base with the adapter.
    """
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010 - typed Module


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (`q_proj`, ..., `lm_head`)."""
    # bitsandbytes' Linear4bit subclasses nn.Linear, so quantized layers are listed too.
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: Iterable[str]) -> None:
    """`PipelineError` listing the model's linear layers if a target matches none of them.

    peft would raise on a list matching nothing at all, but silently skip one bad name among
    good ones: a typo would train fewer layers than asked.
    """
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    unmatched = [
        target
        for target in targets
        if not any(name == target or name.endswith("." + target) for name in linear)
    ]
    if unmatched:
        raise PipelineError(
            f"lora_target_modules {unmatched} match no linear layer of this model; its linear "
            f"layers are {linear_module_names(model)}"
        )


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with avx512_bf16, the first no-grad forward of a `Linear4bit` in eval mode (the
    Trainer's evaluation) repacks its weight for a fused kernel for good; later training
    forwards then go through an op without autograd, and gradients through the base weights
    silently vanish (layer-0 lora_A grad norm 3.2e-3 before one eval, 3.4e-7 after).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in backward; non-reentrant, so frozen inputs need no hack."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # The KV cache is useless in training and conflicts with checkpointing.
    model.config.use_cache = False
