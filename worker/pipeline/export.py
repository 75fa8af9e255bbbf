"""The export stage: the adapter and the tokenizer, nothing else, written locally; they leave
the worker in `worker.publish`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from shared.storage_keys import ADAPTER_FILES
from worker.pipeline.lora_init import initial_adapter, write_initial_adapter_dir
from worker.pipeline.report import LogFn, no_log

__all__ = ["ADAPTER_FILES", "export_adapter"]


def export_adapter(
    model: Any, tokenizer: Any, output_dir: Path, *, base_model: str, log: LogFn = no_log,
    state_dict: dict[str, Any] | None = None, work_dir: Path | None = None,
) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` and the tokenizer files.

    `adapter_config.json` names its base `base_model`: the model_path the user gave, a hub id
    their machine can load too, or the local path they chose; never the directory this worker
    resolved it to. `output_dir` is emptied first, so a retried attempt never uploads a stale
    file. `state_dict`: the trainable weights when the model holds only shards of them (FSDP;
    `ranks.adapter_state`).

    A PiSSA/OLoRA adapter is trained against a base residual (`lora_init`); it is exported
    converted to a plain LoRA adapter of twice the rank for the original base, through peft's
    `path_initial_model_for_weight_conversion` and the job's initial adapter, which is
    written under `work_dir` (the output's parent when None).
    """
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model
    conversion: dict[str, Any] = {}
    if initial_adapter(model) is not None:
        initial_dir = (work_dir or output_dir.parent) / "initial-adapter-for-conversion"
        if initial_dir.exists():
            shutil.rmtree(initial_dir)
        conversion["path_initial_model_for_weight_conversion"] = str(
            write_initial_adapter_dir(model, initial_dir))
    model.save_pretrained(output_dir, safe_serialization=True, state_dict=state_dict,
                          **conversion)
    if conversion:
        log("adapter converted for the original base (PiSSA/OLoRA initial adapter subtracted;"
            " rank doubled)")
    # peft's generated model card carries nothing the client needs.
    (output_dir / "README.md").unlink(missing_ok=True)
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"peft did not write {missing} to {output_dir}")
    tokenizer.save_pretrained(output_dir)
    size = sum(p.stat().st_size for p in output_dir.iterdir() if p.is_file())
    log(f"adapter and tokenizer saved: {size / 1e6:.1f} MB")
    return output_dir
