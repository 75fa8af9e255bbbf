"""`run_job`: one fine-tuning job, from request to adapter files, as a sequence of stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.schema import FinetuneRequest
from shared.settings import Settings
from worker.pipeline.data import load_dataset, render_examples, split, tokenize
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.export import export_adapter
from worker.pipeline.model import load_model, load_tokenizer
from worker.pipeline.report import JobReporter
from worker.pipeline.train import train


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    train_rows: int
    eval_rows: int


def run_job(
    request: FinetuneRequest, work_dir: Path, reporter: JobReporter, settings: Settings
) -> TrainResult:
    """Train a LoRA adapter as `request` says; the result lies in `work_dir / "output"`.

    Raises `PipelineError` for problems the user can fix and `TrainingStopped` when
    `reporter.should_stop()` asked for it. The caller uploads the output ("uploading" phase).
    """
    data, base, hf = request.data_config, request.pretrainedmodel_config, request.hf_config
    allowed = settings.allowed_local_dirs
    work_dir.mkdir(parents=True, exist_ok=True)
    log = reporter.log

    reporter.phase("loading_data")
    dataset = load_dataset(
        data.data_path,
        allowed_local_dirs=allowed,
        download_dir=work_dir / "data",
        subset=data.data_subset,
        source_type=data.data_source_type,
        token=hf.hf_token,
        log=log,
    )
    tokenizer = load_tokenizer(
        base.model_path, allowed_local_dirs=allowed, token=hf.hf_token, log=log
    )
    examples = render_examples(dataset, data.prompt_template, log=log)
    tokenized = tokenize(examples, tokenizer, data.cutoff_len, log=log)
    train_set, eval_set = split(tokenized, data.data_split_config, log=log)
    _stop_if_asked(reporter)

    reporter.phase("loading_model")
    model = load_model(
        base.model_path, base, allowed_local_dirs=allowed, token=hf.hf_token, log=log
    )
    _stop_if_asked(reporter)

    reporter.phase("training")
    stats = train(
        model,
        tokenizer,
        train_set,
        eval_set,
        request.training_config,
        output_dir=work_dir / "trainer",
        reporter=reporter,
    )
    output_dir = export_adapter(model, tokenizer, work_dir / "output", log=log)
    return TrainResult(
        output_dir=output_dir,
        steps=stats.steps,
        first_loss=stats.first_loss,
        last_loss=stats.last_loss,
        train_rows=len(train_set),
        eval_rows=len(eval_set),
    )


def _stop_if_asked(reporter: JobReporter) -> None:
    reason = reporter.should_stop()
    if reason:
        raise TrainingStopped(reason)
