"""Preference rows in OpenAI's format: rendered with the model's chat template into the prompt /
chosen / rejected texts ORPO and DPO train on, and jobs of either method on them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared.dataset_columns import (
    OPENAI_PREFERENCE_COLUMNS,
)
from shared.dataset_files import LoadedDataset
from shared.settings import Settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.errors import PipelineError
from worker.pipeline.examples import preference_rows
from worker.pipeline.preference_chats import added_bos_text, openai_preference_rows
from worker.pipeline.report import METRIC_KEYS, RecordingReporter
from worker.pipeline.run import run_job

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Peru?"},
]
ROW = {
    "input": {"messages": MESSAGES},
    "preferred_output": [{"role": "assistant", "content": "Lima."}],
    "non_preferred_output": [{"role": "assistant", "content": "I am not sure, maybe Cusco."}],
}


def test_openai_rows_become_the_prompt_with_the_generation_prompt_and_answers_that_stop(
    tiny_tokenizer: Any,
) -> None:
    (pair,) = openai_preference_rows([ROW], tiny_tokenizer, OPENAI_PREFERENCE_COLUMNS)

    # The tiny model's template: "<s>{role}: {content}</s>\n" a turn, "<s>assistant: " as the
    # generation prompt. Its tokenizer writes the first "<s>" itself, so the text leaves it out.
    assert added_bos_text(tiny_tokenizer) == "<s>"
    assert pair == {
        "prompt": "system: Answer briefly.</s>\n<s>user: What is the capital of Peru?</s>\n"
                  "<s>assistant: ",
        "chosen": "Lima.</s>",
        "rejected": "I am not sure, maybe Cusco.</s>",
    }


def test_openai_rows_tokenize_as_the_chat_template_renders_the_whole_conversation(
    tiny_tokenizer: Any,
) -> None:
    (pair,) = openai_preference_rows([ROW], tiny_tokenizer, OPENAI_PREFERENCE_COLUMNS)

    for answer, column in ((pair["chosen"], "preferred_output"),
                           (pair["rejected"], "non_preferred_output")):
        conversation = tiny_tokenizer.apply_chat_template(MESSAGES + ROW[column], tokenize=False)
        # TRL's DPO tokenizes prompt + answer with the tokenizer's special tokens: one BOS, and
        # the template's end-of-turn marker as the last token (the newline after it is not
        # part of the answer).
        assert tiny_tokenizer(pair["prompt"] + answer)["input_ids"] == tiny_tokenizer(
            conversation.rstrip(), add_special_tokens=False)["input_ids"]
        assert conversation.startswith("<s>") and conversation.count("<s>") == 3


def test_earlier_assistant_turns_stay_in_the_prompt_and_the_completion_spelling_is_read(
    tiny_tokenizer: Any,
) -> None:
    turns = [*MESSAGES, {"role": "assistant", "content": "Lima."},
             {"role": "user", "content": "And of Chile?"}]
    row = {"input": {"messages": turns},
           "preferred_completion": [{"role": "assistant", "content": "Santiago."}],
           "non_preferred_completion": [{"role": "assistant", "content": "Lima."}]}
    dataset = LoadedDataset(list(row), [row], "prefs.jsonl")
    lines: list[str] = []

    (pair,) = preference_rows(dataset, tiny_tokenizer, method="DPO", cutoff_len=256,
                              log=lines.append)

    assert pair["prompt"].endswith("<s>assistant: Lima.</s>\n<s>user: And of Chile?</s>\n"
                                   "<s>assistant: ")
    assert (pair["chosen"], pair["rejected"]) == ("Santiago.</s>", "Lima.</s>")
    assert "in OpenAI's format (input, preferred_completion, non_preferred_completion)" \
        in lines[0]


def test_tools_of_the_input_reach_the_chat_template(tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}{{ '<s>tools: ' + tools | map(attribute='function.name') | join(',') "
        "+ '</s>\n' }}{% endif %}" + tiny_tokenizer.chat_template
    )
    tool = {"type": "function", "function": {"name": "capital_of", "parameters": {}}}
    row = {**ROW, "input": {"messages": MESSAGES, "tools": [tool]}}

    (pair,) = openai_preference_rows([row], tokenizer, OPENAI_PREFERENCE_COLUMNS)

    assert pair["prompt"].startswith("tools: capital_of</s>\n<s>system: Answer briefly.")
    assert pair["chosen"] == "Lima.</s>"


@pytest.mark.parametrize(("change", "message"), [
    ({"input": [{"role": "user", "content": "hi"}]}, "row 2: input must be an object"),
    ({"input": {"messages": []}}, "row 2: messages must be a non-empty list"),
    ({"input": {"messages": MESSAGES, "tools": "capital_of"}}, "row 2: input.tools must be"),
    ({"preferred_output": "Lima."}, "row 2: preferred_output must be a list of one"),
    ({"non_preferred_output": [{"role": "user", "content": "x"}]},
     "row 2: non_preferred_output must be a list of one"),
    ({"preferred_output": [{"role": "assistant", "content": "a"}] * 2},
     "row 2: preferred_output must be a list of one"),
])
def test_a_row_not_in_the_format_names_its_number_and_field(
    tiny_tokenizer: Any, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(PipelineError, match=message):
        openai_preference_rows([ROW, {**ROW, **change}], tiny_tokenizer,
                               OPENAI_PREFERENCE_COLUMNS)


def test_long_conversations_and_answers_are_cut_before_rendering(tiny_tokenizer: Any) -> None:
    long = {**ROW, "preferred_output": [{"role": "assistant", "content": "x" * 5000}]}

    (pair,) = openai_preference_rows([long], tiny_tokenizer, OPENAI_PREFERENCE_COLUMNS,
                                     max_chars=100, max_turns=8)

    assert pair["chosen"] == "x" * 100 + "</s>"


def write_openai_preferences(path: Path, n: int = 16) -> Path:
    """`n` alpaca sample rows as OpenAI preference rows: the sample's answer preferred over a
    wordy non-answer."""
    rows = [json.loads(line) for line in DATASET_PATH.read_text().splitlines()[:n]]
    with path.open("w") as out:
        for row in rows:
            question = f"{row['instruction']} {row['input']}".strip()
            out.write(json.dumps({
                "input": {"messages": [{"role": "user", "content": question}]},
                "preferred_output": [{"role": "assistant", "content": row["output"]}],
                "non_preferred_output": [{"role": "assistant",
                                          "content": "Well, it is hard to say, really."}],
            }) + "\n")
    return path


@pytest.mark.parametrize(("method", "keys"), [
    ("ORPO", {"nll_loss", "log_odds_ratio", "reward_margin"}),
    ("DPO", {"reward_chosen", "reward_rejected", "reward_margin"}),
])
def test_orpo_and_dpo_jobs_train_on_openai_preference_rows(
    tmp_path: Path, make_request: Any, tiny_model_dir: Path, method: str, keys: set[str]
) -> None:
    data_path = write_openai_preferences(tmp_path / "prefs.jsonl")
    settings = Settings(data_dir=tmp_path / "data",
                        allowed_local_dirs=[tmp_path, tiny_model_dir.parent], cpu_bf16="off")
    request = make_request(
        data_path, data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"preference_optimization": method, "beta": 0.5},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert result.steps == 4  # 16 pairs in batches of 4
    for _step, values in reporter.metrics:
        assert set(values) <= METRIC_KEYS and keys <= set(values)
    lines = "\n".join(reporter.lines)
    assert f"{method}: the prompt_template is not used; 16 preference pairs in OpenAI's format" \
        in lines
    assert f"{method}: beta 0.5, max_length 64 tokens" in lines
    margins = reporter.values("reward_margin")
    assert margins[-1] > margins[0]
    if method == "ORPO":
        # beta weighs ORPO's odds-ratio term next to the supervised loss.
        for _step, values in reporter.metrics:
            assert values["loss"] == pytest.approx(
                values["nll_loss"] - 0.5 * values["log_odds_ratio"], rel=1e-3)
