"""Evaluation people can read: the model's greedy answers to a few fixed validation prompts at
every evaluation, and `report.json`, the base model's answers beside the kept adapter's with
the eval_loss before and after training and the best step.

The prompts are the first validation examples of the evaluated sample (the same seeded ones
every evaluation reads), each cut where its labels start: the unlabelled prefix the loss is
not on, exactly the tokens training saw, so the answer continues where the completion starts.
An example labelled from its first token on (`train_on_inputs`) has no such prefix and gives
no prompt. Generation is greedy, batched and cached, under `no_grad`, in eval mode, with the
random number generators' states put back after it: training runs as it would without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from shared.loss_mask import IGNORE_INDEX, TokenizedExample
from worker.pipeline.lora_init import initial_adapter
from worker.pipeline.report import JobReporter, LogFn

REPORT_FILE = "report.json"
# New tokens each answer may have: enough to read the answer's start and style, few enough
# that every evaluation's answers cost well under a second on a GPU.
MAX_NEW_TOKENS = 48
# How much of a prompt (its end, where the completion starts) and of an answer a log line shows.
SHOWN_PROMPT_CHARS = 160
SHOWN_ANSWER_CHARS = 400


@dataclass(frozen=True)
class SamplePrompt:
    """One validation example, cut where its completion starts."""

    prompt_ids: list[int]
    expected_ids: list[int]


def sample_prompts(examples: Sequence[TokenizedExample], count: int) -> list[SamplePrompt]:
    """The first `count` of `examples` that have an unlabelled prefix, each cut before its
    first labelled token; fewer where fewer have one (`train_on_inputs`: none)."""
    prompts: list[SamplePrompt] = []
    for example in examples:
        if len(prompts) >= count:
            break
        labels = list(example.labels)
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not first:  # labelled from the first token, or not at all
            continue
        ids = list(example.input_ids)
        expected = [token for token, label in zip(ids[first:], labels[first:], strict=True)
                    if label != IGNORE_INDEX]
        prompts.append(SamplePrompt(prompt_ids=ids[:first], expected_ids=expected))
    return prompts


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[SamplePrompt], *,
                   max_new_tokens: int, autocast: torch.dtype | None = None) -> list[str]:
    """Each prompt's greedy continuation, decoded without special tokens: one batched,
    left-padded `generate` with the KV cache, under `no_grad` in eval mode, under autocast
    to `autocast` as mixed-precision training runs (a bf16 base with fp32 LoRA weights needs
    it); the model's mode and the random number generators' states are as before
    afterwards."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    width = max(len(p.prompt_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt.prompt_ids)
        ids[row, width - n:] = torch.tensor(prompt.prompt_ids, dtype=torch.long)
        mask[row, width - n:] = 1
    was_training = model.training
    model.eval()
    try:
        mixed = (torch.autocast(device.type, dtype=autocast) if autocast is not None
                 else nullcontext())
        with _rng_untouched(device), torch.no_grad(), mixed:
            output = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                # The model's generation_config may ask for sampling; greedy means greedy.
                temperature=None, top_p=None, top_k=None,
            )
    finally:
        model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


@contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Greedy decoding draws no random number, but a model's generate may; its draws must
    not shift the dropout masks and batch order training goes on with."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class _Evaluation:
    step: int
    eval_loss: float | None
    answers: list[str]


@dataclass(frozen=True)
class EvalLosses:
    """The job's eval_loss before its first step and at its last evaluation, as (step, loss)."""

    before: tuple[int, float] | None = None
    after: tuple[int, float] | None = None


def eval_losses(log_history: Sequence[dict[str, Any]]) -> EvalLosses:
    """From the Trainer's log history, which a resumed run carries over from earlier attempts:
    the first evaluation (step 0, the baseline) and the last."""
    evals = [(int(entry["step"]), float(entry["eval_loss"]))
             for entry in log_history if "eval_loss" in entry]
    return EvalLosses(before=evals[0] if evals else None, after=evals[-1] if evals else None)


@dataclass
class SampleAnswersCallback(TrainerCallback):
    """Generates the answers to `prompts`: the base model's as training begins (the adapter
    switched off), the adapter's at every evaluation, logging each, and the kept adapter's
    as training ends; keeps them for the report, with the eval losses the run ends with.
    Without `prompts` (`why_none` says why) it keeps the losses only. The base answers need
    a peft model (`disable_adapter`). Goes after `TrainingWatch`'s callbacks.
    """

    reporter: JobReporter
    tokenizer: Any
    prompts: list[SamplePrompt]
    max_new_tokens: int = MAX_NEW_TOKENS
    why_none: str | None = None
    base_answers: list[str] = field(default_factory=list)
    evaluations: list[_Evaluation] = field(default_factory=list)
    losses: EvalLosses = field(default_factory=EvalLosses)
    final_answers: list[str] = field(default_factory=list)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: Any = None, **kwargs: Any) -> None:
        if model is None or not self.prompts:
            return
        self._log_prompts()
        if initial_adapter(model) is not None:
            # PiSSA / OLoRA: without the adapter the model is the residual base, not the
            # base; with the adapter as initialised it is the base, but only before a step.
            if state.global_step > 0:
                return
            self.base_answers = self._answers(model, args)
        else:
            without_adapter = getattr(model, "disable_adapter", None)
            with without_adapter() if without_adapter else nullcontext():
                self.base_answers = self._answers(model, args)
        self._log_answers("base model", self.base_answers)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if model is None or not self.prompts:
            return
        answers = self._answers(model, args)
        loss = (metrics or {}).get("eval_loss")
        self.evaluations.append(_Evaluation(state.global_step,
                                            None if loss is None else float(loss), answers))
        self._log_answers(f"step {state.global_step}", answers)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, model: Any = None, **kwargs: Any) -> None:
        self.losses = eval_losses(state.log_history)
        # After `BestAdapterCallback` (earlier in the list) put the best weights back: these
        # are the exported adapter's answers, even where its evaluation was an earlier
        # attempt's.
        if model is not None and self.prompts:
            self.final_answers = self._answers(model, args)

    def _answers(self, model: Any, args: TrainingArguments) -> list[str]:
        precision = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        return greedy_answers(model, self.tokenizer, self.prompts,
                              max_new_tokens=self.max_new_tokens, autocast=precision)

    def _log_prompts(self) -> None:
        self.reporter.log(
            f"sample answers: greedy, up to {self.max_new_tokens} new tokens, to "
            f"{len(self.prompts)} validation prompt{'s' if len(self.prompts) != 1 else ''} "
            "(training_config.sample_prompts), before training and at every evaluation")
        for number, prompt in enumerate(self.prompts, 1):
            text = self.tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True)
            shown = ("…" + text[-SHOWN_PROMPT_CHARS:]) if len(text) > SHOWN_PROMPT_CHARS else text
            self.reporter.log(f"sample prompt {number}/{len(self.prompts)}: "
                              f"{json.dumps(shown, ensure_ascii=False)}")

    def _log_answers(self, who: str, answers: list[str]) -> None:
        for number, answer in enumerate(answers, 1):
            shown = answer[:SHOWN_ANSWER_CHARS] + ("…" if len(answer) > SHOWN_ANSWER_CHARS else "")
            self.reporter.log(f"sample answer {number}/{len(answers)} ({who}): "
                              f"{json.dumps(shown, ensure_ascii=False)}")


def sample_answers_callback(
    reporter: JobReporter, tokenizer: Any, eval_set: Sequence[TokenizedExample], *,
    count: int, cutoff_len: int, distributed: bool,
) -> SampleAnswersCallback:
    """The callback of a supervised job that asks for `count` sample prompts; one without
    prompts, saying why (in the log too, where the job asked for some), when it gets none."""

    def none(why: str) -> SampleAnswersCallback:
        if count:
            reporter.log(f"sample answers: none, {why}")
        return SampleAnswersCallback(reporter, tokenizer, [], why_none=why)

    if count == 0:
        return none("training_config.sample_prompts is 0")
    if not len(eval_set):
        return none("no validation split")
    if distributed:
        # Under FSDP every rank takes part in every forward: rank 0 cannot generate alone.
        return none("the job trains on several devices")
    prompts = sample_prompts(eval_set, count)
    if not prompts:
        return none("every validation example is labelled from its first token "
                    "(train_on_inputs): no prompt is left to answer")
    return SampleAnswersCallback(reporter, tokenizer, prompts,
                                 max_new_tokens=min(MAX_NEW_TOKENS, cutoff_len))


def write_report(output_dir: Path, samples: SampleAnswersCallback, *, steps: int,
                 best_step: int | None, best_eval_loss: float | None, log: LogFn) -> Path:
    """Write `report.json` into `output_dir` (beside the adapter, uploaded with it) and log
    its one-line summary. The tuned answers are the exported adapter's, that of `best_step`
    (the last step's without one)."""
    decode = samples.tokenizer.decode
    answers = [{
        "prompt": decode(prompt.prompt_ids, skip_special_tokens=True),
        "expected": decode(prompt.expected_ids, skip_special_tokens=True).strip(),
        "base": samples.base_answers[i] if samples.base_answers else None,
        "tuned": samples.final_answers[i] if samples.final_answers else None,
        "by_step": {str(e.step): e.answers[i] for e in samples.evaluations},
    } for i, prompt in enumerate(samples.prompts)]
    losses = samples.losses
    report = {
        "steps": steps,
        "eval_loss_before": _step_loss(losses.before),
        "eval_loss_after": _step_loss(losses.after),
        "best_step": best_step,
        "best_eval_loss": best_eval_loss,
        "samples": {
            "source": "validation" if answers else None,
            "none_because": samples.why_none,
            "max_new_tokens": samples.max_new_tokens if answers else None,
            "tuned_step": (best_step if best_step is not None else steps) if answers else None,
            "answers": answers,
        },
    }
    path = output_dir / REPORT_FILE
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    log(f"report: {_summary(losses, best_step, best_eval_loss, len(answers), samples.why_none)}"
        f"; in {REPORT_FILE}")
    return path


def _step_loss(point: tuple[int, float] | None) -> dict[str, float | int] | None:
    return None if point is None else {"step": point[0], "eval_loss": point[1]}


def _summary(losses: EvalLosses, best_step: int | None, best_eval_loss: float | None,
             answered: int, why_no_samples: str | None) -> str:
    if losses.before is None or losses.after is None:
        loss = "no evaluation (no validation split)"
    else:
        loss = (f"eval_loss {losses.before[1]:.4f} at step {losses.before[0]} -> "
                f"{losses.after[1]:.4f} at step {losses.after[0]}")
        if best_step is not None and best_eval_loss is not None:
            loss += f", best {best_eval_loss:.4f} at step {best_step} (adapter kept)"
    samples = (f"base and tuned answers to {answered} validation prompt"
               f"{'s' if answered != 1 else ''}" if answered
               else f"no sample answers ({why_no_samples or 'none asked'})")
    return f"{loss}; {samples}"
