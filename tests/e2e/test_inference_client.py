"""Train, then call: the official `openai` client, unchanged, asks real API, worker and
inference-engine processes for a fine-tuned model's answers, streamed and not, and the answer
is the fine-tuned model's own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import NotFoundError, OpenAI

from cli.local_stack import LocalStack, free_port
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env
from tests.e2e.test_openai_client import wait_for

# The house style the job teaches. It starts with a character the tiny tokenizer never merges
# with the space before it: the tiny chat template's generation prompt ends in that space, so
# an answer trained as " Answer" would begin with a token the prompt never ends in.
STYLE = "[["
QUESTION = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say the number 7."}]


def chat_file(path: Path, n: int) -> Path:
    lines = [json.dumps({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Say the number {i}."},
        {"role": "assistant", "content": f"[[{i}]]"},
    ]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[LocalStack, dict[str, str]]]:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0",
                    TUNERY_INFERENCE_BASE_MODELS=json.dumps([str(tiny_model_dir)]))
    local = LocalStack(env=env, log_dir=tmp_path / "logs", inference=True,
                       engine_port=free_port())
    local.__enter__()
    yield local, local.env
    local.stop()
    for log in sorted((tmp_path / "logs").glob("*.log")):
        print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")


def test_the_openai_client_calls_the_model_it_trained_streamed_and_not(
        tmp_path: Path, tiny_model_dir: Path, stack: tuple[LocalStack, dict[str, str]]) -> None:
    local, env = stack
    client = OpenAI(api_key=create_key(env), base_url=f"{local.base_url}/v1", max_retries=0)
    training = client.files.create(file=chat_file(tmp_path / "train.jsonl", 40).open("rb"),
                                   purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=training.id, suffix="terse", seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 12, "batch_size": 4, "learning_rate_multiplier": 10}}})
    done = wait_for(client, job.id, lambda j: j.status in ("succeeded", "failed"), 600)
    assert done.status == "succeeded", done.error
    model = done.fine_tuned_model
    assert model is not None and model.startswith(f"ft:{tiny_model_dir}:")
    assert model in [m.id for m in client.models.list()]
    assert client.models.retrieve(model).id == model

    tuned = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8,
                                           temperature=0)
    base = client.chat.completions.create(model=str(tiny_model_dir), messages=QUESTION,
                                          max_tokens=8, temperature=0)
    answer = tuned.choices[0].message.content or ""
    assert tuned.model == model and tuned.usage is not None
    assert tuned.usage.completion_tokens > 0 and tuned.usage.prompt_tokens > 0
    assert STYLE in answer, answer
    assert STYLE not in (base.choices[0].message.content or "")

    started = time.monotonic()
    streamed = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in streamed:
        assert chunk.model == model
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == answer
    assert usage is not None and usage.completion_tokens == tuned.usage.completion_tokens
    assert time.monotonic() - started < 300

    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="ft:someone-else:x::deadbeef", messages=QUESTION)
