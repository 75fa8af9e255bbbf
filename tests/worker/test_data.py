"""Loading, rendering, tokenizing and splitting training data."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.pipeline.batching import PadToLongest
from worker.pipeline.data import (
    IGNORE_INDEX,
    Example,
    LoadedDataset,
    load_dataset,
    render_example,
    render_examples,
    split,
    tokenize,
)
from worker.pipeline.errors import PipelineError

TEMPLATE = "### Instruction: {instruction}\n### Input: {input}\n### Output: {output}"
ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "Answer: 5."},
    {"instruction": "Name a colour.", "input": "", "output": "Answer: red."},
]


def _load(path: Path | str, allowed: Path, **kwargs: Any) -> LoadedDataset:
    return load_dataset(
        str(path), allowed_local_dirs=[allowed], download_dir=allowed / "dl", **kwargs
    )


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


def test_missing_template_column_error_lists_placeholders_and_columns() -> None:
    dataset = LoadedDataset(["question", "answer"], [{"question": "q", "answer": "a"}], "x")

    with pytest.raises(PipelineError) as info:
        render_examples(dataset, "Q: {question} {context} A: {response}")

    message = str(info.value)
    assert "['context', 'response']" in message
    assert "['question', 'context', 'response']" in message
    assert "['question', 'answer']" in message


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
    assert not {id(e) for e in train_a} & {id(e) for e in val_a}
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


def test_unparseable_jsonl_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + '\n{"instruction": "x",\n')

    with pytest.raises(PipelineError, match=r"train\.jsonl line 4: invalid JSON"):
        _load(path, tmp_path)


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")

    with pytest.raises(PipelineError, match="line 2: expected a JSON object"):
        _load(path, tmp_path)


def test_csv_row_with_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("instruction,input,output\na,b,c\nd,e\n")

    with pytest.raises(PipelineError, match=r"train\.csv line 3"):
        _load(path, tmp_path)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        lines = [",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_each_local_format_loads_rows_and_columns(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, ROWS)

    dataset = _load(path, tmp_path)

    assert dataset.columns == ["instruction", "input", "output"]
    assert [dict(r) for r in dataset.rows] == ROWS


def test_json_lines_in_a_dot_json_file_load(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    assert len(_load(path, tmp_path).rows) == 2


def test_a_directory_loads_all_its_data_files_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    _write(folder / "b.csv", ROWS[1:])
    _write(folder / "a.jsonl", ROWS[:1])
    (folder / "notes.txt").write_text("not data")

    dataset = _load(folder, tmp_path)

    assert [dict(r) for r in dataset.rows] == ROWS


def test_local_file_outside_allowed_dirs_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    path = _write(tmp_path / "d.jsonl", ROWS)

    with pytest.raises(PipelineError, match="outside the directories"):
        _load(path, allowed)


def test_missing_local_file_is_a_pipeline_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        _load(tmp_path / "nope.jsonl", tmp_path)


def _client(handler: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_url_download_reads_format_from_file_name(tmp_path: Path) -> None:
    body = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=body, headers={"content-type": "binary/octet-stream"})

    url = "https://bucket.example.com/data/train.jsonl?X-Amz-Signature=secret"
    dataset = _load(url, tmp_path, source_type="s3_presigned_link", client=_client(handler))

    assert seen == [url]
    assert [dict(r) for r in dataset.rows] == ROWS
    assert "secret" not in dataset.origin
    assert (tmp_path / "dl" / "dataset.jsonl").is_file()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/csv; charset=utf-8", b"instruction,input,output\na,b,c\n"),
        ("application/octet-stream", b'[{"instruction": "a", "input": "b", "output": "c"}]'),
    ],
)
def test_url_without_extension_uses_content_type_then_content(
    tmp_path: Path, content_type: str, body: bytes
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    dataset = _load("https://x.example.com/download?id=3", tmp_path, client=_client(handler))

    assert [dict(r) for r in dataset.rows] == [{"instruction": "a", "input": "b", "output": "c"}]


def test_expired_presigned_url_error_hides_the_signature(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, content=b"Request has expired")

    url = "https://bucket.example.com/train.jsonl?X-Amz-Signature=secret"
    with pytest.raises(PipelineError) as info:
        _load(url, tmp_path, client=_client(handler))

    assert "HTTP 403" in str(info.value) and "expired" in str(info.value)
    assert "secret" not in str(info.value)


def test_presigned_source_type_needs_a_url(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ROWS)

    with pytest.raises(PipelineError, match="needs an https URL"):
        _load(path, tmp_path, source_type="s3_presigned_link")


def test_unreachable_hub_dataset_is_a_clear_pipeline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="could not load hub dataset tatsu-lab/alpaca"):
        load_dataset("tatsu-lab/alpaca", allowed_local_dirs=[], download_dir=tmp_path)


def test_hub_id_that_names_a_local_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # datasets.load_dataset("data/set") would read ./data/set: a way around allowed_local_dirs.
    (tmp_path / "data" / "set").mkdir(parents=True)
    _write(tmp_path / "data" / "set" / "x.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="also a path on the worker"):
        load_dataset("data/set", allowed_local_dirs=[], download_dir=tmp_path / "dl")


@pytest.mark.parametrize("name", ["text", "json", "csv"])
def test_a_bare_dataset_name_is_refused_by_the_worker_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A stored payload skips the API's check. datasets.load_dataset("text") is a packaged
    # builder that would read every text file under the current directory.
    _write(tmp_path / "secret.txt", ROWS)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="hub datasets are named 'owner/name'"):
        load_dataset(name, allowed_local_dirs=[], download_dir=tmp_path / "dl")


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
