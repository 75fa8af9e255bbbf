"""`tunery demo`: one real fine-tuning job through the HTTP API on the embedded stack, then
the model it trained, called.

It starts the API, a worker and the inference engine as child processes (SQLite, the SQLite
broker, local storage under `<data dir>/demo`, a data dir of its own that each run starts
afresh), creates a key, submits a MonsterAPI payload that fine-tunes SmolLM2-135M-Instruct on
the bundled conversations (chat mode: the model's own chat template), follows the job,
downloads the adapter through the API, and asks the base and the fine-tuned model the same
questions through `POST /v1/chat/completions`, side by side.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from cli.local_stack import LocalStack, free_port
from cli.process_commands import tunery_command
from shared.dataset_columns import MESSAGES_COLUMN
from shared.private_files import make_private_dir
from shared.settings import get_settings
from worker.assets.build_dataset import CHAT_DATASET_PATH, as_conversation

# Written into the folder the demo creates: only a folder holding it is ever deleted.
DEMO_MARKER = ".tunery-demo"
TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
QUESTIONS = [
    ("What is the capital of Japan?", ""),
    ("Reverse the order of the words.", "blue green red"),
    ("What is 17 plus 25?", ""),
]


class DemoDirTaken(Exception):
    """The demo's folder exists and the demo did not create it."""


def fresh_demo_dir(path: Path) -> Path:
    """`path`, empty, marked as the demo's own. A `path` left by an earlier demo is cleared;
    any other existing `path` is left alone (`DemoDirTaken`)."""
    if path.exists():
        if not (path / DEMO_MARKER).is_file():
            raise DemoDirTaken(f"{path} exists and was not made by `tunery demo`; it is left "
                               "as it is: move it away, or set TUNERY_DATA_DIR to another dir")
        shutil.rmtree(path)
    make_private_dir(path)
    (path / DEMO_MARKER).write_text("made by `tunery demo`, which clears it on its next run\n")
    return path


def prepare_model(models_dir: Path, tiny: bool) -> Path:
    if tiny:
        from worker.assets.tiny_model import build_tiny_llama

        return build_tiny_llama(models_dir / "tiny-llama")
    from worker.assets.smollm2 import prepare_smollm2

    return prepare_smollm2(models_dir / "smollm2-135m-instruct")


def demo_payload(model_dir: Path, tiny: bool) -> dict[str, Any]:
    return {
        "pretrainedmodel_config": {
            "model_path": str(model_dir),
            "use_lora": True,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
        },
        "data_config": {
            "data_path": str(CHAT_DATASET_PATH),
            "data_subset": "default",
            # Chat mode: conversations rendered by the model's chat template, the format
            # /v1/chat/completions asks the served model in.
            "prompt_template": "{" + MESSAGES_COLUMN + "}",
            "cutoff_len": 256,
            "data_split_config": {"train": 0.9, "validation": 0.1},
        },
        "training_config": {
            "num_train_epochs": 1,
            "learning_rate": 0.005 if tiny else 0.001,
            "warmup_steps": 5,
            "lr_scheduler_type": "cosine",
            "gradient_accumulation_steps": 1,
            "group_by_length": True,
        },
        "logging_config": {"use_wandb": False},
    }


def create_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        tunery_command("keys", "create", "--name", "demo", "--quiet"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def follow(client: httpx.Client, job_id: str) -> dict[str, Any]:
    seen = 0
    while True:
        job = client.get(f"/v1/finetune/llm/{job_id}").json()
        logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 10000}).json()
        for line in logs["logs"][seen:]:
            print(f"  | {line}")
        seen = len(logs["logs"])
        if job["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return job
        time.sleep(1.0)


def download(client: httpx.Client, job_id: str, dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for artifact in client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"]:
        with client.stream("GET", artifact["download_url"]) as response:
            response.raise_for_status()
            with (dest / artifact["name"]).open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        total += artifact["size"]
    return total


def served_answers(client: httpx.Client, base: str, tuned: str) -> list[tuple[str, str, str]]:
    """(question, base answer, fine-tuned answer) for each of QUESTIONS, greedy, as the
    served models give them through /v1/chat/completions."""

    def ask(model: str, question: tuple[str, str]) -> str:
        user = as_conversation({"instruction": question[0], "input": question[1],
                                "output": ""})["messages"][0]
        answer = client.post("/v1/chat/completions", json={
            "model": model, "messages": [user], "max_tokens": 48, "temperature": 0})
        answer.raise_for_status()
        return str(answer.json()["choices"][0]["message"]["content"]).strip()

    return [(f"{q} {i}".strip(), ask(base, (q, i)), ask(tuned, (q, i))) for q, i in QUESTIONS]


def answers(model_dir: Path, adapter_dir: Path) -> list[tuple[str, str, str]]:
    """(question, base, fine-tuned) greedy answers through the alpaca TEMPLATE, from the
    model and adapter files themselves (no service)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.assets.generate import generate_answer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)

    def ask(model: Any) -> list[str]:
        return [generate_answer(model, tokenizer, q, TEMPLATE, input_text=i) for q, i in QUESTIONS]

    base_answers = ask(base)
    tuned_answers = ask(PeftModel.from_pretrained(base, adapter_dir))
    return [(f"{q} {i}".strip(), b, t)
            for (q, i), b, t in zip(QUESTIONS, base_answers, tuned_answers, strict=True)]


def print_side_by_side(rows: list[tuple[str, str, str]]) -> None:
    width = 44
    print(f"\n{'question':<28} | {'base model':<{width}} | fine-tuned")
    print("-" * (28 + 2 * width + 6))
    for question, base, tuned in rows:
        b = textwrap.wrap(base.replace("\n", " ") or "(empty)", width)
        t = textwrap.wrap(tuned.replace("\n", " ") or "(empty)", width)
        q = textwrap.wrap(question, 28)
        for k in range(max(len(b), len(t), len(q))):
            print(
                f"{(q[k] if k < len(q) else ''):<28} | {(b[k] if k < len(b) else ''):<{width}}"
                f" | {t[k] if k < len(t) else ''}"
            )
        print()


def run_demo(tiny: bool = False) -> int:
    started = time.monotonic()
    random.seed(0)
    data_dir = get_settings().data_dir
    try:
        demo_dir = fresh_demo_dir(data_dir / "demo")
    except DemoDirTaken as exc:
        print(f"tunery demo: {exc}")
        return 1
    models_dir = data_dir / "models"
    print("1/5 preparing the base model (offline, from the bundled package)")
    model_dir = prepare_model(models_dir, tiny)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env.update(
        {
            "TUNERY_DATA_DIR": str(demo_dir),
            "TUNERY_ALLOWED_LOCAL_DIRS": json.dumps([str(CHAT_DATASET_PATH.parent),
                                                     str(models_dir)]),
            # The base is offered for inference too, to compare with.
            "TUNERY_INFERENCE_BASE_MODELS": json.dumps([str(model_dir)]),
        }
    )
    print(f"2/5 starting the embedded stack (API, worker, inference engine) under {demo_dir}")
    with LocalStack(env=env, log_dir=demo_dir / "logs", inference=True,
                    engine_port=free_port()) as stack:
        key = create_key(env)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
            payload = demo_payload(model_dir, tiny)
            print(f"3/5 POST {stack.base_url}/v1/finetune/llm  (model {model_dir.name})")
            submitted = client.post("/v1/finetune/llm", json=payload)
            if submitted.status_code != 201:
                print(f"submission refused: {submitted.text}")
                return 1
            job_id = submitted.json()["job_id"]
            job = follow(client, job_id)
            if job["status"] != "COMPLETED":
                print(f"job {job_id} ended {job['status']}: {job['error']}")
                print(f"service logs: {demo_dir / 'logs'}")
                return 1
            adapter_dir = demo_dir / "downloads" / job_id
            print(f"4/5 downloading the adapter through the API to {adapter_dir}")
            size = download(client, job_id, adapter_dir)
            metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
            print(f"5/5 asking the base and the fine-tuned model through POST "
                  f"{stack.base_url}/v1/chat/completions (model: {job_id})")
            rows = served_answers(client, str(model_dir), job_id)
    print_side_by_side(rows)
    result = job["result"]
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    print(
        f"job {job_id}: COMPLETED in {result['steps']} optimizer steps "
        f"on {result['train_rows']} training rows ({result['eval_rows']} held out)"
    )
    print(f"training loss: first step {result['first_loss']:.3f} -> "
          f"last step {result['last_loss']:.3f}")
    eval_losses = [(m["step"], m["values"]["eval_loss"]) for m in metrics
                   if "eval_loss" in m["values"]]
    if eval_losses:
        (s0, e0), (s1, e1) = eval_losses[0], eval_losses[-1]
        print(f"validation loss: step {s0} {e0:.3f} -> step {s1} {e1:.3f}")
    print(f"adapter: {adapter_bytes / 1e6:.2f} MB (all files {size / 1e6:.2f} MB) in {adapter_dir}")
    print(f"demo wall time: {time.monotonic() - started:.0f} s")
    return 0
