"""`POST /v1/datasets/{id}/preview` for chat rows and with a model_path: the text preview
never shows a Python repr, and a local model folder's tokenizer and chat template show each
example token by token, where the loss applies and what cutoff_len cuts.

The model folder here is a tokenizer alone, built with `tokenizers` (no torch, as in the API
image); tests/worker/test_token_preview_parity.py holds the view to the worker's pipeline on
real models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_datasets import upload_ok

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And of Chile?"},
    {"role": "assistant", "content": "Santiago."},
]
TEMPLATE_ROWS = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}"} for i in range(3)]


def tokenizer_folder(dest: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A model folder as far as the preview reads it: tokenizer.json (byte-level BPE that puts
    a BOS in front, like Llama's), tokenizer_config.json and chat_template.jinja."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [json.dumps(r) for r in TEMPLATE_ROWS] + [t["content"] for t in CONVERSATION]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    dest.mkdir(parents=True)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template is not None:
        (dest / "chat_template.jinja").write_text(chat_template)
    return dest


@pytest.fixture
def model_dir(tunery_env: Path) -> Path:
    # tunery_env allows its tmp_path (the data dir's parent) as a local dir.
    return tokenizer_folder(tunery_env.parent / "tokenizer-model")


def preview(client: TestClient, dataset_id: str, **body: Any) -> Any:
    return client.post(f"/v1/datasets/{dataset_id}/preview", json=body)


def chat_dataset(client: TestClient, rows: list[Any] | None = None) -> str:
    rows = rows if rows is not None else [{"messages": CONVERSATION}]
    return upload_ok(client, "jsonl", rows)["id"]


def text_of(parts: list[dict[str, str]], kind: str) -> list[str]:
    return [p["text"] for p in parts if p["kind"] == kind]


def test_chat_rows_preview_as_role_lines_with_the_last_assistant_turn_as_completion(
    client: TestClient,
) -> None:
    response = preview(client, chat_dataset(client), prompt_template="{messages}")

    assert response.status_code == 200, response.text
    body = response.json()
    (example,) = body["examples"]
    assert example["prompt"] == (
        "system: Answer briefly.\nuser: What is the capital of Peru?\nassistant: Lima.\n"
        "user: And of Chile?\nassistant: "
    )
    assert example["completion"] == "Santiago."
    assert example["problem"] is None and example["tokens"] is None
    assert "every assistant turn" in body["message"]
    assert "only with model_path" in body["message"]


def test_chat_rows_that_are_not_turns_or_lack_an_assistant_turn_name_the_problem(
    client: TestClient,
) -> None:
    rows = [{"messages": "user: hi"}, {"messages": CONVERSATION[:2]}]

    examples = preview(client, chat_dataset(client, rows),
                       prompt_template="{messages}").json()["examples"]

    assert examples[0]["prompt"] == examples[0]["completion"] == ""
    assert "row 1: messages must be a non-empty list" in examples[0]["problem"]
    assert examples[1]["completion"] == ""
    assert "row 2 has no assistant turn" in examples[1]["problem"]


def test_a_local_model_path_shows_the_tokens_the_completion_trains_and_its_eos(
    client: TestClient, model_dir: Path,
) -> None:
    dataset_id = upload_ok(client, "jsonl", TEMPLATE_ROWS)["id"]

    response = preview(client, dataset_id, prompt_template="Q: {instruction}\nA: {output}",
                       model_path=str(model_dir), n=1)

    assert response.status_code == 200, response.text
    (example,) = response.json()["examples"]
    tokens = example["tokens"]
    shown = tokens["first_tokens"]
    assert shown[0] == {"position": 0, "id": 1, "text": BOS, "trained": False}
    assert shown[-1] == {"position": len(shown) - 1, "id": 2, "text": EOS, "trained": True}
    # Byte-level BPE writes " 0" as one token: it straddles the prompt's end, so it counts as
    # completion and the answer's first token is trained.
    assert "".join(t["text"] for t in shown if t["trained"]) == " 0" + EOS
    assert tokens["token_count"] == tokens["kept_tokens"] == len(shown)
    assert tokens["trained_tokens"] == 2 and tokens["dropped"] is False
    assert tokens["parts"] == [{"text": "Q: Add 0 and 0.\nA:", "kind": "ignored"},
                               {"text": " 0", "kind": "trained"}]


def test_cutoff_len_cuts_the_tokens_and_a_prompt_that_fills_it_leaves_the_example_out(
    client: TestClient, model_dir: Path,
) -> None:
    dataset_id = upload_ok(client, "jsonl", TEMPLATE_ROWS)["id"]

    (example,) = preview(client, dataset_id, prompt_template="Q: {instruction}\nA: {output}",
                         model_path=str(model_dir), cutoff_len=4, n=1).json()["examples"]

    tokens = example["tokens"]
    assert tokens["kept_tokens"] == 4 < tokens["token_count"]
    assert [t["position"] for t in tokens["first_tokens"]] == [0, 1, 2, 3]
    assert tokens["last_tokens"] == []
    assert tokens["dropped"] is True and tokens["trained_tokens"] == 0
    assert text_of(tokens["parts"], "cut")[-1].endswith("A: 0")
    assert "within cutoff_len 4" in example["problem"]


def test_a_chat_preview_with_a_model_trains_each_assistant_turn_through_its_template(
    client: TestClient, model_dir: Path,
) -> None:
    response = preview(client, chat_dataset(client), prompt_template="{messages}",
                       model_path=str(model_dir))

    assert response.status_code == 200, response.text
    (example,) = response.json()["examples"]
    parts = example["tokens"]["parts"]
    # The template's own BOS and end markers, the turns' contents, nothing else.
    assert "".join(p["text"] for p in parts) == (
        "<s>system: Answer briefly.</s>\nuser: What is the capital of Peru?</s>\n"
        "assistant: Lima.</s>\nuser: And of Chile?</s>\nassistant: Santiago.</s>\n"
    )
    assert text_of(parts, "trained") == ["Lima.</s>", "Santiago.</s>"]
    assert example["tokens"]["first_tokens"][0]["text"] == BOS  # written by the template
    assert "through the model's chat template" in response.json()["message"]


def test_train_on_inputs_trains_every_kept_token(client: TestClient, model_dir: Path) -> None:
    (example,) = preview(client, chat_dataset(client), prompt_template="{messages}",
                         model_path=str(model_dir), train_on_inputs=True).json()["examples"]

    tokens = example["tokens"]
    assert tokens["trained_tokens"] == tokens["kept_tokens"]
    assert [p["kind"] for p in tokens["parts"]] == ["trained"]


def test_a_chat_template_that_refuses_a_conversation_names_the_row_problem(
    client: TestClient, tunery_env: Path,
) -> None:
    strict = ("{% if messages[0]['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}" + CHAT_TEMPLATE)
    folder = tokenizer_folder(tunery_env.parent / "strict", chat_template=strict)

    (example,) = preview(client, chat_dataset(client), prompt_template="{messages}",
                         model_path=str(folder)).json()["examples"]

    assert example["tokens"] is None
    assert "System role not supported" in example["problem"]


def test_a_hub_model_path_keeps_the_text_preview_and_says_tokens_need_a_local_folder(
    client: TestClient,
) -> None:
    response = preview(client, chat_dataset(client), prompt_template="{messages}",
                       model_path="HuggingFaceTB/SmolLM2-135M-Instruct")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["examples"][0]["completion"] == "Santiago."
    assert body["examples"][0]["tokens"] is None
    assert "hub id" in body["message"] and "local model folder" in body["message"]


@pytest.mark.parametrize(
    ("model_path", "expected"),
    [
        ("/etc", "outside the directories this server allows"),
        ("relative/../../x", "neither an absolute local path"),
        ("https://example.com/model", "a URL is not allowed here"),
        ("ds_0123456789abcdef0123456789abcdef", "is a dataset id, not a model"),
    ],
)
def test_a_model_path_a_job_would_refuse_is_422_naming_model_path(
    client: TestClient, model_path: str, expected: str,
) -> None:
    response = preview(client, chat_dataset(client), prompt_template="{messages}",
                       model_path=model_path)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["fields"][0]["path"] == "model_path"
    assert expected in error["fields"][0]["message"]


def test_a_folder_without_a_tokenizer_or_a_chat_template_is_422_saying_which(
    client: TestClient, tunery_env: Path,
) -> None:
    empty = tunery_env.parent / "weights-only"
    empty.mkdir()
    no_template = tokenizer_folder(tunery_env.parent / "plain", chat_template=None)
    dataset_id = chat_dataset(client)

    missing = preview(client, dataset_id, prompt_template="{messages}", model_path=str(empty))
    plain = preview(client, dataset_id, prompt_template="{messages}", model_path=str(no_template))

    assert missing.status_code == plain.status_code == 422
    assert "has no tokenizer.json" in missing.json()["error"]["message"]
    assert "has no chat template" in plain.json()["error"]["message"]


def test_importing_the_api_does_not_import_the_preview_tokenizer_libraries() -> None:
    code = ("import sys, api.main; "
            "print([m for m in ('tokenizers', 'jinja2') if m in sys.modules])")

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"
