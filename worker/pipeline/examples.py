"""Rows to training examples: rendered with the prompt template (or, in chat mode, the model's
chat template), tokenized, labelled, and split into train and validation.

ORPO trains on the raw preference rows instead (TRL tokenizes them); `preference_rows` takes
them out of the dataset. Every user-facing number (truncated examples, split sizes) is logged
here, where it is computed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from shared.dataset_columns import (
    PREFERENCE_COLUMNS,
    is_chat_template,
)
from shared.dataset_files import LoadedDataset
from shared.loss_mask import after_prompt, max_render_chars, with_trained_eos
from shared.prompt_template import Example, completion_placeholder, render_example
from shared.schema import DataConfig, TrainingConfig
from shared.training_plan import evaluation_examples, split_sizes
from worker.pipeline.chat import render_chats, tokenize_chats
from worker.pipeline.errors import PipelineError
from worker.pipeline.labels import TokenizedExample, kept_tokens, label_example, text_batches
from worker.pipeline.report import LogFn, no_log

# Tokenized examples for supervised training, raw preference rows for ORPO.
Item = TypeVar("Item")
PreferenceRow = dict[str, str]

SPLIT_SEED = 42

def render_and_tokenize(
    dataset: LoadedDataset, tokenizer: Any, data: DataConfig, *, log: LogFn
) -> list[TokenizedExample]:
    """Rows to training examples: through the prompt_template, or through the model's chat
    template when the prompt_template is `{messages}` (chat mode)."""
    max_chars = max_render_chars(data.cutoff_len, tokenizer)
    if not is_chat_template(data.prompt_template):
        examples = render_examples(dataset, data.prompt_template, max_chars=max_chars, log=log)
        return tokenize(
            examples, tokenizer, data.cutoff_len, train_on_inputs=data.train_on_inputs, log=log
        )
    chats = render_chats(dataset, tokenizer, max_chars=max_chars, max_turns=data.cutoff_len,
                         log=log)
    return tokenize_chats(
        chats, tokenizer, data.cutoff_len, train_on_inputs=data.train_on_inputs, log=log
    )


def render_examples(
    dataset: LoadedDataset,
    template: str,
    *,
    max_chars: int | None = None,
    log: LogFn = no_log,
) -> list[Example]:
    """Render every row, each cut at `max_chars` characters (see `max_render_chars`; the
    prompt first, so a prompt past the bound leaves no completion and the example is dropped
    at tokenization). The caller checked the columns (`shared.dataset_columns`); a cell the
    row lacks renders as ""."""
    examples = [render_example(row, template, max_chars=max_chars) for row in dataset.rows]
    completion = completion_placeholder(template)
    cut = sum(e.prompt_cut or e.completion_cut for e in examples)
    log(f"rendered {len(examples)} examples; loss on {{{completion}}} and what follows it")
    if cut:
        log(f"{cut} examples were longer than {max_chars} characters and were cut there, "
            "beyond what cutoff_len tokens can hold")
    return examples


def tokenize(
    examples: Sequence[Example],
    tokenizer: Any,
    cutoff_len: int,
    *,
    train_on_inputs: bool = False,
    log: LogFn = no_log,
) -> list[TokenizedExample]:
    """Tokenize prompt + completion + EOS, labels -100 on the prompt, cut to `cutoff_len`.

    With `train_on_inputs` every token is trained (labels equal the input ids). Which tokens
    are trained is `shared.loss_mask`'s rule (`after_prompt`, `with_trained_eos`,
    `label_example`): an example longer than `cutoff_len` is cut and gets no EOS; one with no
    completion token left is dropped.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise PipelineError("the model's tokenizer has no EOS token; cannot mark example ends")
    out: list[TokenizedExample] = []
    truncated = dropped = 0
    for ids, in_completion in _encoded(examples, tokenizer, cutoff_len):
        example, was_cut = label_example(
            *with_trained_eos(ids, in_completion, eos_id), cutoff_len,
            train_on_inputs=train_on_inputs,
        )
        truncated += was_cut
        if example is None:
            dropped += 1
        else:
            out.append(example)
    log(
        f"tokenized {len(examples)} examples: {truncated} truncated to cutoff_len {cutoff_len}, "
        f"{dropped} dropped (no completion token within cutoff_len)"
    )
    if not out:
        raise PipelineError(
            f"no example has a completion token within cutoff_len {cutoff_len}; "
            "raise cutoff_len or shorten the prompts"
        )
    return out


def _encoded(
    examples: Sequence[Example], tokenizer: Any, cutoff_len: int
) -> Iterator[tuple[list[int], list[bool]]]:
    """Each example's token ids (at most cutoff_len + 1) and whether each is in the
    completion, tokenized in `text_batches`."""
    keep = kept_tokens(cutoff_len)
    for batch in text_batches(examples, lambda e: len(e.prompt) + len(e.completion)):
        texts = [e.prompt + e.completion for e in batch]
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, **keep)
            for example, ids, offsets in zip(
                batch, enc["input_ids"], enc["offset_mapping"], strict=True
            ):
                yield list(ids), after_prompt(offsets, len(example.prompt))
            continue
        # Slow tokenizers have no offsets: count the prompt's own tokens instead.
        full = tokenizer(texts, add_special_tokens=True, **keep)["input_ids"]
        prompts = tokenizer([e.prompt for e in batch], add_special_tokens=True,
                            **keep)["input_ids"]
        for ids, prompt_ids in zip(full, prompts, strict=True):
            yield list(ids), [i >= len(prompt_ids) for i in range(len(ids))]


def preference_rows(dataset: LoadedDataset, *, log: LogFn = no_log) -> list[PreferenceRow]:
    """The rows' `prompt`, `chosen` and `rejected` texts; the caller checked that the dataset
    has these columns (`shared.dataset_columns`)."""
    rows = [
        {name: "" if row[name] is None else str(row[name]) for name in PREFERENCE_COLUMNS}
        for row in dataset.rows
    ]
    log(
        "ORPO: the prompt_template is not used; each row's prompt is followed directly by its "
        "chosen and its rejected answer"
    )
    return rows


def split(
    examples: Sequence[Item],
    split_config: Mapping[str, float],
    *,
    seed: int = SPLIT_SEED,
    log: LogFn = no_log,
) -> tuple[list[Item], list[Item]]:
    """Shuffle with `seed` and cut into (train, validation) by the configured fractions.

    The same examples and fractions always give the same split. Rows beyond
    train + validation < 1 are left out. Validation 0 gives an empty validation list.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train, n_val = split_sizes(len(examples), split_config)
    validation = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val : n_val + n_train]]
    log(f"split (seed {seed}): {len(train)} train, {len(validation)} validation examples")
    if not validation:
        log("validation split is 0: evaluation and early stopping are disabled")
    return train, validation


def evaluated_sample(
    validation: list[Item], *, train_examples: int, config: TrainingConfig,
    compute_share: float, log: LogFn = no_log,
) -> list[Item]:
    """The validation examples every evaluation reads, the baseline before training included:
    the first of the split (`split` shuffled it with a fixed seed), as many as
    `shared.training_plan.evaluation_examples` allows."""
    count = evaluation_examples(
        len(validation), train_examples, epochs=config.num_train_epochs,
        compute_share=compute_share, max_examples=config.max_eval_examples,
    )
    if count < len(validation):
        why = ("training_config.max_eval_examples" if config.max_eval_examples is not None
               else f"all evaluations within {compute_share:.0%} of the training compute")
        log(f"evaluation: {count} of the {len(validation)} validation examples, the same "
            f"seeded sample every time ({why})")
    return validation[:count]
