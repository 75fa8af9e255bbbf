"""How many optimizer steps a job runs and how much of it warms up.

One rule for both sides: the API's preflight estimates the steps from the dataset's row count
before anything is queued, and the worker applies the same warm-up rule to the steps its
trainer really runs (examples dropped by `cutoff_len` or the validation split included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Examples per micro-batch of a job that names none (`training_config.micro_batch_size`).
BATCH_SIZE = 4
# The seed of a job that names none (`training_config.seed`).
DEFAULT_SEED = 42
# How strongly a preference job (DPO, ORPO) keeps to its reference when it names no
# `training_config.beta`: TRL's default for either method, and the papers'.
DEFAULT_BETA = 0.1
# Warm-up that reaches this share of the run is cut down: the run would otherwise spend most
# of its steps, or all of them, below the learning rate asked for (a 50-step warm-up on an
# 11-step run never gets past a fifth of it).
WARMUP_CAP_FROM_SHARE = 0.5
# What a cut warm-up becomes, rounded down: a tenth of the run, as is common practice.
WARMUP_CAPPED_SHARE = 0.1
# Warm-up from this share of the run (and below the cap) is kept, with a warning.
WARMUP_WARN_FROM_SHARE = 0.25
# transformers' schedulers without a warm-up: they ignore warmup_steps, so no rule applies.
SCHEDULERS_WITHOUT_WARMUP = frozenset({"constant", "reduce_lr_on_plateau"})
# Fewer training examples than this rarely teach a model anything it keeps.
FEW_EXAMPLES = 16
# A run evaluates before its first step (the baseline) and after every tenth of its steps:
# enough for early stopping and reduce_lr_on_plateau to act, few enough to stay cheap.
EVAL_EVERY_FRACTION = 0.1
EVALUATIONS = 1 + round(1 / EVAL_EVERY_FRACTION)
# All evaluations of a run together cost about this share of its training compute, unless
# the operator (`training.eval_compute_share`) or the job (`max_eval_examples`) says otherwise.
EVAL_COMPUTE_SHARE = 0.05
# Evaluating one example is a forward pass: about a third of training on it (forward and
# backward).
EVAL_COST_PER_TRAIN_EXAMPLE = 1 / 3
# Fewer evaluated examples than this make eval_loss too noisy to pick the best step by; a
# smaller validation split is evaluated whole.
MIN_EVAL_EXAMPLES = 32
# More than this in one evaluation, unless the operator (`training.eval_max_examples`) or
# the job says otherwise: the baseline evaluation comes before the first step, and a share of
# a large run's compute would keep that step waiting for minutes.
EVAL_MAX_EXAMPLES = 256


def job_seed(seed: int | None) -> int:
    """The seed a job trains with: `training_config.seed`, or `DEFAULT_SEED` when it names
    none. It seeds the LoRA initialization, dropout, the train/validation split and the batch
    order alike."""
    return DEFAULT_SEED if seed is None else seed


def micro_batch_size(asked: int | None) -> int:
    """Examples per micro-batch: `training_config.micro_batch_size`, or `BATCH_SIZE` when the
    job names none. The API's step estimate and the worker's batches both read it here."""
    return BATCH_SIZE if asked is None else asked


def split_sizes(examples: int, split_config: Mapping[str, float]) -> tuple[int, int]:
    """(train, validation): how many of `examples` the worker's split puts in each, by
    `data_config.data_split_config`. Validation gets at least one example when asked for and
    there are two or more; train at least one of those left, so only an empty dataset trains
    on none."""
    train_fraction = split_config.get("train", 0.9)
    val_fraction = split_config.get("validation", 0.0)
    n_val = (min(examples - 1, max(1, round(examples * val_fraction)))
             if val_fraction > 0 and examples > 1 else 0)
    n_train = min(examples - n_val, max(1, round(examples * train_fraction)))
    return n_train, n_val


def optimizer_steps(
    train_examples: int, *, epochs: float, gradient_accumulation_steps: int,
    batch_size: int = BATCH_SIZE, devices: int = 1,
) -> int:
    """The optimizer steps of a run over `train_examples` examples, counted as transformers'
    Trainer counts them: the last, partial accumulation of an epoch is a step too. With
    `devices` processes, each step's micro-batches are spread over them (`batch_size` is per
    device), and the last round of batches is a round too, as accelerate fills it."""
    if train_examples <= 0:
        return 0
    batches = math.ceil(math.ceil(train_examples / batch_size) / devices)
    per_epoch = math.ceil(batches / gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * epochs))


@dataclass(frozen=True)
class WarmupPlan:
    """The warm-up the run uses and, when it differs from what was asked or takes a large
    share of the run, a sentence that says so."""

    steps: int
    warning: str | None = None

    @property
    def capped(self) -> bool:
        return self.warning is not None and self.warning.startswith(CAPPED_PREFIX)


CAPPED_PREFIX = "warm-up capped"


def warmup_plan(asked: int, total_steps: int) -> WarmupPlan:
    """The warm-up of a run of `total_steps` optimizer steps when `asked` were requested."""
    if total_steps <= 0 or asked <= 0:
        return WarmupPlan(max(asked, 0))
    share = asked / total_steps
    if share >= WARMUP_CAP_FROM_SHARE:
        steps = math.floor(total_steps * WARMUP_CAPPED_SHARE)
        cut_to = (f"{WARMUP_CAPPED_SHARE:.0%} of them, rounded down: none for a run this short, "
                  "which trains at learning_rate from its first step" if steps == 0 else
                  f"{WARMUP_CAPPED_SHARE:.0%} of them")
        return WarmupPlan(steps, (
            f"{CAPPED_PREFIX} from {asked} to {steps} steps: training_config.warmup_steps "
            f"{asked} is {_share_words(share)} the run's {total_steps} optimizer steps, so the "
            f"learning rate would stay below learning_rate for most or all of it; a warm-up "
            f"from {WARMUP_CAP_FROM_SHARE:.0%} of the steps is cut to {cut_to}"
        ))
    if share >= WARMUP_WARN_FROM_SHARE:
        return WarmupPlan(asked, (
            f"training_config.warmup_steps {asked} is {share:.0%} of the run's {total_steps} "
            f"optimizer steps: the learning rate reaches learning_rate only after that"
        ))
    return WarmupPlan(asked)


def _share_words(share: float) -> str:
    return "longer than" if share > 1 else ("as long as" if share == 1 else
                                           f"{share:.0%} of")


def evaluation_examples(
    validation_examples: int, train_examples: int, *, epochs: float,
    compute_share: float = EVAL_COMPUTE_SHARE, max_examples: int | None = None,
    cap: int = EVAL_MAX_EXAMPLES,
) -> int:
    """How many of the validation split's examples each evaluation reads: `max_examples` when
    the job names it, else as many as keep all `EVALUATIONS` within `compute_share` of the
    training compute, at least `MIN_EVAL_EXAMPLES` and at most `cap`, never more than the
    split holds."""
    if validation_examples <= 0:
        return 0
    if max_examples is not None:
        return min(validation_examples, max_examples)
    return min(validation_examples, cap,
               max(MIN_EVAL_EXAMPLES, shared_examples(train_examples, epochs, compute_share)))


def shared_examples(train_examples: int, epochs: float, compute_share: float) -> int:
    """The evaluated examples that keep all `EVALUATIONS` within `compute_share` of the
    training compute."""
    return math.floor(compute_share * train_examples * epochs / (
        EVALUATIONS * EVAL_COST_PER_TRAIN_EXAMPLE))
