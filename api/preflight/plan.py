"""What a job would train: its template, its optimizer steps and warm-up, and the defaults it
leans on. The steps come from `shared.training_plan`, the rule the worker applies."""

from __future__ import annotations

from api.preflight.body import Problem
from api.schemas import PreflightSteps, PreflightTemplate
from shared.dataset_columns import (
    PREFERENCE_COLUMNS,
    is_chat_template,
    is_preference,
    preference_format,
)
from shared.schema import DataConfig, TrainingConfig, template_placeholders
from shared.training_plan import (
    FEW_EXAMPLES,
    SCHEDULERS_WITHOUT_WARMUP,
    micro_batch_size,
    optimizer_steps,
    warmup_plan,
)

DATA_FIELD = "data_config.data_path"


def template_plan(data: DataConfig, training: TrainingConfig,
                  dataset_columns: list[str] | None = None) -> PreflightTemplate:
    """How rows become examples; a preference job reads the preference format of
    `dataset_columns` (the plain one when they are unknown)."""
    is_default = "prompt_template" not in data.model_fields_set
    method = training.preference_optimization
    if is_preference(method):
        columns = preference_format(dataset_columns or []) or PREFERENCE_COLUMNS
        return PreflightTemplate(mode="orpo" if method == "ORPO" else "dpo",
                                 prompt_template=data.prompt_template,
                                 is_default=is_default, columns=list(columns))
    return PreflightTemplate(
        mode="chat" if is_chat_template(data.prompt_template) else "template",
        prompt_template=data.prompt_template, is_default=is_default,
        columns=list(dict.fromkeys(template_placeholders(data.prompt_template))),
    )


def default_warnings(data: DataConfig) -> list[str]:
    """The defaults a payload relies on without saying so, where they decide what is learnt
    and the worker does not say so again."""
    if "data_path" in data.model_fields_set:
        return []
    return [f"{DATA_FIELD} left out: training uses the default dataset {data.data_path}"]


def template_warning(data: DataConfig, training: TrainingConfig) -> str | None:
    """A left-out template; the worker says so again in the job's log and warnings."""
    if ("prompt_template" in data.model_fields_set
            or is_preference(training.preference_optimization)):
        return None
    return ("data_config.prompt_template left out: training uses the default template "
            f"{data.prompt_template!r}, written for tatsu-lab/alpaca's instruction and output "
            "columns; set one that names your dataset's columns")


def step_plan(train_rows: int | None, training: TrainingConfig
              ) -> tuple[PreflightSteps, list[Problem], list[str]]:
    """The optimizer steps and warm-up of a run over `train_rows` examples (None: unknown),
    a problem when it would train none, and a warning on few examples. A warning on the
    warm-up is `steps.warmup_warning`: the worker restates it from the steps it really runs."""
    batch_size = micro_batch_size(training.micro_batch_size)
    steps = PreflightSteps(
        train_examples=train_rows, batch_size=batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        num_train_epochs=training.num_train_epochs, optimizer_steps=None,
        warmup_steps_asked=training.warmup_steps, warmup_steps=None,
    )
    if train_rows is None:
        steps.note = "unknown until the worker reads the dataset"
        return steps, [], []
    total = optimizer_steps(train_rows, epochs=training.num_train_epochs,
                            gradient_accumulation_steps=training.gradient_accumulation_steps,
                            batch_size=batch_size, devices=training.devices)
    steps.optimizer_steps = total
    if total == 0:
        return steps, [{"path": DATA_FIELD, "message": (
            "the dataset leaves no example to train on after data_config.data_split_config: "
            "the job would train 0 optimizer steps")}], []
    warnings = []
    if training.lr_scheduler_type in SCHEDULERS_WITHOUT_WARMUP:
        steps.warmup_steps = 0
        steps.note = (f"lr_scheduler_type {training.lr_scheduler_type!r} has no warm-up: "
                      "warmup_steps is not used")
    else:
        warmup = warmup_plan(training.warmup_steps, total)
        steps.warmup_steps = warmup.steps
        steps.warmup_warning = warmup.warning
    if train_rows < FEW_EXAMPLES:
        warnings.append(
            f"{train_rows} training example{'s' if train_rows != 1 else ''}, fewer than "
            f"{FEW_EXAMPLES}: a model rarely keeps anything it learnt from so few"
        )
    return steps, [], warnings
