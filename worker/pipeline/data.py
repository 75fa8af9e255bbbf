"""Data stages: load rows, render them with the prompt template, tokenize, split.

Reading the file formats, downloading and the hub live in `readers.py`.

Every user-facing number (rows, truncated examples, split sizes) is logged here, where it is
computed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from shared.prompt_template import Example, render_example
from shared.schema import TemplateError, template_placeholders
from shared.settings import get_settings
from shared.sources import SourceError, classify_source, redact_url
from shared.storage import ObjectNotFound, Storage, StorageError
from shared.url_guard import UrlPolicy
from worker.pipeline.errors import PipelineError
from worker.pipeline.readers import (
    LoadedDataset,
    download_url,
    load_hub_dataset,
    read_file,
    read_local,
)
from worker.pipeline.report import LogFn, no_log

Row = Mapping[str, Any]
# Tokenized examples for supervised training, raw preference rows for ORPO.
Item = TypeVar("Item")

IGNORE_INDEX = -100
SPLIT_SEED = 42


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def load_dataset(
    data_path: str,
    *,
    allowed_local_dirs: Iterable[Path],
    download_dir: Path,
    subset: str | None = None,
    source_type: str = "hub_link",
    token: str | None = None,
    client: httpx.Client | None = None,
    url_policy: UrlPolicy | None = None,
    storage: Storage | None = None,
    max_rows: int | None = None,
    hub_cache_dir: Path | None = None,
    log: LogFn = no_log,
) -> LoadedDataset:
    """Load the rows `data_path` names: a local file/dir, an https URL, an uploaded dataset id
    (`ds_…`, read from `storage`), or a hub dataset id.

    URLs follow `url_policy` (default: this worker's settings) at every redirect hop, and the
    download connects only to addresses it allows. Raises `PipelineError` for refused paths,
    unreadable or unparseable data (naming the line or row), hub datasets that cannot be
    loaded, and more than `max_rows` rows. `hub_cache_dir` is where hub downloads go
    (default: the shared Hugging Face cache; see `worker.pipeline.job_dirs`).
    """
    url_policy = url_policy or UrlPolicy.from_settings(get_settings().sources)
    allowed_local_dirs = list(allowed_local_dirs)
    try:
        source = classify_source(data_path, allowed_local_dirs, url_policy=url_policy)
    except SourceError as exc:
        raise PipelineError(f"data_path: {exc}") from None
    # An uploaded dataset's id is what GET /v1/upload hands out as the "presigned" link.
    if source_type == "s3_presigned_link" and source.kind not in ("url", "dataset"):
        raise PipelineError(
            "data_source_type 's3_presigned_link' needs an https URL or an uploaded dataset id "
            f"as data_path, got {data_path!r}"
        )
    if source.kind == "local":
        assert source.path is not None
        dataset = read_local(source.path, allowed_local_dirs, shown=data_path)
    elif source.kind == "url":
        dataset = read_file(
            download_url(data_path, download_dir, policy=url_policy, client=client, log=log),
            max_rows=max_rows,
        )
        dataset.origin = redact_url(data_path)
    elif source.kind == "dataset":
        dataset = read_file(_download_uploaded(data_path, storage, download_dir, log),
                            max_rows=max_rows)
        dataset.origin = data_path
    else:
        dataset = load_hub_dataset(data_path, subset, token=token, cache_dir=hub_cache_dir)
    if not dataset.rows:
        raise PipelineError(f"the dataset {dataset.origin} has no rows")
    # Files stop reading past `max_rows`; hub datasets and local directories are counted here.
    if max_rows is not None and len(dataset.rows) > max_rows:
        raise PipelineError(
            f"the dataset {dataset.origin} has {len(dataset.rows)} rows, more than the "
            f"{max_rows} this server accepts (TUNERY_MAX_DATASET_ROWS)"
        )
    log(f"dataset {dataset.origin}: {len(dataset.rows)} rows, columns {dataset.columns}")
    return dataset


def _download_uploaded(
    dataset_id: str, storage: Storage | None, download_dir: Path, log: LogFn
) -> Path:
    """Copy an uploaded dataset's file (its name carries the format) into `download_dir`.

    The API checked at submit that the dataset belongs to the job's tenant and parsed; only
    validated files live under `datasets/{id}/`.
    """
    if storage is None:
        raise PipelineError(f"data_path {dataset_id!r} is an uploaded dataset: no storage given")
    try:
        objects = storage.list(f"datasets/{dataset_id}/")
        if not objects:
            raise ObjectNotFound(dataset_id)
        key = objects[0].key
        dest = download_dir / key.rsplit("/", 1)[-1]
        storage.download_file(key, dest)
    except ObjectNotFound:
        raise PipelineError(
            f"uploaded dataset {dataset_id} has no file in storage; upload it again"
        ) from None
    except StorageError as exc:
        raise PipelineError(f"cannot read uploaded dataset {dataset_id}: {exc}") from None
    log(f"downloaded uploaded dataset {dataset_id}: {objects[0].size} bytes, {dest.name}")
    return dest


def check_template_columns(template: str, columns: Sequence[str]) -> list[str]:
    """Return the template's placeholders; `PipelineError` if the dataset lacks any of them."""
    try:
        placeholders = template_placeholders(template)
    except TemplateError as exc:
        raise PipelineError(f"prompt_template: {exc}") from None
    missing = [name for name in dict.fromkeys(placeholders) if name not in columns]
    if missing:
        raise PipelineError(
            f"prompt_template uses columns the dataset does not have: {missing}. "
            f"Template placeholders: {placeholders}; dataset columns: {list(columns)}"
        )
    return placeholders


# A token covers at most as many characters as its vocabulary entry is long: byte-level BPE
# writes one vocabulary character per byte and a character is at least one byte; SentencePiece
# writes one per character. Twice the longest entry leaves room for normalizers that fold
# several characters into one (NFC, NFKC). Used when a tokenizer lists no vocabulary.
_FALLBACK_TOKEN_CHARS = 128


def max_render_chars(cutoff_len: int, tokenizer: Any) -> int:
    """The most characters of one rendered example that tokenization can keep: what lies
    beyond `cutoff_len` tokens is cut before training anyway, so rendering stops there and a
    template that repeats a long cell cannot blow up the worker's memory."""
    try:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=0)
    except (AttributeError, NotImplementedError, TypeError):
        longest = 0
    return cutoff_len * 2 * (longest or _FALLBACK_TOKEN_CHARS)


def render_examples(
    dataset: LoadedDataset,
    template: str,
    *,
    max_chars: int | None = None,
    log: LogFn = no_log,
) -> list[Example]:
    """Render every row, each cut at `max_chars` characters (see `max_render_chars`; the
    prompt first, so a prompt past the bound leaves no completion and the example is dropped
    at tokenization); `PipelineError` (listing both sides) if a placeholder has no column."""
    placeholders = check_template_columns(template, dataset.columns)
    examples = [render_example(row, template, max_chars=max_chars) for row in dataset.rows]
    cut = sum(e.prompt_cut or e.completion_cut for e in examples)
    log(f"rendered {len(examples)} examples; loss on {{{placeholders[-1]}}} and what follows it")
    if cut:
        log(f"{cut} examples were longer than {max_chars} characters and were cut there, "
            "beyond what cutoff_len tokens can hold")
    return examples


def label_example(
    ids: Sequence[int], trained: Sequence[bool], cutoff_len: int, *, train_on_inputs: bool
) -> tuple[TokenizedExample | None, bool]:
    """Cut `ids` to `cutoff_len` and label them: -100 where `trained` is False, or every token
    with `train_on_inputs`. Returns (example, whether it was cut); the example is None when no
    trained token is left."""
    was_cut = len(ids) > cutoff_len
    ids, trained = list(ids[:cutoff_len]), trained[:cutoff_len]
    if train_on_inputs:
        return TokenizedExample(ids, list(ids)), was_cut
    if not any(trained):
        return None, was_cut
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return TokenizedExample(ids, labels), was_cut


# Characters handed to the tokenizer at once. The tokenizer holds every token of a batch, with
# its offsets, before anything is cut to cutoff_len; a batch bounded by examples alone could
# hold a thousand examples each as long as the render bound allows.
TOKENIZE_BATCH_CHARS = 1_000_000
TOKENIZE_BATCH_EXAMPLES = 1000


def text_batches(items: Sequence[Item], length: Callable[[Item], int]) -> Iterator[Sequence[Item]]:
    """`items` in order, in batches of at most TOKENIZE_BATCH_EXAMPLES items and
    TOKENIZE_BATCH_CHARS characters (`length` of each), one item at least."""
    start = 0
    while start < len(items):
        end, chars = start, 0
        while end < len(items) and end - start < TOKENIZE_BATCH_EXAMPLES:
            chars += length(items[end])
            if chars > TOKENIZE_BATCH_CHARS and end > start:
                break
            end += 1
        yield items[start:end]
        start = end


def kept_tokens(cutoff_len: int) -> dict[str, Any]:
    """Tokenizer arguments that keep cutoff_len + 1 tokens of each text: the first cutoff_len
    are the same as without them, and the one more tells `label_example` that the text was cut.
    Nothing past it is ever turned into Python lists."""
    return {"truncation": True, "max_length": cutoff_len + 1}


def tokenize(
    examples: Sequence[Example],
    tokenizer: Any,
    cutoff_len: int,
    *,
    train_on_inputs: bool = False,
    log: LogFn = no_log,
) -> list[TokenizedExample]:
    """Tokenize prompt + completion + EOS, labels -100 on the prompt, cut to `cutoff_len`.

    With `train_on_inputs` every token is trained (labels equal the input ids).

    The prompt mask comes from character offsets, never from token ids: with pad == EOS
    (SmolLM2) masking pad ids would also mask the EOS the model must learn to emit. A token
    straddling the prompt/completion boundary counts as completion, so the first answer token
    is always trained. An example longer than `cutoff_len` is cut and gets no EOS (teaching the
    model to stop mid-answer would be worse); one with no completion token left is dropped.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise PipelineError("the model's tokenizer has no EOS token; cannot mark example ends")
    out: list[TokenizedExample] = []
    truncated = dropped = 0
    for batch in text_batches(examples, lambda e: len(e.prompt) + len(e.completion)):
        for ids, in_completion in _encode(batch, tokenizer, cutoff_len):
            if ids and ids[-1] == eos_id:
                # Already there: the template ends with the EOS text (ChatML's <|im_end|>), or
                # the tokenizer appends one itself, with empty offsets. Either way, train it.
                in_completion = [*in_completion[:-1], True]
            else:
                ids, in_completion = [*ids, eos_id], [*in_completion, True]
            example, was_cut = label_example(
                ids, in_completion, cutoff_len, train_on_inputs=train_on_inputs
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


def _encode(
    batch: Sequence[Example], tokenizer: Any, cutoff_len: int
) -> list[tuple[list[int], list[bool]]]:
    texts = [e.prompt + e.completion for e in batch]
    keep = kept_tokens(cutoff_len)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, **keep)
        result = []
        for example, ids, offsets in zip(
            batch, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            boundary = len(example.prompt)
            # Special tokens (BOS) have empty (0, 0) offsets and land in the prompt.
            result.append((list(ids), [end > boundary for _start, end in offsets]))
        return result
    # Slow tokenizers have no offsets: count the prompt's own tokens instead.
    full = tokenizer(texts, add_special_tokens=True, **keep)["input_ids"]
    prompts = tokenizer([e.prompt for e in batch], add_special_tokens=True, **keep)["input_ids"]
    return [
        (list(ids), [i >= len(prompt_ids) for i in range(len(ids))])
        for ids, prompt_ids in zip(full, prompts, strict=True)
    ]


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
    n = len(examples)
    train_fraction = split_config.get("train", 0.9)
    val_fraction = split_config.get("validation", 0.0)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    n_train = min(n - n_val, max(1, round(n * train_fraction)))
    validation = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val : n_val + n_train]]
    log(f"split (seed {seed}): {len(train)} train, {len(validation)} validation examples")
    if not validation:
        log("validation split is 0: evaluation and early stopping are disabled")
    return train, validation
