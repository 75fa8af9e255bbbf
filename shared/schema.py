"""The MonsterAPI fine-tuning payload, field for field.

Names, defaults and bounds mirror the public `monsterapi` client (`monsterapi/LLM_config.py`,
version 1.0.9.3) so that client code written for MonsterAPI works unchanged. Two deliberate
differences: unknown fields are refused (`extra="forbid"`), because a typo that silently trains
with a default wastes GPU hours; and options Tunery cannot honour yet are refused with a
message saying so, rather than accepted and ignored.

Fields the client does not have are Tunery extensions (`lora_target_modules`,
`train_on_inputs`, `validation_data_path`, ...); their defaults keep MonsterAPI's behaviour.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.payload_secrets import drop_secrets
from shared.resume import parse_resume_path
from shared.sources import SourceError, uploaded_dataset_id

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
)

_PLACEHOLDER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A module name as peft matches it in a list: "q_proj" or a dotted suffix like
# "self_attn.q_proj". peft reads a plain string as a regex; a list of these never is.
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# "name" or "owner/name", as the hub accepts them.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")

_NUL_MESSAGE = "must not contain NUL characters (\\u0000)"

MAX_TEMPLATE_PLACEHOLDERS = 64
"""Most placeholders a prompt template may have. Each one copies a whole cell into every
rendered example, so the count multiplies the memory a render takes; real templates name a
handful of columns, and 64 leaves room for a column repeated in a few-shot layout."""


MAX_EARLY_STOPPING_PATIENCE = 100_000
"""The highest `early_stopping_patience`: more evaluations than any run makes, so a job that
asks for it never stops early."""


class TemplateError(ValueError):
    """A prompt template that uses anything but bare column names as placeholders."""


def template_placeholders(template: str) -> list[str]:
    """Return the column names a prompt template refers to, in order of appearance.

    Only bare identifiers are allowed (`{instruction}`). Positional (`{0}`), attribute
    (`{a.b}`), index (`{a[0]}`), conversion (`{a!r}`) and format-spec (`{a:>10}`) fields are
    refused: rendering never goes through `str.format`, and refusing them here means a
    template that works at submit time cannot reach an attribute at render time.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"unbalanced braces: {exc}") from None
    for _literal, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if conversion is not None or format_spec:
            raise TemplateError(
                f"placeholder {{{field_name}}} uses a conversion or format spec; "
                "only bare column names like {instruction} are allowed"
            )
        if not _PLACEHOLDER.fullmatch(field_name):
            raise TemplateError(
                f"placeholder {{{field_name}}} is not a bare column name; "
                "only names like {instruction} are allowed"
            )
        names.append(field_name)
    if not names:
        raise TemplateError("the template has no {column} placeholder")
    if len(names) > MAX_TEMPLATE_PLACEHOLDERS:
        raise TemplateError(
            f"the template has {len(names)} placeholders; at most {MAX_TEMPLATE_PLACEHOLDERS} "
            "are allowed"
        )
    return names


def _check_template(value: str) -> str:
    if "\x00" in value:
        raise ValueError(_NUL_MESSAGE)
    try:
        template_placeholders(value)
    except TemplateError as exc:
        raise ValueError(str(exc)) from None
    return value


PromptTemplate = Annotated[str, AfterValidator(_check_template)]
"""A prompt template whose placeholders are bare column names (see `template_placeholders`)."""


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    return False


# Number fields, optional ones included, that must refuse a JSON boolean.
_NUMBERS = (int, float, int | None, float | None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax validation reads JSON true as 1: `"lora_r": true` would train with rank 1.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in _NUMBERS:
            raise ValueError("a number is required, not a boolean")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        # No path, id, name, token or template needs one; PostgreSQL text cannot store one, and
        # a path holding one makes the file system calls that check it fail.
        if _contains_nul(value):
            raise ValueError(_NUL_MESSAGE)
        return value


LoraInit = Literal["default", "gaussian", "pissa", "olora", "loftq"]
# The LoRA initializations that rewrite the base weights they decompose (W - scaling * B0 A0).
BASE_REWRITING_INITS: frozenset[str] = frozenset({"pissa", "olora"})


class PretrainedModelConfig(_Strict):
    model_path: str = Field(
        "mistralai/Mistral-7B-v0.1",
        min_length=1,
        max_length=512,
        description="Base model: a hub id or a local directory the operator allows.",
    )
    resume_checkpoint_path: str = Field(
        "",
        max_length=512,
        description="An earlier job of yours to continue from: '{job_id}', 'jobs/{job_id}' "
        "(its final adapter) or 'jobs/{job_id}/checkpoints/step-N'. Its adapter weights "
        "initialize this job's LoRA; training uses this job's config and a new optimizer.",
    )
    use_lora: bool = Field(
        True,
        description="Train a LoRA adapter (true) or every weight of the model (false: full "
        "fine-tuning in fp32 master weights, exported as a whole model; the lora_* fields, "
        "use_dora and use_rslora are then unused). Full fine-tuning refuses "
        "use_quantization, resume_checkpoint_path, preference_optimization and strategy "
        "'fsdp'.",
    )
    lora_r: int = Field(8, gt=0, lt=2048, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, lt=2048, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Dropout on the LoRA path.")
    lora_bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases to train, as in peft's LoraConfig.bias."
    )
    lora_target_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Tunery extension: names of the linear layers to adapt, e.g. "
        "['q_proj', 'v_proj'] (a name matches a layer whose path ends with it). None adapts "
        "every linear layer but the output head (peft's 'all-linear'). A name that matches no "
        "linear layer fails the job with the list of the model's linear layer names.",
    )
    use_quantization: bool = Field(
        False, description="QLoRA: load the base model in 4-bit NF4 with double quantization."
    )
    use_dora: bool = Field(
        False,
        description="Tunery extension: DoRA (peft's use_dora), which splits each adapted "
        "weight into a magnitude vector and a direction that LoRA trains.",
    )
    use_rslora: bool = Field(
        False,
        description="Tunery extension: rank-stabilized LoRA (peft's use_rslora), scaling the "
        "adapter by lora_alpha/sqrt(lora_r) instead of lora_alpha/lora_r.",
    )
    lora_init: LoraInit = Field(
        "default",
        description="Tunery extension: how the adapter starts (peft's init_lora_weights). "
        "'default': lora_A random, lora_B zero; 'gaussian': lora_A drawn from a Gaussian; "
        "'pissa' / 'olora': from the base weights' principal singular vectors / QR "
        "decomposition, which the base gives up during training (the exported adapter is "
        "converted back to one for the original base, of rank 2*lora_r); 'loftq': lora_A and "
        "lora_B that make up for the 4-bit quantization error (needs use_quantization). "
        "pissa and olora need an unquantized base; none but 'default' goes with "
        "resume_checkpoint_path.",
    )
    use_gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory by recomputing activations."
    )
    parallelization: Literal["nmp"] = Field(
        "nmp", description="Parallelization strategy; only 'nmp' (naive model parallel)."
    )

    @model_validator(mode="after")
    def _full_finetune_alone(self) -> PretrainedModelConfig:
        if self.use_lora:
            return self
        if self.use_quantization:
            raise ValueError(
                "use_lora false with use_quantization true: a 4-bit base cannot be fully "
                "trained; set use_quantization false, or use_lora true for QLoRA"
            )
        if self.resume_checkpoint_path:
            raise ValueError(
                "use_lora false with resume_checkpoint_path: it continues an earlier job's LoRA "
                "adapter, which a full fine-tune has none of; leave resume_checkpoint_path out"
            )
        return self

    @field_validator("lora_target_modules")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        bad = [name for name in value if not _MODULE_NAME.fullmatch(name)]
        if bad:
            raise ValueError(
                f"not layer names: {bad}; use names like 'q_proj' or 'self_attn.q_proj' "
                "(letters, digits, '_', '.'; no patterns)"
            )
        return list(dict.fromkeys(value))

    @field_validator("lora_init")
    @classmethod
    def _init_fits_the_base(cls, value: LoraInit, info: ValidationInfo) -> LoraInit:
        quantized = info.data.get("use_quantization", False)
        if value == "loftq" and not quantized:
            raise ValueError(
                "'loftq' makes up for the 4-bit quantization error of the base: it needs "
                "use_quantization true; choose another lora_init for an unquantized base"
            )
        if value in BASE_REWRITING_INITS and quantized:
            raise ValueError(
                f"{value!r} decomposes the base weights and moves part of them into the "
                "adapter, which a 4-bit base cannot give up exactly; set use_quantization "
                "false or choose lora_init 'default', 'gaussian' or 'loftq'"
            )
        if value in BASE_REWRITING_INITS and info.data.get("use_dora"):
            raise ValueError(
                f"{value!r} with use_dora: the adapter is converted for the original base at "
                "export, and peft's conversion cannot carry DoRA's magnitude vector; set "
                "use_dora false or choose lora_init 'default' or 'gaussian'"
            )
        if value != "default" and info.data.get("resume_checkpoint_path"):
            raise ValueError(
                f"{value!r} initializes a new adapter, but resume_checkpoint_path starts this "
                "job from an earlier adapter's weights (and an earlier PiSSA/OLoRA checkpoint "
                "brings its own base residual); leave lora_init 'default'"
            )
        return value

    @field_validator("resume_checkpoint_path")
    @classmethod
    def _resume_path_grammar(cls, value: str) -> str:
        if value:
            parse_resume_path(value)  # the API checks at submit that the job is the caller's
        return value


class DataConfig(_Strict):
    data_path: str = Field(
        "tatsu-lab/alpaca",
        min_length=1,
        max_length=2048,
        description="Hub dataset id, a dataset uploaded to Tunery (ds_...), an https / "
        "presigned URL, or a local file the operator allows.",
    )
    data_subset: str | None = Field(
        None, max_length=256, description="Hub dataset subset; 'default' means none."
    )
    data_source_type: Literal["hub_link", "s3_presigned_link"] = Field(
        "hub_link", description="How data_path is read."
    )
    prompt_template: PromptTemplate = Field(
        "Here is an example on how to use tatsu-lab/alpaca dataset "
        "### Input: {instruction} ### Output: {output}",
        min_length=1,
        max_length=16384,
        description="Text with {column} placeholders; the last placeholder's segment is the "
        "completion the loss is computed on.",
    )
    cutoff_len: int = Field(512, gt=0, le=32768, description="Maximum tokens per example.")
    # Declared before data_split_config, whose validator reads it.
    validation_data_path: str | None = Field(
        None,
        max_length=256,
        description="Tunery extension: a dataset uploaded to Tunery (ds_...) whose rows are the "
        "validation set, rendered as data_path's are (prompt_template, chat mode, preference "
        "rows), instead of a split of data_path. data_split_config then may not ask for a "
        "validation fraction (a 422 naming it): its train fraction still applies to "
        "data_path, and left out it is {'train': 1.0, 'validation': 0.0}, every row of "
        "data_path trained. None: validation is the split of data_path.",
    )
    data_split_config: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "validation": 0.1},
        description="Fractions of the rows used for training and validation; with "
        "validation_data_path, the train fraction only.",
    )
    prevalidated: bool = Field(False, description="Accepted for compatibility; has no effect.")
    packing: bool | None = Field(
        None,
        description="Tunery extension: true packs the examples of each batch into one row "
        "without padding, each example attending only to its own tokens (position ids "
        "restart at each example); false keeps padded batches (see "
        "training_config.group_by_length). None: the worker chooses, packed where the "
        "attention has a variable-length kernel (flash-attention on GPUs), padded and "
        "length-grouped elsewhere.",
    )
    train_on_inputs: bool = Field(
        False,
        description="Tunery extension: compute the loss on every token (prompt included). "
        "False, the default, computes it on the completion only (in chat mode: on the "
        "assistant turns only).",
    )


    @field_validator("data_subset")
    @classmethod
    def _default_subset_is_none(cls, value: str | None) -> str | None:
        return None if value in (None, "", "default") else value

    @field_validator("validation_data_path")
    @classmethod
    def _uploaded_dataset(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return uploaded_dataset_id(value)
        except SourceError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("data_split_config")
    @classmethod
    def _split_ratios(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        unknown = set(value) - {"train", "validation"}
        if unknown:
            raise ValueError(f"unknown split names {sorted(unknown)}; use 'train' and 'validation'")
        for name, ratio in value.items():
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} ratio {ratio} is outside [0, 1]")
        separate = info.data.get("validation_data_path") is not None
        train = value.get("train", 0.9)
        validation = value.get("validation", 0.0 if "train" in value or separate else 0.1)
        if separate and validation > 0:
            raise ValueError(
                f"validation {validation:g} asks for a split of data_path, but "
                "validation_data_path names the validation set; leave 'validation' out (the "
                "train fraction still applies to data_path) or leave validation_data_path out"
            )
        if train <= 0:
            raise ValueError("the train ratio must be above 0")
        if train + validation > 1.0 + 1e-9:
            raise ValueError(f"train + validation = {train + validation:g} is above 1")
        return {"train": train, "validation": validation}

    @model_validator(mode="after")
    def _no_split_beside_a_validation_dataset(self) -> DataConfig:
        # The default split holds a tenth of data_path out; with a validation dataset that
        # tenth would be neither trained on nor evaluated.
        if self.validation_data_path is not None and "data_split_config" not in \
                self.model_fields_set:
            self.data_split_config = {"train": 1.0, "validation": 0.0}
        return self

    @property
    def has_validation(self) -> bool:
        """Whether the job evaluates: a validation dataset, or a split that holds rows out."""
        return (self.validation_data_path is not None
                or self.data_split_config["validation"] > 0)


ExportFormat = Literal["merged", "gguf"]
GgufQuantization = Literal["f16", "q8_0"]


class ExportRequest(_Strict):
    """Tunery extension: one export of a completed job, for tools that load no LoRA adapter
    (llama.cpp, Ollama). Body of `POST /v1/finetune/llm/{job_id}/exports`."""

    format: ExportFormat = Field(
        description="'merged': the base model with the adapter folded into its weights, as "
        "safetensors shards with config and tokenizer (base loaded unquantized, even for a "
        "QLoRA job). 'gguf': that merged model converted by llama.cpp's converter into one GGUF "
        "file, with an Ollama Modelfile beside it.",
    )
    quantization: GgufQuantization | None = Field(
        None, validate_default=True,
        description="With format 'gguf' only: 'f16' (the default) or 'q8_0' (8-bit, about "
        "half the size).",
    )

    @field_validator("quantization")
    @classmethod
    def _gguf_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        gguf = info.data.get("format") == "gguf"
        if value is not None and not gguf:
            raise ValueError("quantization applies to format 'gguf' only")
        return "f16" if gguf and value is None else value

    @property
    def kind(self) -> str:
        """What names this export among a job's: 'merged', 'gguf-f16' or 'gguf-q8_0'; the
        folder of its files too (`shared.storage_keys.job_export_prefix`)."""
        return self.format if self.quantization is None else f"{self.format}-{self.quantization}"

    @classmethod
    def of_kind(cls, kind: str) -> ExportRequest:
        """The request whose `kind` is `kind`; `ValueError` for a kind no request has."""
        format_, _, quantization = kind.partition("-")
        return cls.model_validate({"format": format_, "quantization": quantization or None})


MAX_EXPORTS_ON_COMPLETION = 3
# The most devices one job may ask for: one host's (torchrun starts every process on it).
MAX_JOB_DEVICES = 16
# NEFTune's paper tries 5 to 15; far above, the noise drowns the embeddings.
MAX_NEFTUNE_NOISE_ALPHA = 100
TrainingStrategy = Literal["ddp", "fsdp"]


# The most validation prompts a job's evaluations answer (`sample_prompts`): each is a
# generation at every evaluation.
MAX_SAMPLE_PROMPTS = 8


class TrainingConfig(_Strict):
    max_eval_examples: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Tunery extension: how many validation examples each evaluation reads (a "
        "fixed, seeded sample of the split, the same every time). None: as many as keep all "
        "evaluations within about 5% of the training compute (TUNERY_EVAL_COMPUTE_SHARE), at "
        "least 32; a smaller split is read whole.",
    )
    sample_prompts: int = Field(
        0, ge=0, le=MAX_SAMPLE_PROMPTS,
        description="Tunery extension: how many fixed validation prompts the model answers "
        "(greedy, up to 48 new tokens) before training and at every evaluation, shown in the "
        "job's log and, base model beside the kept adapter, in its report.json artifact; 3 "
        "is a good start. 0, the default: none (each answer costs a generation at every "
        "evaluation, a large share of a short job on CPU).",
    )
    early_stopping_patience: int = Field(
        5, gt=0, le=MAX_EARLY_STOPPING_PATIENCE,
        description="Evaluations without improvement before training stops.",
    )
    num_train_epochs: float = Field(1, gt=0, le=100, description="Epochs; may be fractional.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, lt=1000, description="Micro-batches per optimizer step."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, le=64,
        description="Tunery extension: examples per micro-batch, the examples one forward and "
        "backward pass trains on; an optimizer step trains on micro_batch_size x "
        "gradient_accumulation_steps examples. None: 4. Length-grouped batches hold this many "
        "on average (as many batches an epoch as fixed ones would make); a preference example "
        "is its chosen and its rejected answer.",
    )
    devices: int = Field(
        1, ge=1, le=MAX_JOB_DEVICES,
        description="Tunery extension: how many devices of one worker train the job, as one "
        "torchrun process group (one process per GPU; on a CPU worker, per process). "
        "micro_batch_size is per device: an optimizer step trains on micro_batch_size x "
        "gradient_accumulation_steps x devices examples. The job goes to a device class with "
        "at least this many devices (TUNERY_DEVICE_CLASSES); none: 422.",
    )
    strategy: TrainingStrategy = Field(
        "ddp",
        description="Tunery extension, with devices above 1: 'ddp' (each device holds the "
        "whole model and trains a share of every batch; gradients are averaged) or 'fsdp' "
        "(PyTorch FSDP2: the weights, gradients and optimizer state are sharded over the "
        "devices, for a model that does not fit one). MonsterAPI's "
        "pretrainedmodel_config.parallelization keeps its meaning within each process.",
    )
    warmup_steps: int = Field(
        50, ge=1, le=1_000_000, description="Steps of linear learning-rate warm-up."
    )
    learning_rate: float = Field(0.001, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler_type: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        "reduce_lr_on_plateau", description="Learning-rate schedule."
    )
    group_by_length: bool | None = Field(
        None,
        description=(
            "true: batch examples of similar length together to reduce padding. false: random "
            "batches of the same number of examples, padded to their longest. Omitted: the "
            "worker chooses, which today means length-grouped batches (padding-free ones on "
            "GPUs with flash-attention)."
        ),
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="Tunery extension: the seed of everything random in training: the LoRA "
        "initialization, dropout, the train/validation split and the order of the batches. "
        "Two jobs with the same seed, data and configuration train the same adapter (on the "
        "same hardware and library versions). None: the worker's fixed seed, 42.",
    )
    preference_optimization: Literal["ORPO", "DPO", "DONT"] = Field(
        "DONT",
        description=(
            "'ORPO' or 'DPO' (DPO is a Tunery extension): train on preference pairs, either "
            "the dataset's prompt / chosen / rejected columns or rows in OpenAI's preference "
            "format (input.messages, preferred_output, non_preferred_output), with ORPO (no "
            "reference model) or DPO (the reference is the base model, the adapter disabled); "
            "prompt_template unused, cutoff_len caps prompt + answer. 'DONT': supervised "
            "fine-tuning through the prompt_template."
        ),
    )
    beta: float | None = Field(
        None, gt=0, le=10,
        description="Tunery extension, with preference_optimization 'DPO' or 'ORPO' only. DPO: "
        "how far the adapter may move from the reference model (the base); higher keeps it "
        "closer; the implicit rewards are beta x the log-probability ratios. ORPO: the weight "
        "of the odds-ratio term next to the supervised loss on the chosen answer (the paper's "
        "lambda). None: 0.1 for either.",
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, le=MAX_NEFTUNE_NOISE_ALPHA,
        description="Tunery extension, supervised fine-tuning only: NEFTune (Jain et al., "
        "2023), uniform noise of scale alpha / sqrt(positions x hidden size) added to the "
        "input embeddings in training steps, never in evaluation; the paper uses 5 to 15. "
        "None: no noise.",
    )
    exports_on_completion: list[ExportRequest] = Field(
        default_factory=list, max_length=MAX_EXPORTS_ON_COMPLETION,
        description="Tunery extension: exports a worker builds once the job has COMPLETED, "
        "each as `POST /v1/finetune/llm/{job_id}/exports` would, e.g. [{\"format\": "
        "\"merged\"}, {\"format\": \"gguf\", \"quantization\": \"q8_0\"}]. The job "
        "completes without waiting for them; follow them at `GET "
        "/v1/finetune/llm/{job_id}/exports`.",
    )

    @field_validator("exports_on_completion")
    @classmethod
    def _each_export_once(cls, value: list[ExportRequest]) -> list[ExportRequest]:
        kinds = [spec.kind for spec in value]
        repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if repeated:
            raise ValueError(f"each export is asked for once; repeated: {repeated}")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy_needs_devices(cls, value: str, info: ValidationInfo) -> str:
        # devices is declared first, so it is in info.data once valid.
        if value != "ddp" and info.data.get("devices") == 1:
            raise ValueError(
                f"strategy {value!r} shards a job over several devices; set devices above 1 "
                "or leave strategy out"
            )
        return value

    @field_validator("beta")
    @classmethod
    def _beta_needs_preferences(cls, value: float | None, info: ValidationInfo) -> float | None:
        # preference_optimization is declared first, so it is in info.data once valid.
        if value is not None and info.data.get("preference_optimization") == "DONT":
            raise ValueError(
                "beta applies to preference_optimization 'DPO' or 'ORPO' only; leave it out "
                "for supervised fine-tuning"
            )
        return value

    @field_validator("neftune_noise_alpha")
    @classmethod
    def _neftune_supervised_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        # preference_optimization is declared first, so it is in info.data once valid.
        method = info.data.get("preference_optimization")
        if value is not None and method not in (None, "DONT"):
            raise ValueError(
                f"neftune_noise_alpha applies to supervised fine-tuning only, not to "
                f"preference_optimization {method!r} (its noise would reach the reference and "
                f"the rejected answers too); leave one of them out"
            )
        return value


class LoggingConfig(_Strict):
    use_wandb: bool = Field(
        False, description="Report losses, learning rate and evaluations to Weights & Biases."
    )
    wandb_username: str = Field(
        "", max_length=256, description="W&B entity (user or team); empty: the key's default."
    )
    wandb_login_key: str = Field(
        "", max_length=256, description="W&B API key; never logged or echoed back."
    )
    wandb_project: str = Field(
        "",
        max_length=256,
        validate_default=True,
        description="W&B project to report to; required with use_wandb.",
    )
    wandb_run_name: str = Field("", max_length=256, description="W&B run name; empty: W&B's.")

    @field_validator("wandb_project")
    @classmethod
    def _project_when_reporting(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("use_wandb") and not value.strip():
            raise ValueError("use_wandb needs a wandb_project to report to")
        return value


class HuggingfaceConfig(_Strict):
    # Declared before hf_token, so that hf_token's validator can see it.
    hf_model_path: str | None = Field(
        None,
        max_length=512,
        description="Hub repo ('owner/name') to push the adapter and tokenizer to when training "
        "ends; created private if it does not exist. Needs hf_token with write access.",
    )
    hf_token: str | None = Field(
        None,
        max_length=512,
        validate_default=True,
        description="Token for private hub models and datasets, and for hf_model_path.",
    )

    @field_validator("hf_model_path")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value and not _HUB_REPO_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a hub repo id like 'owner/name'")
        return value or None

    @field_validator("hf_token")
    @classmethod
    def _token_to_push(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("hf_model_path") and not value:
            raise ValueError("hf_model_path needs an hf_token with write access to the repo")
        # It travels in an HTTP header (the dry run's hub lookup, the worker's downloads),
        # which takes printable ASCII only.
        if value and not all("!" <= c <= "~" for c in value):
            raise ValueError("a token is printable ASCII without spaces, such as hf_…")
        return value


class FinetuneRequest(_Strict):
    """Body of `POST /v1/finetune/llm`."""

    pretrainedmodel_config: PretrainedModelConfig
    data_config: DataConfig
    training_config: TrainingConfig
    logging_config: LoggingConfig
    hf_config: HuggingfaceConfig = Field(default_factory=HuggingfaceConfig)
    user_session_token: str | None = Field(None, max_length=512)

    @model_validator(mode="after")
    def _scheduler_needs_validation(self) -> FinetuneRequest:
        if (
            self.training_config.lr_scheduler_type == "reduce_lr_on_plateau"
            and not self.data_config.has_validation
        ):
            raise ValueError(
                "lr_scheduler_type 'reduce_lr_on_plateau' needs a validation split; set "
                "data_config.data_split_config.validation above 0, name a "
                "data_config.validation_data_path, or choose another scheduler"
            )
        return self

    @model_validator(mode="after")
    def _qlora_shards_with_ddp_only(self) -> FinetuneRequest:
        if (self.pretrainedmodel_config.use_quantization
                and self.training_config.strategy == "fsdp"):
            raise ValueError(
                "training_config.strategy 'fsdp' with pretrainedmodel_config.use_quantization "
                "is not supported: sharding 4-bit weights needs a CUDA build of bitsandbytes "
                "and a storage dtype Tunery does not set up; use strategy 'ddp' (each device "
                "holds the 4-bit model) or use_quantization false"
            )
        return self

    @model_validator(mode="after")
    def _full_finetune_supervised_on_one_device(self) -> FinetuneRequest:
        if self.pretrainedmodel_config.use_lora:
            return self
        training = self.training_config
        if training.preference_optimization != "DONT":
            raise ValueError(
                "pretrainedmodel_config.use_lora false with training_config."
                f"preference_optimization {training.preference_optimization!r} is not "
                "supported: the preference recipes take their reference from the base with the "
                "LoRA adapter switched off, which a full fine-tune would need a second copy of "
                "the model for; use use_lora true, or preference_optimization 'DONT'"
            )
        if training.strategy == "fsdp":
            raise ValueError(
                "pretrainedmodel_config.use_lora false with training_config.strategy 'fsdp' is "
                "not supported: Tunery gathers and exports sharded LoRA adapters only; use "
                "strategy 'ddp' or use_lora true"
            )
        return self

    @model_validator(mode="after")
    def _packing_with_supervised_batches(self) -> FinetuneRequest:
        if not self.data_config.packing:
            return self
        if self.training_config.group_by_length:
            raise ValueError(
                "data_config.packing true with training_config.group_by_length true: packed "
                "batches have no padding for length grouping to save; leave one of them out"
            )
        if self.training_config.preference_optimization != "DONT":
            raise ValueError(
                "data_config.packing true with training_config.preference_optimization "
                f"{self.training_config.preference_optimization!r} is not supported: preference "
                "pairs are batched by their trainer; leave packing out"
            )
        return self

    @model_validator(mode="after")
    def _dpo_reference_needs_the_original_base(self) -> FinetuneRequest:
        init = self.pretrainedmodel_config.lora_init
        if (init in BASE_REWRITING_INITS
                and self.training_config.preference_optimization == "DPO"):
            raise ValueError(
                f"pretrainedmodel_config.lora_init {init!r} with "
                "training_config.preference_optimization 'DPO' is not supported: DPO's "
                "reference is the base with the adapter disabled, which PiSSA/OLoRA leave "
                "without the part they moved into the adapter; use lora_init 'default' or "
                "'gaussian', or ORPO (no reference model)"
            )
        return self

    def redacted(self) -> dict:
        """The payload as echoed back: secrets replaced by a marker."""
        return drop_secrets(self.model_dump(mode="json"))
