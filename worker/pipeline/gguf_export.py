"""The GGUF stage of an export: a merged model converted by llama.cpp's own converter, vendored
in `worker/vendor/llama_cpp` (see VENDORED.md there), run as a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

from worker.pipeline.errors import PipelineError
from worker.pipeline.report import LogFn, no_log

GgufType = Literal["f16", "q8_0"]
GGUF_TYPES: tuple[GgufType, ...] = ("f16", "q8_0")

CONVERTER = (Path(__file__).resolve().parent.parent / "vendor" / "llama_cpp"
             / "convert_hf_to_gguf.py")

# What the converter says when it meets a BPE tokenizer whose pre-tokenizer it does not know
# by hash: llama.cpp would split text differently from the model's own tokenizer.
_UNKNOWN_PRE_TOKENIZER = "BPE pre-tokenizer was not recognized"
_OUTPUT_TAIL_CHARS = 4000
CONVERT_TIMEOUT_S = 4 * 3600


def gguf_file_name(outtype: GgufType) -> str:
    """The file name of an export of this type: what the Modelfile's FROM points at."""
    return f"model-{outtype}.gguf"


def convert_to_gguf(
    merged_dir: Path, output_file: Path, outtype: GgufType, *, scratch_dir: Path,
    log: LogFn = no_log, timeout_s: float = CONVERT_TIMEOUT_S,
) -> Path:
    """Convert the merged checkpoint in `merged_dir` to one GGUF file of `outtype`.

    The converter runs in `scratch_dir` with the hub switched off, so it reads only
    `merged_dir`. It refuses tokenizers it cannot reproduce (unknown BPE pre-tokenizers):
    that is a `PipelineError` saying so; any other failure is a `PipelineError` carrying the
    converter's last output lines, which the caller shows in the job's log.
    """
    if outtype not in GGUF_TYPES:
        raise PipelineError(f"quantization must be one of {list(GGUF_TYPES)}, not {outtype!r}")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    # The converter puts its own gguf-py (vendored beside it) ahead of any installed gguf,
    # whose PyPI releases lag behind what the converter calls: NO_LOCAL_GGUF stays unset.
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(CONVERTER), str(merged_dir.resolve()),
               "--outfile", str(output_file.resolve()), "--outtype", outtype]
    log(f"converting to GGUF {outtype} with llama.cpp's convert_hf_to_gguf.py")
    try:
        done = subprocess.run(
            command, cwd=scratch_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        raise PipelineError(f"GGUF conversion ran past {timeout_s:.0f} s") from None
    if done.returncode != 0 or not output_file.is_file():
        output_file.unlink(missing_ok=True)
        raise PipelineError(_failure_message(done.stdout, done.returncode))
    log(f"GGUF {outtype} written: {output_file.stat().st_size / 1e6:.1f} MB")
    return output_file


def _failure_message(output: str, returncode: int) -> str:
    if _UNKNOWN_PRE_TOKENIZER in output:
        return ("llama.cpp's converter does not know this model's BPE pre-tokenizer, so a "
                "GGUF file would tokenize text differently from the model; export the merged "
                "model instead, or use a base whose tokenizer llama.cpp supports")
    tail = output[-_OUTPUT_TAIL_CHARS:].strip()
    return f"GGUF conversion failed (exit status {returncode}):\n{tail}"
