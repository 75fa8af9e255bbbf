"""Inputs for `bench/gpu/vllm_serve.sh`, made where Tunery is installed (`make install`; a CPU
is enough, about two minutes): SmolLM2-135M-Instruct as a plain checkpoint and a real Tunery
job's adapter trained on it, laid out in a `file://` store as the worker publishes it.

    .venv/bin/python -m bench.gpu.prepare_vllm_inputs bench/results/tmp/vllm-inputs

writes DIR/base/ (the model), DIR/storage/jobs/<job id>/ (the adapter's two files) and
DIR/inputs.json: the job id, and the base as the adapter names it (its job's model_path, a
path on this machine), which vllm_serve.sh serves under that name.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path

from shared.schema import FinetuneRequest
from shared.served_models import adapter_keys
from shared.settings import Settings
from shared.storage import LocalStorage
from worker.assets.build_dataset import DATASET_PATH

TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"


def adapter_request(base_dir: Path) -> FinetuneRequest:
    """A short job with a learning rate high enough that the adapter visibly moves the base's
    next-token probabilities, which is what vllm_serve.sh checks it served."""
    return FinetuneRequest.model_validate({
        "pretrainedmodel_config": {"model_path": str(base_dir), "use_lora": True, "lora_r": 16,
                                   "lora_alpha": 32, "lora_dropout": 0.0},
        "data_config": {"data_path": str(DATASET_PATH), "prompt_template": TEMPLATE,
                        "cutoff_len": 128,
                        "data_split_config": {"train": 0.05, "validation": 0.01}},
        "training_config": {"num_train_epochs": 1, "learning_rate": 0.002, "warmup_steps": 1,
                            "lr_scheduler_type": "linear"},
        "logging_config": {"use_wandb": False},
    })


def prepare(out: Path) -> dict[str, str]:
    # Before huggingface_hub is imported: everything is local, a hub lookup must fail at once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from worker.assets.smollm2 import prepare_smollm2
    from worker.pipeline.report import RecordingReporter
    from worker.pipeline.run import run_job

    out = out.resolve()
    base_dir = prepare_smollm2(out / "base")
    settings = Settings(data_dir=out / "data",
                        allowed_local_dirs=[base_dir.parent, DATASET_PATH.parent])
    result = run_job(adapter_request(base_dir), out / "work", RecordingReporter(), settings)
    job_id = str(uuid.uuid4())
    storage = LocalStorage(out / "storage")
    for file_name, key in adapter_keys(job_id).items():
        storage.put_file(key, result.output_dir / file_name)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    inputs = {"job_id": job_id, "base_model": config["base_model_name_or_path"]}
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2) + "\n")
    print(f"{result.steps} steps, loss {result.first_loss} -> {result.last_loss}; "
          f"adapter of job {job_id} in {out / 'storage'}")
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    prepare(parser.parse_args().out)


if __name__ == "__main__":
    main()
