"""Rendering, tokenizing and splitting training examples."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shared.dataset_files import LoadedDataset
from shared.prompt_template import Example, completion_placeholder, render_example
from worker.pipeline.batching import PadToLongest
from worker.pipeline.errors import PipelineError
from worker.pipeline.examples import split, tokenize
from worker.pipeline.labels import IGNORE_INDEX

TEMPLATE = "### Instruction: {instruction}\n### Input: {input}\n### Output: {output}"
ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "Answer: 5."},
    {"instruction": "Name a colour.", "input": "", "output": "Answer: red."},
]


def test_completion_starts_at_the_last_placeholder() -> None:
    example = render_example(ROWS[0], TEMPLATE + " (end)")

    assert example.prompt == "### Instruction: Add the numbers.\n### Input: 2 3\n### Output: "
    assert example.completion == "Answer: 5. (end)"


def test_render_never_interprets_braces_in_cells_or_escaped_braces() -> None:
    row = {"q": "{0} {q.__class__} {{x}}", "a": "{a!r}"}

    example = render_example(row, "{{literal}} Q: {q} A: {a}")

    assert example.prompt == "{literal} Q: {0} {q.__class__} {{x}} A: "
    assert example.completion == "{a!r}"


def test_none_nan_and_missing_cells_render_as_empty() -> None:
    example = render_example({"instruction": None, "input": float("nan")}, TEMPLATE)

    assert example.prompt == "### Instruction: \n### Input: \n### Output: "
    assert example.completion == ""


def test_non_string_cells_render_with_str() -> None:
    assert render_example({"a": 3, "b": 1.5}, "{a} -> {b}") == Example("3 -> ", "1.5")


def test_labels_mask_the_prompt_and_train_completion_and_eos(tiny_tokenizer: Any) -> None:
    example = render_example(ROWS[0], TEMPLATE)

    (tokenized,) = tokenize([example], tiny_tokenizer, cutoff_len=128)

    ids, labels = tokenized.input_ids, tokenized.labels
    assert ids[0] == tiny_tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == labels[-1] == tiny_tokenizer.eos_token_id
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    # The boundary token " Answer" carries the prompt's trailing space; it is trained.
    assert tiny_tokenizer.decode(trained[:-1]).strip() == example.completion
    prompt_ids = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    assert tiny_tokenizer.decode(prompt_ids, skip_special_tokens=True) == example.prompt.rstrip()
    # Everything after the first trained token is trained: the mask is one prefix.
    first = labels.index(trained[0])
    assert all(label != IGNORE_INDEX for label in labels[first:])


def test_eos_label_survives_padding_when_pad_is_eos(tiny_tokenizer: Any) -> None:
    # SmolLM2's pad token is its EOS: masking by pad id would hide every EOS label.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    examples = tokenize([render_example(row, TEMPLATE) for row in ROWS], tokenizer, cutoff_len=128)

    batch = PadToLongest(tokenizer.pad_token_id)(examples)

    eos = tokenizer.eos_token_id
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch["labels"][row, n - 1].item() == eos
        assert batch["attention_mask"][row, :n].all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == eos).all()
    # Padding goes to the longest example in the batch, not to cutoff_len.
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in examples) < 128


def test_long_examples_are_truncated_without_eos_and_counted(tiny_tokenizer: Any) -> None:
    short = Example("Q: hi\nA: ", "Answer: yes.")
    long = Example("Q: hi\nA: ", "Answer: " + "red green blue " * 20)
    lines: list[str] = []

    result = tokenize([short, long, long], tiny_tokenizer, cutoff_len=24, log=lines.append)

    assert [len(e.input_ids) for e in result][1:] == [24, 24]
    assert result[0].input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.eos_token_id not in result[1].input_ids
    assert "2 truncated to cutoff_len 24" in lines[-1]


def test_examples_with_no_completion_token_left_are_dropped(tiny_tokenizer: Any) -> None:
    fits = Example("Q: hi\nA: ", "Answer: yes.")
    prompt_too_long = Example("red green blue " * 20, "Answer: yes.")
    lines: list[str] = []

    result = tokenize([fits, prompt_too_long], tiny_tokenizer, cutoff_len=16, log=lines.append)

    assert len(result) == 1
    assert "1 dropped" in lines[-1]
    with pytest.raises(PipelineError, match="raise cutoff_len"):
        tokenize([prompt_too_long], tiny_tokenizer, cutoff_len=16)


def test_split_is_seeded_reproducible_and_disjoint(tiny_tokenizer: Any) -> None:
    examples = tokenize(
        [Example(f"Q{i}: ", f"Answer: {i}.") for i in range(50)], tiny_tokenizer, cutoff_len=32
    )
    config = {"train": 0.7, "validation": 0.2}

    train_a, val_a = split(examples, config)
    train_b, val_b = split(list(examples), config)

    assert (len(train_a), len(val_a)) == (35, 10)
    assert [e.input_ids for e in train_a] == [e.input_ids for e in train_b]
    assert [e.input_ids for e in val_a] == [e.input_ids for e in val_b]
    # Every example differs (Q0, Q1, ...): no example is in both.
    assert not {tuple(e.input_ids) for e in train_a} & {tuple(e.input_ids) for e in val_a}
    # Shuffled: the split is not just the first rows.
    assert [e.input_ids for e in train_a] != [e.input_ids for e in examples[:35]]
    other_seed, _ = split(examples, config, seed=7)
    assert [e.input_ids for e in other_seed] != [e.input_ids for e in train_a]


def test_validation_zero_gives_no_eval_set_and_says_evaluation_is_off(
    tiny_tokenizer: Any,
) -> None:
    examples = tokenize([Example("Q: ", "A.")] * 10, tiny_tokenizer, cutoff_len=16)
    lines: list[str] = []

    train, validation = split(examples, {"train": 1.0, "validation": 0.0}, log=lines.append)

    assert (len(train), validation) == (10, [])
    assert "evaluation and early stopping are disabled" in lines[-1]


def test_template_ending_in_eos_text_gets_one_trained_eos(tiny_tokenizer: Any) -> None:
    example = render_example(ROWS[1], "Q: {instruction}\nA: {output}</s>")

    (tokenized,) = tokenize([example], tiny_tokenizer, cutoff_len=128)

    eos = tiny_tokenizer.eos_token_id
    assert tokenized.input_ids.count(eos) == 1
    assert tokenized.input_ids[-1] == tokenized.labels[-1] == eos


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_train_on_inputs_decides_whether_prompt_tokens_are_trained(
    tiny_tokenizer: Any, train_on_inputs: bool
) -> None:
    from shared.schema import DataConfig
    from worker.pipeline.run import render_and_tokenize

    dataset = LoadedDataset(["instruction", "input", "output"], ROWS, "rows")
    config = DataConfig(prompt_template=TEMPLATE, train_on_inputs=train_on_inputs)

    tokenized = render_and_tokenize(dataset, tiny_tokenizer, config, log=lambda line: None)

    prompt_len = len(tiny_tokenizer(render_example(ROWS[0], TEMPLATE).prompt)["input_ids"])
    ids, labels = tokenized[0].input_ids, tokenized[0].labels
    if train_on_inputs:
        assert labels == ids
    else:
        assert labels[: prompt_len - 1] == [IGNORE_INDEX] * (prompt_len - 1)
        assert labels[-1] == ids[-1] == tiny_tokenizer.eos_token_id


def test_cutoff_len_of_the_request_truncates_templated_examples(tiny_tokenizer: Any) -> None:
    from shared.schema import DataConfig
    from worker.pipeline.run import render_and_tokenize

    long_row = {**ROWS[1], "output": "Answer: " + "red green blue " * 20}
    dataset = LoadedDataset(["instruction", "input", "output"], [ROWS[0], long_row], "rows")
    config = DataConfig(prompt_template=TEMPLATE, cutoff_len=32)
    lines: list[str] = []

    tokenized = render_and_tokenize(dataset, tiny_tokenizer, config, log=lines.append)

    # The short row (25 tokens with BOS and EOS) fits; the long one is cut to exactly 32.
    assert [len(e.input_ids) for e in tokenized] == [25, 32]
    assert "1 truncated to cutoff_len 32" in lines[-1]


def test_the_completion_starts_at_the_last_placeholder_of_the_template() -> None:
    assert completion_placeholder("Q: {q} {context} A: {a} (end)") == "a"
    assert completion_placeholder("no placeholder") is None
