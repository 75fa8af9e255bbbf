"""An OpenAI job-creation body as Tunery's training payload, and the rules that resolve its
"auto" hyperparameters.

The OpenAI dialect creates ordinary Tunery jobs: the body becomes the MonsterAPI-shaped
payload (`shared.schema.FinetuneRequest`) that the worker already trains, and what that payload
has no place for (suffix, metadata, file ids, the method as asked) is kept beside it
(`Job.openai`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from api.openai.schemas import DpoHyperparameters, JobCreate, SupervisedHyperparameters
from shared.schema import MAX_EARLY_STOPPING_PATIENCE
from shared.training_plan import BATCH_SIZE, DEFAULT_BETA

BASE_LEARNING_RATE = 2e-4
"""What `learning_rate_multiplier` multiplies: a common LoRA learning rate for models of
0.1B to 70B parameters."""
DEFAULT_EPOCHS = 3
# OpenAI's documented "auto" epochs: 3, raised until the run sees at least MIN_TARGET_EXAMPLES
# examples, lowered so that it sees at most MAX_TARGET_EXAMPLES, within [1, MAX_AUTO_EPOCHS].
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25
# "auto" batch size: one example per step for every EXAMPLES_PER_BATCH_ITEM, within [1, 32].
EXAMPLES_PER_BATCH_ITEM = 100
MAX_AUTO_BATCH = 32
CHAT_TEMPLATE = "{messages}"
PROMPT_COMPLETION_TEMPLATE = "{prompt}{completion}"

# Where each payload field the preflight may refuse comes from in OpenAI's body.
OPENAI_PARAMS = {
    "pretrainedmodel_config.model_path": "model",
    "data_config.data_path": "training_file",
    "data_config.validation_data_path": "validation_file",
    "training_config.num_train_epochs": "hyperparameters.n_epochs",
    "training_config.learning_rate": "hyperparameters.learning_rate_multiplier",
    "training_config.gradient_accumulation_steps": "hyperparameters.batch_size",
    "training_config.micro_batch_size": "hyperparameters.batch_size",
    "training_config.beta": "method.dpo.hyperparameters.beta",
    "training_config.seed": "seed",
    "logging_config.wandb_project": "integrations",
}


@dataclass(frozen=True)
class Resolved:
    """The hyperparameters a job trains with, "auto" replaced by numbers."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = None

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        if self.beta is None:
            del values["beta"]
        return values


def method_of(body: JobCreate) -> tuple[str, SupervisedHyperparameters]:
    """The method's type and hyperparameters as asked, from `method` or from the deprecated
    top-level `hyperparameters` (a supervised job)."""
    method = body.method
    if method is None or method.type == "supervised":
        supervised = method.supervised if method else None
        asked = (supervised.hyperparameters if supervised and supervised.hyperparameters
                 else body.hyperparameters)
        return "supervised", asked or SupervisedHyperparameters()
    if method.type == "dpo":
        dpo = method.dpo.hyperparameters if method.dpo else None
        return "dpo", dpo or DpoHyperparameters()
    return method.type, SupervisedHyperparameters()


def resolve(asked: SupervisedHyperparameters, n_examples: int) -> Resolved:
    n = max(1, n_examples)
    epochs = asked.n_epochs
    if epochs == "auto":
        epochs = DEFAULT_EPOCHS
        if n * epochs < MIN_TARGET_EXAMPLES:
            epochs = min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n))
        elif n * epochs > MAX_TARGET_EXAMPLES:
            epochs = max(1, MAX_TARGET_EXAMPLES // n)
    batch = asked.batch_size
    if batch == "auto":
        batch = min(MAX_AUTO_BATCH, max(1, n // EXAMPLES_PER_BATCH_ITEM))
    multiplier = asked.learning_rate_multiplier
    if multiplier == "auto":
        multiplier = 1.0
    beta = None
    if isinstance(asked, DpoHyperparameters):
        beta = DEFAULT_BETA if asked.beta == "auto" else asked.beta
    return Resolved(int(epochs), int(batch), float(multiplier), beta)


def micro_batches(batch_size: int) -> tuple[int, int]:
    """(examples per micro-batch, micro-batches per step) for `batch_size` examples per
    optimizer step: the largest micro-batch up to the worker's usual one that divides it, so
    that a step is exactly `batch_size` examples."""
    micro = max(d for d in range(1, min(BATCH_SIZE, batch_size) + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def new_seed() -> int:
    return secrets.randbelow(2**31)


def training_payload(body: JobCreate, *, dataset_id: str, kind: str | None, method: str,
                     resolved: Resolved, seed: int, cutoff_len: int, wandb_key: str,
                     validation_dataset_id: str | None = None) -> dict[str, Any]:
    """The MonsterAPI-shaped payload that trains what `body` asks on the uploaded dataset
    `dataset_id`, whose lines are of `kind` (`shared.openai_training_file`), evaluated on
    `validation_dataset_id` (lines of the same kind) when given."""
    micro, accumulation = micro_batches(resolved.batch_size)
    training: dict[str, Any] = {
        "num_train_epochs": resolved.n_epochs,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": BASE_LEARNING_RATE * resolved.learning_rate_multiplier,
        # OpenAI's schedule decays linearly and shows no warm-up.
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "seed": seed,
    }
    if method == "dpo":
        training.update(preference_optimization="DPO", beta=resolved.beta)
    data: dict[str, Any] = {
        "data_path": dataset_id,
        "cutoff_len": cutoff_len,
        # OpenAI trains on every line; a validation file is evaluated apart.
        "data_split_config": {"train": 1.0, "validation": 0.0},
    }
    if validation_dataset_id is not None:
        data["validation_data_path"] = validation_dataset_id
        # OpenAI reports the validation loss but never stops a job early on it.
        training["early_stopping_patience"] = MAX_EARLY_STOPPING_PATIENCE
    if method != "dpo":
        data["prompt_template"] = (PROMPT_COMPLETION_TEMPLATE if kind == "prompt_completion"
                                   else CHAT_TEMPLATE)
    logging: dict[str, Any] = {}
    for integration in body.integrations or []:
        wandb = integration.wandb
        logging = {"use_wandb": True, "wandb_project": wandb.project,
                   "wandb_username": wandb.entity or "", "wandb_run_name": wandb.name or "",
                   "wandb_login_key": wandb_key}
    return {
        "pretrainedmodel_config": {"model_path": body.model},
        "data_config": data,
        "training_config": training,
        "logging_config": logging,
    }


def openai_param(path: str) -> str:
    """The OpenAI body field a payload field (a preflight problem's path) comes from."""
    for payload_path, param in OPENAI_PARAMS.items():
        if path == payload_path or path.startswith(payload_path + "."):
            return param
    return path
