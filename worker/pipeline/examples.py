"""Rows to training examples: rendered with the prompt template (or, in chat mode, the model's
chat template), tokenized, labelled, and split into train and validation (or, beside a
validation dataset, shuffled as its own validation set).

ORPO and DPO train on preference rows instead (TRL tokenizes them); `preference_rows` takes
them out of the dataset. Every user-facing number (truncated examples, split sizes) is logged
here, where it is computed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from shared.dataset_columns import (
    PREFERENCE_COLUMNS,
    is_chat_template,
    preference_format,
)
from shared.dataset_files import LoadedDataset
from shared.loss_mask import max_render_chars
from shared.prompt_template import Example, completion_placeholder, render_example
from shared.schema import DataConfig, TrainingConfig
from shared.training_plan import (
    DEFAULT_SEED,
    EVAL_MAX_EXAMPLES,
    evaluation_examples,
    shared_examples,
    split_sizes,
)
from worker.pipeline.chat import RenderedChats, tokenize_chats
from worker.pipeline.errors import PipelineError
from worker.pipeline.labels import (
    BatchEncoder,
    TokenCounts,
    encoded_ahead,
    kept_tokens,
    label_batch,
    padded,
    text_batches,
)
from worker.pipeline.preference_chats import openai_preference_rows
from worker.pipeline.report import LogFn, no_log
from worker.pipeline.token_store import TokenStore, TokenStoreWriter

# Tokenized examples for supervised training, preference rows for ORPO and DPO.
Item = TypeVar("Item")
PreferenceRow = dict[str, str]


def render_and_tokenize(
    dataset: LoadedDataset, tokenizer: Any, data: DataConfig, *, log: LogFn,
    directory: Path | None = None,
) -> TokenStore:
    """Rows to training examples: through the prompt_template, or through the model's chat
    template when the prompt_template is `{messages}` (chat mode). Rendered and tokenized a
    batch at a time into a `TokenStore` under `directory` (in memory without one): the
    rendered texts of the whole dataset are never held at once."""
    max_chars = max_render_chars(data.cutoff_len, tokenizer)
    if not is_chat_template(data.prompt_template):
        rendered = _RenderCount()
        examples = (
            rendered.add(render_example(row, data.prompt_template, max_chars=max_chars))
            for row in dataset.rows
        )
        store, counts = tokenized_store(
            examples, tokenizer, data.cutoff_len, train_on_inputs=data.train_on_inputs,
            directory=directory,
        )
        _log_rendered(rendered.count, rendered.cut, data.prompt_template, max_chars, log)
        return _checked(store, counts, data.cutoff_len, log)
    chats = RenderedChats(dataset, tokenizer, max_chars=max_chars, max_turns=data.cutoff_len)
    return tokenize_chats(
        chats, tokenizer, data.cutoff_len, train_on_inputs=data.train_on_inputs, log=log,
        directory=directory,
    )


class _RenderCount:
    def __init__(self) -> None:
        self.count = self.cut = 0

    def add(self, example: Example) -> Example:
        self.count += 1
        self.cut += bool(example.prompt_cut or example.completion_cut)
        return example


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
    rendered = _RenderCount()
    examples = [rendered.add(render_example(row, template, max_chars=max_chars))
                for row in dataset.rows]
    _log_rendered(rendered.count, rendered.cut, template, max_chars, log)
    return examples


def _log_rendered(count: int, cut: int, template: str, max_chars: int | None,
                  log: LogFn) -> None:
    completion = completion_placeholder(template)
    log(f"rendered {count} examples; loss on {{{completion}}} and what follows it")
    if cut:
        log(f"{cut} examples were longer than {max_chars} characters and were cut there, "
            "beyond what cutoff_len tokens can hold")


def tokenize(
    examples: Iterable[Example],
    tokenizer: Any,
    cutoff_len: int,
    *,
    train_on_inputs: bool = False,
    log: LogFn = no_log,
    directory: Path | None = None,
) -> TokenStore:
    """Tokenize prompt + completion + EOS, labels -100 on the prompt, cut to `cutoff_len`.

    With `train_on_inputs` every token is trained (labels equal the input ids). Which tokens
    are trained is `shared.loss_mask`'s rule (`after_prompt`, `with_trained_eos`,
    `label_example`, here on whole batches: `label_batch`): an example longer than
    `cutoff_len` is cut and gets no EOS; one with no completion token left is dropped.
    """
    store, counts = tokenized_store(examples, tokenizer, cutoff_len,
                                    train_on_inputs=train_on_inputs, directory=directory)
    return _checked(store, counts, cutoff_len, log)


def tokenized_store(
    examples: Iterable[Example], tokenizer: Any, cutoff_len: int, *, train_on_inputs: bool,
    directory: Path | None,
) -> tuple[TokenStore, TokenCounts]:
    """`tokenize` without its checks and log line: the store and what was cut and dropped."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise PipelineError("the model's tokenizer has no EOS token; cannot mark example ends")
    encode = _encoder(tokenizer, cutoff_len)
    writer = TokenStoreWriter(directory)
    counts = TokenCounts()
    batches = text_batches(examples, lambda e: len(e.prompt) + len(e.completion))
    for batch, (ids, trained, lengths) in encoded_ahead(batches, encode):
        labelled = label_batch(ids, trained, lengths, cutoff_len,
                               train_on_inputs=train_on_inputs, eos_id=eos_id)
        writer.add(labelled.kept)
        counts.add(labelled, len(batch))
    return writer.finish(), counts


def _checked(store: TokenStore, counts: TokenCounts, cutoff_len: int, log: LogFn) -> TokenStore:
    log(
        f"tokenized {counts.examples} examples: {counts.truncated} truncated to cutoff_len "
        f"{cutoff_len}, {counts.dropped} dropped (no completion token within cutoff_len)"
    )
    if not len(store):
        raise PipelineError(
            f"no example has a completion token within cutoff_len {cutoff_len}; "
            "raise cutoff_len or shorten the prompts"
        )
    return store


Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _encoder(tokenizer: Any, cutoff_len: int) -> Callable[[Sequence[Example]], Encoded]:
    """What turns a batch of examples into its token ids (at most cutoff_len + 1 each),
    right-padded, whether each is in the completion, and each example's token count."""
    if getattr(tokenizer, "is_fast", False):
        encode = BatchEncoder(tokenizer, cutoff_len, add_special_tokens=True)

        def fast(batch: Sequence[Example]) -> Encoded:
            encoded = encode([e.prompt + e.completion for e in batch])
            return (encoded.ids, encoded.ending_after([len(e.prompt) for e in batch]),
                    encoded.lengths)

        return fast
    keep = kept_tokens(cutoff_len)

    # Slow tokenizers have no offsets: count the prompt's own tokens instead.
    def slow(batch: Sequence[Example]) -> Encoded:
        full = tokenizer([e.prompt + e.completion for e in batch], add_special_tokens=True,
                         **keep)["input_ids"]
        prompts = tokenizer([e.prompt for e in batch], add_special_tokens=True,
                            **keep)["input_ids"]
        trained = [[i >= len(p) for i in range(len(ids))]
                   for ids, p in zip(full, prompts, strict=True)]
        lengths = np.array([len(ids) for ids in full], dtype=np.int64)
        return padded(full, 0, np.int64), padded(trained, False, bool), lengths

    return slow


def preference_rows(
    dataset: LoadedDataset, tokenizer: Any, *, method: str, cutoff_len: int,
    log: LogFn = no_log,
) -> list[PreferenceRow]:
    """The rows' prompt, chosen and rejected texts, for ORPO or DPO (`method`): the
    `prompt` / `chosen` / `rejected` columns as they are, or rows in OpenAI's preference
    format rendered with the model's chat template (`preference_chats`). The caller checked
    that the dataset has one format's columns (`shared.dataset_columns`)."""
    columns = preference_format(dataset.columns)
    if columns is None or columns == PREFERENCE_COLUMNS:
        rows = [
            {name: "" if row.get(name) is None else str(row[name]) for name in PREFERENCE_COLUMNS}
            for row in dataset.rows
        ]
        log(
            f"{method}: the prompt_template is not used; each row's prompt is followed "
            "directly by its chosen and its rejected answer"
        )
        return rows
    rows = openai_preference_rows(
        dataset.rows, tokenizer, columns, max_chars=max_render_chars(cutoff_len, tokenizer),
        max_turns=cutoff_len,
    )
    log(
        f"{method}: the prompt_template is not used; {len(rows)} preference pairs in OpenAI's "
        f"format ({', '.join(columns)}) rendered with the model's chat template: the prompt "
        "is input.messages and the generation prompt, each answer its content and the "
        "end-of-turn marker"
    )
    return rows


def split(
    examples: Sequence[Item],
    split_config: Mapping[str, float],
    *,
    seed: int = DEFAULT_SEED,
    log: LogFn = no_log,
    validation_from: str | None = None,
) -> tuple[Sequence[Item], Sequence[Item]]:
    """Shuffle with `seed` and cut into (train, validation) by the configured fractions: views
    of a `TokenStore`, lists of anything else.

    The same examples and fractions always give the same split. Rows beyond
    train + validation < 1 are left out. Validation 0 gives an empty validation list, which
    the log calls disabled evaluation unless `validation_from` names where the validation
    examples come from instead (`shuffled_validation`).
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train, n_val = split_sizes(len(examples), split_config)
    validation = _take(examples, order[:n_val])
    train = _take(examples, order[n_val : n_val + n_train])
    if validation_from is not None:
        log(f"split (seed {seed}): {len(train)} train examples; the validation examples are "
            f"those of {validation_from}")
        return train, validation
    log(f"split (seed {seed}): {len(train)} train, {len(validation)} validation examples")
    if not validation:
        log("validation split is 0: evaluation and early stopping are disabled")
    return train, validation


def shuffled_validation(
    examples: Sequence[Item], *, seed: int = DEFAULT_SEED, source: str, log: LogFn = no_log,
) -> Sequence[Item]:
    """A validation dataset's examples (every one of them) shuffled with `seed`, as `split`
    shuffles a split's: the first ones, which `evaluated_sample` reads, are a seeded sample of
    the dataset rather than its first rows."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    log(f"validation (seed {seed}): {len(examples)} examples of {source}")
    return _take(examples, order)


def evaluated_sample(
    validation: Sequence[Item], *, train_examples: int, config: TrainingConfig,
    compute_share: float, cap: int = EVAL_MAX_EXAMPLES, log: LogFn = no_log,
) -> Sequence[Item]:
    """The validation examples every evaluation reads, the baseline before training included:
    the first of the split (`split`, or `shuffled_validation` for a validation dataset,
    shuffled it with a fixed seed), as many as
    `shared.training_plan.evaluation_examples` allows."""
    count = evaluation_examples(
        len(validation), train_examples, epochs=config.num_train_epochs,
        compute_share=compute_share, max_examples=config.max_eval_examples, cap=cap,
    )
    if count < len(validation):
        if config.max_eval_examples is not None:
            why = "training_config.max_eval_examples"
        elif count == cap and count < shared_examples(train_examples, config.num_train_epochs,
                                                      compute_share):
            why = (f"at most {cap} an evaluation (TUNERY_EVAL_MAX_EXAMPLES), so that the "
                   "baseline evaluation does not hold the first step back")
        else:
            why = f"all evaluations within {compute_share:.0%} of the training compute"
        log(f"evaluation: {count} of the {len(validation)} validation examples, the same "
            f"seeded sample every time ({why})")
    return validation[:count]


def _take(items: Sequence[Item], indices: list[int]) -> Sequence[Item]:
    if isinstance(items, TokenStore):
        return items.take(indices)  # type: ignore[return-value]
    return [items[i] for i in indices]
