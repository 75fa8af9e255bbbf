"""The batch form of the loss mask the worker trains with (`BatchEncoder`, `label_batch`)
against the one-example rule of `shared.loss_mask`, which the API previews with."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from shared.loss_mask import after_prompt, label_example, with_trained_eos
from worker.pipeline.labels import BatchEncoder, kept_tokens, label_batch, padded

EOS = 2


def one_by_one(rows: list[tuple[list[int], list[bool]]], cutoff: int, *, train_on_inputs: bool,
               eos: int | None) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    kept, truncated, dropped = [], 0, 0
    for ids, trained in rows:
        if eos is not None:
            ids, trained = with_trained_eos(ids, trained, eos)
        example, was_cut = label_example(ids, trained, cutoff, train_on_inputs=train_on_inputs)
        truncated += was_cut
        if example is None:
            dropped += 1
        else:
            kept.append((example.input_ids, example.labels))
    return kept, truncated, dropped


def batched(rows: list[tuple[list[int], list[bool]]], cutoff: int, *, train_on_inputs: bool,
            eos: int | None) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    ids = padded([r[0] for r in rows], 0, np.int64)
    trained = padded([r[1] for r in rows], False, bool)
    lengths = np.array([len(r[0]) for r in rows])
    result = label_batch(ids, trained, lengths, cutoff, train_on_inputs=train_on_inputs,
                         eos_id=eos)
    kept, start = [], 0
    for length in result.kept.lengths.tolist():
        row_ids = result.kept.ids[start:start + length]
        row_trained = result.kept.trained[start:start + length]
        kept.append((row_ids.tolist(), np.where(row_trained, row_ids, -100).tolist()))
        start += length
    return kept, result.truncated, result.dropped


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("eos", [EOS, None])
def test_a_batch_is_labelled_as_each_example_alone(train_on_inputs: bool, eos: int | None) -> None:
    rng = random.Random(7)
    for cutoff in (1, 2, 5, 8, 13):
        rows = []
        for _ in range(200):
            # Lengths around the cutoff (cut, exactly full, one short), ids that end in EOS or
            # not, prompts with no trained token, all trained tokens past the cutoff.
            length = rng.choice([0, 1, cutoff - 1, cutoff, cutoff + 1, rng.randint(1, 20)])
            length = max(length, 0 if eos is not None else 1)
            ids = [rng.choice([EOS, 5, 6, 7, 300]) for _ in range(length)]
            boundary = rng.randint(0, length + 1)
            trained = [i >= boundary for i in range(length)]
            rows.append((ids, trained))

        expected = one_by_one(rows, cutoff, train_on_inputs=train_on_inputs, eos=eos)
        got = batched(rows, cutoff, train_on_inputs=train_on_inputs, eos=eos)

        assert got == expected, f"cutoff {cutoff}"


TEXTS = [
    "### Instruction:\nAdd 2 and 3.\n\n### Response:\nAnswer: 5.",
    "Q: what is  the   capital?   A:  Paris",
    "naïve café — déjà vu ✓ 日本語のテキスト",
    "",
    "x",
    "word " * 80,
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
]


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("which", ["tiny", "tiny appending EOS", "smollm2"])
def test_tokens_past_the_prompt_are_found_as_from_every_offset(
    which: str, special: bool, tiny_tokenizer: Any, smollm2_dir: Path,
) -> None:
    tokenizer = tiny_tokenizer if which != "smollm2" else AutoTokenizer.from_pretrained(smollm2_dir)
    if which == "tiny appending EOS":
        # A post-processor that appends a special token with offsets (0, 0), as BERT's [SEP].
        tokenizer = copy.deepcopy(tiny_tokenizer)
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id),
                                                  ("</s>", tokenizer.eos_token_id)])
    encode = BatchEncoder(tokenizer, cutoff_len=24, add_special_tokens=special)
    rng = random.Random(3)
    texts, boundaries = [], []
    for text in TEXTS:
        for chars in sorted({0, len(text), *(rng.randint(0, len(text)) for _ in range(12))}):
            texts.append(text)
            boundaries.append(chars)

    encoded = encode(texts)

    expected = np.zeros(encoded.ids.shape, dtype=bool)
    for row, chars in enumerate(boundaries):
        # The transformers call the rule was written against, cut as the worker cuts.
        offsets = tokenizer(texts[row], add_special_tokens=special, return_offsets_mapping=True,
                            **kept_tokens(24))["offset_mapping"]
        expected[row, : len(offsets)] = after_prompt(offsets, chars)
    got = encoded.ending_after(boundaries) & (np.arange(encoded.ids.shape[1])
                                               < encoded.lengths[:, None])
    assert (got == expected).all()
