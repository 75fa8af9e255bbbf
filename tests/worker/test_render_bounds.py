"""Rendering stops at what cutoff_len tokens can hold: a template that repeats a long cell, or
a conversation of thousands of turns, cannot take the worker's memory, and training sees
exactly the tokens it would have seen without the bound."""

from __future__ import annotations

from typing import Any

import pytest

from shared.dataset_files import LoadedDataset
from shared.loss_mask import bound_turns, max_render_chars
from shared.schema import DataConfig
from worker.pipeline import examples as examples_module
from worker.pipeline.chat import render_chats, tokenize_chats
from worker.pipeline.examples import render_and_tokenize, render_examples, tokenize
from worker.pipeline.labels import (
    IGNORE_INDEX,
    TOKENIZE_BATCH_CHARS,
    BatchEncoder,
    EncodedBatch,
    label_example,
)

CUTOFF = 48
TEMPLATE = "Q: {instruction} {instruction} {instruction}\nA: {output}"
NORMAL = {"instruction": "Add the numbers 2 and 3.", "output": "Answer: 5."}
LONG_ANSWER = {"instruction": "Name colours.", "output": "Answer: " + "red green blue " * 50_000}
LONG_QUESTION = {"instruction": "red " * 200_000, "output": "Answer: 5."}


def test_the_bound_is_cutoff_len_times_twice_the_longest_vocabulary_entry(
    tiny_tokenizer: Any,
) -> None:
    longest = max(len(token) for token in tiny_tokenizer.get_vocab())

    assert max_render_chars(CUTOFF, tiny_tokenizer) == CUTOFF * 2 * longest


def test_rows_far_beyond_the_bound_render_at_most_the_bound_and_train_the_same_tokens(
    tiny_tokenizer: Any,
) -> None:
    dataset = LoadedDataset(["instruction", "output"], [NORMAL, LONG_ANSWER, LONG_QUESTION], "d")
    bound = max_render_chars(CUTOFF, tiny_tokenizer)
    assert bound < len(LONG_ANSWER["output"]) // 100  # the rows are far beyond it
    lines: list[str] = []

    bounded = render_examples(dataset, TEMPLATE, max_chars=bound, log=lines.append)
    unbounded = render_examples(dataset, TEMPLATE)

    assert [len(e.prompt) + len(e.completion) for e in bounded][1:] == [bound, bound]
    assert bounded[0] == unbounded[0]  # a normal row is untouched
    assert bounded[1].prompt == unbounded[1].prompt and bounded[1].completion_cut
    # A prompt past the bound leaves no completion: the example is dropped, as it would be
    # for having no completion token within cutoff_len.
    assert bounded[2].completion == "" and bounded[2].prompt_cut
    assert "2 examples were longer than" in lines[-1]
    tokenized = tokenize(bounded, tiny_tokenizer, CUTOFF)
    assert tokenized == tokenize(unbounded, tiny_tokenizer, CUTOFF)
    normal, long_answer = tokenized
    assert normal.labels[0] == IGNORE_INDEX and normal.labels[-1] == tiny_tokenizer.eos_token_id
    assert len(long_answer.input_ids) == CUTOFF and long_answer.labels[-1] != IGNORE_INDEX


def test_the_job_pipeline_renders_within_the_bound(tiny_tokenizer: Any) -> None:
    dataset = LoadedDataset(["instruction", "output"], [NORMAL, LONG_ANSWER], "d")
    lines: list[str] = []

    tokenized = render_and_tokenize(
        dataset, tiny_tokenizer, DataConfig(prompt_template=TEMPLATE, cutoff_len=CUTOFF),
        log=lines.append,
    )

    assert any(f"longer than {max_render_chars(CUTOFF, tiny_tokenizer)} characters" in line
               for line in lines)
    assert tokenized == tokenize(render_examples(dataset, TEMPLATE), tiny_tokenizer, CUTOFF)


def _conversation(extra_turns: int, chars: int) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "Answer: 5."}]
    for i in range(extra_turns):
        role = "user" if i % 2 == 0 else "assistant"
        turns.append({"role": role, "content": ("red green blue " * chars)[:chars]})
    return turns


def test_bound_turns_keeps_at_most_the_bound_of_content_and_of_turns() -> None:
    turns = _conversation(1000, 400)

    kept = bound_turns(turns, 1000, 48)

    assert sum(len(t["content"]) for t in kept) == 1000
    assert kept[:3] == turns[:3] and len(kept) < 48
    assert len(bound_turns(turns, None, 48)) == 48
    assert bound_turns(turns[:3], 10_000, 48) == turns[:3]


def test_a_long_conversation_renders_within_the_bound_and_trains_the_same_tokens(
    tiny_tokenizer: Any,
) -> None:
    dataset = LoadedDataset(
        ["messages"], [{"messages": _conversation(0, 0)}, {"messages": _conversation(200, 400)}],
        "chats",
    )
    bound = max_render_chars(CUTOFF, tiny_tokenizer)

    bounded = render_chats(dataset, tiny_tokenizer, max_chars=bound, max_turns=CUTOFF)
    unbounded = render_chats(dataset, tiny_tokenizer)

    assert bounded[0] == unbounded[0]
    assert len(bounded[1].text) < bound + 20 * CUTOFF < len(unbounded[1].text)
    tokenized = tokenize_chats(bounded, tiny_tokenizer, CUTOFF)
    assert tokenized == tokenize_chats(unbounded, tiny_tokenizer, CUTOFF)
    assert tokenized == render_and_tokenize(
        dataset, tiny_tokenizer, DataConfig(prompt_template="{messages}", cutoff_len=CUTOFF),
        log=lambda line: None,
    )


class RecordingEncoder(BatchEncoder):
    """The batch encoder, recording the characters and tokens of each call."""

    calls: list[tuple[int, int]] = []

    def __call__(self, texts: list[str]) -> EncodedBatch:
        encoded = super().__call__(texts)
        self.calls.append((sum(len(t) for t in texts), int(encoded.lengths.max())))
        return encoded


def reference_tokenize(examples: list[Any], tokenizer: Any, cutoff: int) -> list[Any]:
    """Every example encoded whole, one at a time, then cut: what tokenize must equal."""
    eos = tokenizer.eos_token_id
    out = []
    for example in examples:
        enc = tokenizer(example.prompt + example.completion, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        trained = [end > len(example.prompt) for _start, end in enc["offset_mapping"]]
        if ids[-1] == eos:
            trained[-1] = True
        else:
            ids, trained = [*ids, eos], [*trained, True]
        tokenized, _cut = label_example(ids, trained, cutoff, train_on_inputs=False)
        if tokenized is not None:
            out.append(tokenized)
    return out


def test_the_tokenizer_gets_bounded_batches_and_keeps_cutoff_len_plus_one_tokens(
    tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_row = {"instruction": "Say it.", "output": "x y " * 100_000}
    rows = [NORMAL, long_row] * 20
    dataset = LoadedDataset(["instruction", "output"], rows, "d")
    examples = render_examples(dataset, TEMPLATE)  # unbounded: 400,000 characters a long row
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(RecordingEncoder, "calls", calls)
    monkeypatch.setattr(examples_module, "BatchEncoder", RecordingEncoder)

    tokenized = tokenize(examples, tiny_tokenizer, CUTOFF)

    assert tokenized == reference_tokenize(examples, tiny_tokenizer, CUTOFF)
    # 40 examples would be one batch of examples; 8 million characters are cut into batches.
    assert all(chars <= TOKENIZE_BATCH_CHARS for chars, _tokens in calls)
    assert len(calls) >= 8
    assert max(tokens for _chars, tokens in calls) == CUTOFF + 1
