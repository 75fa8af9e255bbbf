#!/usr/bin/env bash
# A job on several GPUs, for real: run on a host with 2 or more NVIDIA GPUs and the worker's
# environment (CUDA PyTorch and the project installed, as in Dockerfile.worker), from the
# repository root:
#
#   PY=/path/to/python bash bench/gpu/multi_device.sh
#
# 1. the process-group tests on GPUs: DDP over NCCL trains as one process with the double
#    batch, cancel and pause stop every rank at one step, a killed rank loses the attempt and
#    the next resumes, FSDP2 trains as DDP does;
# 2. bench/scaling.py: tokens/s on 1 GPU and on all of them, SmolLM2-135M, and the efficiency.
# Results go to $OUT (the device tool's folder) or bench/results.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then
  echo "needs 2 or more GPUs; torch sees $GPUS" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
"$PY" -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"

"$PY" -m pytest tests/worker/test_device_group.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/test_device_group.txt"
"$PY" -m bench.scaling --devices "1,$GPUS" --global-batch $((8 * GPUS)) \
  --results-dir "$OUT" 2>&1 | tee "$OUT/scaling.txt"
