"""`run_job`: one fine-tuning job, from request to adapter files, as a sequence of stages."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from shared.dataset_columns import is_preference, missing_job_columns_message
from shared.dataset_files import LoadedDataset
from shared.schema import DataConfig, FinetuneRequest, TemplateError
from shared.settings import Settings
from shared.sources import DATASET_ID
from shared.storage import Storage
from shared.storage_retry import retrying_storage
from shared.training_plan import job_seed
from shared.url_guard import UrlPolicy
from worker.memory_ladder import Rung
from worker.pipeline.base_cache import BaseModelCache
from worker.pipeline.checkpoints import (
    CheckpointStore,
    download_starting_point,
    restore_starting_point,
)
from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.examples import (
    evaluated_sample,
    preference_rows,
    render_and_tokenize,
    shuffled_validation,
    split,
)
from worker.pipeline.export import export_adapter
from worker.pipeline.full_finetune import prepare_full_finetune
from worker.pipeline.interrupts import InterruptibleRegion
from worker.pipeline.model import (
    add_lora,
    base_weights_dir,
    compute_dtype,
    enable_gradient_checkpointing,
    load_tokenizer,
)
from worker.pipeline.model_export import export_full_model
from worker.pipeline.preference import train_preference
from worker.pipeline.ranks import adapter_state, in_process_group, is_main_process
from worker.pipeline.report import JobReporter, LogFn
from worker.pipeline.sample_answers import sample_answers_callback, write_report
from worker.pipeline.token_cache import TokenCache, fingerprint
from worker.pipeline.train import train
from worker.pipeline.trainer import TrainStats
from worker.pipeline.wandb_reporting import WandbTimeouts

# How much of the prompt template the log shows.
TEMPLATE_SHOWN_CHARS = 200


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    train_rows: int
    eval_rows: int
    best_eval_loss: float | None = None
    best_step: int | None = None
    trained_tokens: int | None = None


def run_job(
    request: FinetuneRequest,
    work_dir: Path,
    reporter: JobReporter,
    settings: Settings,
    checkpoints: CheckpointStore | None = None,
    base_models: BaseModelCache | None = None,
    hub_cache_dir: Path | None = None,
    memory_rung: Rung | None = None,
    trainer_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter as `request` says, or with `use_lora` false the whole model
    (`full_finetune`); the result lies in `work_dir / "output"`.

    With `checkpoints`, training resumes from the job's latest checkpoint in storage (an
    earlier attempt's) and writes new ones as it goes. With `base_models`, the base model
    comes from (and goes back to) that cache; without, it is loaded and dropped. Hub
    downloads go to `hub_cache_dir` (None: the shared Hugging Face cache; see `job_dirs`).
    `memory_rung` is how the micro-batches are trained after running out of memory
    (`worker.memory_ladder`); None: as the request asks.

    In a process group (`ranks`), each rank calls this with a `work_dir` of its own and the
    group's shared `trainer_dir` (where the Trainer writes its checkpoints, every rank its
    part); only rank 0 writes the adapter, and the others' `output_dir` is empty.

    Raises `PipelineError` for problems the user can fix and `TrainingStopped` when
    `reporter.should_stop()` asked for it. The output leaves the worker in
    `worker.publish` ("uploading" phase), the hub push included.

    Settings come in as `settings` only; the stages get what they need from it as arguments.
    """
    base, hf = request.pretrainedmodel_config, request.hf_config
    allowed = settings.sources.allowed_local_dirs
    work_dir.mkdir(parents=True, exist_ok=True)
    log = reporter.log

    # Downloads, parsing, tokenizing and loading the model never ask whether to stop: a
    # cancel, lost lease or timeout interrupts them (worker.pipeline.interrupts). The region
    # ends before training, which stops between steps, and before any upload.
    reporter.phase("loading_data")
    region = InterruptibleRegion(reporter.should_stop)
    with region:
        prepared = prepare_data(request, work_dir, reporter, settings,
                                hub_cache_dir=hub_cache_dir)
        train_set, eval_set, tokenizer = prepared.train_set, prepared.eval_set, prepared.tokenizer
        _stop_if_asked(reporter)

        reporter.phase("loading_model")
        if base_models is None:
            base_models = BaseModelCache(enabled=False)
        with base_models.use(
            base.model_path, base, allowed_local_dirs=allowed, token=hf.hf_token,
            cache_dir=hub_cache_dir, cpu_bf16=settings.training.cpu_bf16, log=log,
        ) as base_model:
            start = download_starting_point(base, checkpoints, work_dir, log=log)
            if base.use_lora:
                weights_dir = (base_weights_dir(base.model_path, allowed_local_dirs=allowed,
                                                token=hf.hf_token, cache_dir=hub_cache_dir)
                               if base.lora_init == "loftq" and start.checkpoint is None
                               else None)
                model = add_lora(base_model, base,
                                 seed=job_seed(request.training_config.seed),
                                 resumed=start.checkpoint is not None,
                                 initial_adapter=start.initial_adapter,
                                 base_weights_dir=weights_dir, log=log)
            else:
                model = prepare_full_finetune(
                    base_model, base, compute=compute_dtype(settings.training.cpu_bf16),
                    reporter=reporter)
            resume_from = restore_starting_point(model, base, start)
            # Inside the block: the exit (the base model given back to the cache) must not be
            # interrupted.
            region.end()
            _stop_if_asked(reporter)
            if memory_rung is not None and memory_rung.gradient_checkpointing:
                enable_gradient_checkpointing(model)

            # Supervised LoRA jobs only: ORPO and DPO train on preference rows, not labelled
            # examples, and a resumed full fine-tune has no base model left to answer.
            samples = None
            if base.use_lora and not is_preference(request.training_config.preference_optimization):
                samples = sample_answers_callback(
                    reporter, tokenizer, eval_set, count=request.training_config.sample_prompts,
                    cutoff_len=request.data_config.cutoff_len, distributed=in_process_group())
            reporter.phase("training")
            stats = prepared.fit(
                model,
                tokenizer,
                train_set,
                eval_set,
                request.training_config,
                output_dir=trainer_dir or work_dir / "trainer",
                reporter=reporter,
                checkpoints=checkpoints,
                resume_from=resume_from,
                memory_rung=memory_rung,
                logging=request.logging_config,
                memory_limit_bytes=_gib(settings.training.training_memory_gb),
                wandb_timeouts=WandbTimeouts(
                    start_s=settings.training.wandb_init_timeout_s,
                    finish_s=settings.training.wandb_finish_timeout_s,
                ),
                collective_timeout_s=settings.training.process_group_timeout_s,
                **({"extra_callbacks": [samples]} if samples else {}),
            )
            output_dir = work_dir / "output"
            # Every rank: under FSDP, gathering the adapter's shards takes all of them.
            state = adapter_state(model) if in_process_group() else None
            if is_main_process() and not base.use_lora:
                if stats.best_step is not None and stats.best_step != stats.steps:
                    log(f"full fine-tuning exports the last step's weights; the best eval_loss "
                        f"{stats.best_eval_loss:.4f} was at step {stats.best_step}")
                export_full_model(model, tokenizer, output_dir,
                                  base_model=base.model_path.strip(), log=log)
            elif is_main_process():
                export_adapter(model, tokenizer, output_dir, state_dict=state,
                               base_model=base.model_path.strip(), log=log,
                               work_dir=work_dir)
                if samples is not None:
                    write_report(output_dir, samples, steps=stats.steps,
                                 best_step=stats.best_step, best_eval_loss=stats.best_eval_loss,
                                 log=log)
    return TrainResult(
        output_dir=output_dir,
        steps=stats.steps,
        first_loss=stats.first_loss,
        last_loss=stats.last_loss,
        train_rows=len(train_set),
        eval_rows=len(eval_set),
        best_eval_loss=stats.best_eval_loss,
        best_step=stats.best_step,
        trained_tokens=stats.trained_tokens,
    )


@dataclass(frozen=True)
class PreparedData:
    """What the "loading_data" stage hands to training."""

    train_set: Sequence[Any]
    eval_set: Sequence[Any]
    """The examples every evaluation reads; empty when the job does not evaluate."""
    fit: Callable[..., TrainStats]
    """The recipe that trains on them: supervised, or ORPO / DPO."""
    tokenizer: Any


@dataclass(frozen=True)
class _Rows:
    """One dataset the job reads: `data_path` for training, or `validation_data_path`."""

    path: str
    role: Literal["data_path", "validation_data_path"]
    """The field that names it: its log lines and errors say which dataset they are about."""
    work_dir: Path
    """Where its download and its tokens go, apart from the other dataset's."""
    log: LogFn
    announce_template: Callable[[], None] = lambda: None
    """Says which prompt template renders the rows, once they are read and before they are
    rendered or read from the cache: data_path's only, since both use the same template."""


def prepare_data(
    request: FinetuneRequest, work_dir: Path, reporter: JobReporter, settings: Settings,
    *, hub_cache_dir: Path | None = None,
) -> PreparedData:
    """The "loading_data" stage: the train and eval sets, the recipe that trains on them, and
    the tokenizer.

    The eval set is a seeded split of data_path, or with `validation_data_path` every row of
    that dataset, read, rendered and tokenized exactly as data_path's are; either way
    `evaluated_sample` decides how many of them each evaluation reads."""
    data, base, hf = request.data_config, request.pretrainedmodel_config, request.hf_config
    log = reporter.log
    tokenizer = load_tokenizer(
        base.model_path, allowed_local_dirs=settings.sources.allowed_local_dirs,
        token=hf.hf_token, cache_dir=hub_cache_dir, log=log,
    )
    preference = request.training_config.preference_optimization
    seed = job_seed(request.training_config.seed)
    fit: Callable[..., TrainStats] = (partial(train_preference, max_length=data.cutoff_len)
                                      if is_preference(preference)
                                      else partial(train, packing=data.packing))
    read = partial(_examples, request=request, tokenizer=tokenizer, settings=settings,
                   hub_cache_dir=hub_cache_dir)
    examples = read(_Rows(data.data_path, "data_path", work_dir, log, announce_template=(
        (lambda: None) if is_preference(preference)
        else partial(_report_prompt_template, data, reporter))))
    if data.validation_data_path is None:
        train_set, eval_set = split(examples, data.data_split_config, seed=seed, log=log)
    else:
        source = f"validation_data_path {data.validation_data_path}"
        train_set, _ = split(examples, data.data_split_config, seed=seed, log=log,
                             validation_from=source)

        def log_validation(line: str) -> None:
            log(f"validation_data_path: {line}")

        held_out = read(_Rows(data.validation_data_path, "validation_data_path",
                              work_dir / "validation", log_validation))
        eval_set = shuffled_validation(held_out, seed=seed, source=source, log=log)
    eval_set = evaluated_sample(eval_set, train_examples=len(train_set),
                                config=request.training_config,
                                compute_share=settings.training.eval_compute_share,
                                cap=settings.training.eval_max_examples, log=log)
    return PreparedData(train_set, eval_set, fit, tokenizer)


def _examples(rows: _Rows, *, request: FinetuneRequest, tokenizer: Any, settings: Settings,
              hub_cache_dir: Path | None) -> Sequence[Any]:
    """The examples of one dataset: preference rows for ORPO and DPO (TRL tokenizes them),
    tokenized examples for the rest, which an uploaded dataset may have kept from an earlier
    attempt or job. Errors name `rows.role` unless they are data_path's."""
    try:
        return _read_examples(rows, request=request, tokenizer=tokenizer, settings=settings,
                              hub_cache_dir=hub_cache_dir)
    except PipelineError as exc:
        if rows.role == "data_path":
            raise
        raise PipelineError(f"{rows.role}: {exc.message}") from None


def _read_examples(rows: _Rows, *, request: FinetuneRequest, tokenizer: Any,
                   settings: Settings, hub_cache_dir: Path | None) -> Sequence[Any]:
    data, log = request.data_config, rows.log
    preference = request.training_config.preference_optimization
    storage = retrying_storage(settings, log)
    tokens_dir = rows.work_dir / "tokens"
    # Each uploaded dataset keeps its own tokens: the cache is keyed by the dataset's id.
    cache = None if is_preference(preference) else _token_cache(rows.path, data, storage,
                                                                tokenizer)
    cached = cache.load(tokens_dir, log=log) if cache else None
    if cached is not None:
        rows.announce_template()
        cached.report(log)
        return cached.store
    dataset = load_dataset(
        rows.path,
        allowed_local_dirs=settings.sources.allowed_local_dirs,
        download_dir=rows.work_dir / "data",
        # data_subset and data_source_type say how data_path is read; a validation
        # dataset is always an uploaded one, which neither applies to.
        subset=data.data_subset if rows.role == "data_path" else None,
        source_type=data.data_source_type if rows.role == "data_path" else "hub_link",
        token=request.hf_config.hf_token,
        storage=storage,
        max_rows=settings.limits.max_dataset_rows,
        url_policy=UrlPolicy.from_settings(settings.sources),
        hub_cache_dir=hub_cache_dir,
        log=log,
    )
    _check_columns(dataset, data, preference)
    if is_preference(preference):
        return preference_rows(dataset, tokenizer, method=preference,
                               cutoff_len=data.cutoff_len, log=log)
    rows.announce_template()
    lines: list[str] = []

    def log_and_keep(line: str) -> None:
        lines.append(line)
        log(line)

    store = render_and_tokenize(dataset, tokenizer, data, directory=tokens_dir,
                                log=log_and_keep)
    if cache is not None:
        cache.save(tokens_dir, store, lines, log=log)
    return store


def _token_cache(path: str, data: DataConfig, storage: Storage,
                 tokenizer: Any) -> TokenCache | None:
    """Where an uploaded dataset's tokenized examples are kept; None for any other source
    (a URL's content may change between attempts, a local file's too)."""
    dataset_id = path.strip()
    if not DATASET_ID.fullmatch(dataset_id):
        return None
    return TokenCache(storage, dataset_id, fingerprint(tokenizer, data))


def _check_columns(dataset: LoadedDataset, data: DataConfig,
                   preference: str | None) -> None:
    try:
        missing = missing_job_columns_message(
            dataset.columns, prompt_template=data.prompt_template,
            preference_optimization=preference,
        )
    except TemplateError as exc:
        raise PipelineError(f"prompt_template: {exc}") from None
    if missing:
        raise PipelineError(f"preference_optimization: {missing}" if is_preference(preference)
                            else missing)


def _report_prompt_template(data: DataConfig, reporter: JobReporter) -> None:
    """Say which prompt template the examples are rendered with; the schema's default, which
    the request gets by leaving the field out, with a job warning: it names an alpaca dataset
    and rarely fits the user's."""
    template = data.prompt_template
    shown = json.dumps(template[:TEMPLATE_SHOWN_CHARS], ensure_ascii=False)
    if len(template) > TEMPLATE_SHOWN_CHARS:
        shown += "…"
    if "prompt_template" in data.model_fields_set:
        reporter.log(f"prompt_template: {shown}")
    else:
        reporter.warn(f"prompt_template: the default template (left out of the request): {shown}")


def _gib(gigabytes: float | None) -> float | None:
    return None if gigabytes is None else gigabytes * 2**30


def _stop_if_asked(reporter: JobReporter) -> None:
    reason = reporter.should_stop()
    if reason:
        raise TrainingStopped(reason)
