"""`run_job`: one fine-tuning job, from request to adapter files, as a sequence of stages."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from shared.dataset_columns import is_preference, missing_job_columns_message
from shared.dataset_files import LoadedDataset
from shared.schema import DataConfig, FinetuneRequest, TemplateError
from shared.settings import Settings
from shared.sources import DATASET_ID
from shared.storage import Storage, storage_from_settings
from shared.training_plan import job_seed
from shared.url_guard import UrlPolicy
from worker.pipeline.base_cache import BaseModelCache
from worker.pipeline.checkpoints import CheckpointStore, restore_starting_point
from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.examples import (
    evaluated_sample,
    preference_rows,
    render_and_tokenize,
    split,
)
from worker.pipeline.export import export_adapter
from worker.pipeline.interrupts import InterruptibleRegion
from worker.pipeline.model import add_lora, load_tokenizer
from worker.pipeline.preference import train_preference
from worker.pipeline.report import JobReporter, LogFn
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
) -> TrainResult:
    """Train a LoRA adapter as `request` says; the result lies in `work_dir / "output"`.

    With `checkpoints`, training resumes from the job's latest checkpoint in storage (an
    earlier attempt's) and writes new ones as it goes. With `base_models`, the base model
    comes from (and goes back to) that cache; without, it is loaded and dropped. Hub
    downloads go to `hub_cache_dir` (None: the shared Hugging Face cache; see `job_dirs`).

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
        train_set, eval_set, fit, tokenizer = _prepare_data(
            request, work_dir, reporter, settings, hub_cache_dir=hub_cache_dir, log=log
        )
        _stop_if_asked(reporter)

        reporter.phase("loading_model")
        if base_models is None:
            base_models = BaseModelCache(enabled=False)
        with base_models.use(
            base.model_path, base, allowed_local_dirs=allowed, token=hf.hf_token,
            cache_dir=hub_cache_dir, cpu_bf16=settings.training.cpu_bf16, log=log,
        ) as base_model:
            model = add_lora(base_model, base, seed=job_seed(request.training_config.seed),
                             log=log)
            resume_from = restore_starting_point(model, base, checkpoints, work_dir, log=log)
            # Inside the block: the exit (the base model given back to the cache) must not be
            # interrupted.
            region.end()
            _stop_if_asked(reporter)

            reporter.phase("training")
            stats = fit(
                model,
                tokenizer,
                train_set,
                eval_set,
                request.training_config,
                output_dir=work_dir / "trainer",
                reporter=reporter,
                checkpoints=checkpoints,
                resume_from=resume_from,
                logging=request.logging_config,
                memory_limit_bytes=_gib(settings.training.training_memory_gb),
                wandb_timeouts=WandbTimeouts(
                    start_s=settings.training.wandb_init_timeout_s,
                    finish_s=settings.training.wandb_finish_timeout_s,
                ),
            )
            output_dir = export_adapter(model, tokenizer, work_dir / "output",
                                        base_model=base.model_path.strip(), log=log)
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


def _prepare_data(
    request: FinetuneRequest, work_dir: Path, reporter: JobReporter, settings: Settings,
    *, hub_cache_dir: Path | None, log: LogFn,
) -> tuple[Sequence[Any], Sequence[Any], Callable[..., TrainStats], Any]:
    """The "loading_data" stage: train and eval sets, the function that trains on them, and
    the tokenizer."""
    data, base, hf = request.data_config, request.pretrainedmodel_config, request.hf_config
    allowed = settings.sources.allowed_local_dirs
    storage = storage_from_settings(settings)
    tokenizer = load_tokenizer(
        base.model_path, allowed_local_dirs=allowed, token=hf.hf_token, cache_dir=hub_cache_dir,
        log=log,
    )
    preference = request.training_config.preference_optimization
    tokens_dir = work_dir / "tokens"
    # ORPO and DPO train on preference rows (TRL tokenizes them), the rest on tokenized ones,
    # which an uploaded dataset may have kept from an earlier attempt or job.
    cache = None if is_preference(preference) else _token_cache(data, storage, tokenizer)
    cached = cache.load(tokens_dir, log=log) if cache else None
    examples: Sequence[Any]
    fit: Callable[..., TrainStats] = train
    if cached is not None:
        _report_prompt_template(data, reporter)
        cached.report(log)
        examples = cached.store
    else:
        dataset = load_dataset(
            data.data_path,
            allowed_local_dirs=allowed,
            download_dir=work_dir / "data",
            subset=data.data_subset,
            source_type=data.data_source_type,
            token=hf.hf_token,
            storage=storage,
            max_rows=settings.limits.max_dataset_rows,
            url_policy=UrlPolicy.from_settings(settings.sources),
            hub_cache_dir=hub_cache_dir,
            log=log,
        )
        _check_columns(dataset, data, preference)
        if is_preference(preference):
            examples = preference_rows(dataset, tokenizer, method=preference,
                                       cutoff_len=data.cutoff_len, log=log)
            fit = partial(train_preference, max_length=data.cutoff_len)
        else:
            _report_prompt_template(data, reporter)
            lines: list[str] = []

            def log_and_keep(line: str) -> None:
                lines.append(line)
                log(line)

            store = render_and_tokenize(dataset, tokenizer, data, directory=tokens_dir,
                                        log=log_and_keep)
            if cache is not None:
                cache.save(tokens_dir, store, lines, log=log)
            examples = store
    train_set, eval_set = split(examples, data.data_split_config,
                                seed=job_seed(request.training_config.seed), log=log)
    eval_set = evaluated_sample(eval_set, train_examples=len(train_set),
                                config=request.training_config,
                                compute_share=settings.training.eval_compute_share,
                                cap=settings.training.eval_max_examples, log=log)
    return train_set, eval_set, fit, tokenizer


def _token_cache(data: DataConfig, storage: Storage, tokenizer: Any) -> TokenCache | None:
    """Where an uploaded dataset's tokenized examples are kept; None for any other source
    (a URL's content may change between attempts, a local file's too)."""
    dataset_id = data.data_path.strip()
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
