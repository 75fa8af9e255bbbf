#!/usr/bin/env bash
# Tunery's production serving path on one GPU, end to end: `vllm serve` with Tunery's LoRA
# resolver plugin (deploy/vllm) loads a real Tunery adapter from storage by its name,
# `tunery-job-<job id>`, answers chat completions with it and with the base, refuses requests
# without the API key and names with no adapter, and reports tokens/s for 1 and 8 concurrent
# streams. Exits non-zero on any failure.
#
#   bash bench/gpu/vllm_serve.sh INPUTS_DIR          # from the repository root
#
# INPUTS_DIR (about 280 MB) is made beforehand wherever Tunery is installed (CPU is enough,
# about three minutes) and copied to the GPU machine:
#   .venv/bin/python -m bench.gpu.prepare_vllm_inputs INPUTS_DIR
# It holds SmolLM2-135M-Instruct (base/), a real job's adapter trained on it in a `file://`
# store laid out as Tunery's (storage/jobs/<id>/), and inputs.json. Another adapter works too:
# copy a completed job's `jobs/<id>/` from Tunery's storage into storage/jobs/<id>/, its base
# into base/, and write inputs.json as {"job_id": "<id>", "base_model": "<its model_path>"}.
#
# What the GPU machine needs: an NVIDIA GPU and driver, python3 (3.11 or later) with venv, and
# vLLM, in one of three ways:
#   VLLM_PYTHON=/path/to/python   a Python whose `import vllm` works (the plugin, boto3 and
#                                 pydantic-settings are installed into it);
#   a package index pip reaches   `pip install vllm==$VLLM_VERSION` into a new venv at
#                                 $VLLM_VENV: several GB (torch and CUDA libraries), minutes;
#   VLLM_WHEELS=DIR               the same from a folder of wheels, with no index.
# The script stops with a failure at TIME_LIMIT_S seconds (470, under 8 minutes). Results:
# $OUT/vllm_serve.json when OUT is set, else bench/results/vllm_serve.json; vLLM's log beside.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
INPUTS="$(cd "${1:?usage: bash bench/gpu/vllm_serve.sh INPUTS_DIR}" && pwd)"
TIME_LIMIT_S="${TIME_LIMIT_S:-470}"
VLLM_VERSION="${VLLM_VERSION:-0.33.0}"
VLLM_VENV="${VLLM_VENV:-/tmp/tunery-vllm-venv}"
PORT="${PORT:-8765}"
RESULTS_DIR="${OUT:-$ROOT/bench/results}"
WORK="$(mktemp -d /tmp/tunery-vllm-serve.XXXXXX)"
SERVER_PID=""

fail() {
    echo "FAILED: $*" >&2
    exit 1
}

left_s() {
    local left=$((TIME_LIMIT_S - SECONDS))
    ((left > 0)) || fail "time limit of ${TIME_LIMIT_S}s reached"
    echo "$left"
}

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -f "$WORK/vllm.log" ]]; then
        mkdir -p "$RESULTS_DIR"
        cp "$WORK/vllm.log" "$RESULTS_DIR/vllm_serve.log" || true
    fi
}
trap stop_server EXIT

for file in base/config.json inputs.json; do
    [[ -f "$INPUTS/$file" ]] || fail "$INPUTS/$file is missing; make INPUTS_DIR with bench.gpu.prepare_vllm_inputs"
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== vLLM"
if [[ -n "${VLLM_PYTHON:-}" ]]; then
    PY="$VLLM_PYTHON"
else
    [[ -x "$VLLM_VENV/bin/python" ]] || python3 -m venv "$VLLM_VENV"
    PY="$VLLM_VENV/bin/python"
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [[ -n "${VLLM_WHEELS:-}" ]]; then
    PIP+=(--no-index --find-links "$VLLM_WHEELS")
fi
if ! "$PY" -c "import vllm" 2>/dev/null; then
    timeout "$(left_s)" "${PIP[@]}" "vllm==$VLLM_VERSION" || fail "pip could not install vllm==$VLLM_VERSION"
fi
# The plugin's dependencies, then Tunery without its own (the resolver imports only its
# storage, settings and adapter names) and the plugin, built with what is installed
# (setuptools 77 reads the license as pyproject.toml writes it).
timeout "$(left_s)" "${PIP[@]}" boto3 "pydantic-settings>=2.3" "setuptools>=77" wheel || fail "pip could not install the plugin's dependencies"
timeout "$(left_s)" "${PIP[@]}" --no-deps --no-build-isolation "$ROOT" "$ROOT/deploy/vllm" || fail "pip could not install Tunery and the plugin"
"$PY" -c "import vllm; print('vllm', vllm.__version__)"

JOB_ID="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["job_id"])' "$INPUTS/inputs.json")"
BASE_NAME="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["base_model"])' "$INPUTS/inputs.json")"
ADAPTER="tunery-job-$JOB_ID"
TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"

echo "== vllm serve with the resolver (adapter $ADAPTER)"
# What the compose service and its image set; the base is served under the name its jobs give
# it, which here is a path on the machine that trained the adapter.
export TUNERY_STORAGE_URL="file://$INPUTS/storage"
export TUNERY_VLLM_CACHE_DIR="$WORK/adapters"
export TUNERY_VLLM_CACHE_MAX_MB=1024
export TUNERY_VLLM_BASE_MODEL="$BASE_NAME"
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_PLUGINS=tunery_lora_resolver
export HF_HUB_OFFLINE=1
VLLM_BIN="$(dirname "$PY")/vllm"
if [[ -x "$VLLM_BIN" ]]; then
    SERVE=("$VLLM_BIN" serve)
else
    SERVE=("$PY" -m vllm.entrypoints.cli.main serve)
fi
"${SERVE[@]}" "$INPUTS/base" \
    --served-model-name "$BASE_NAME" \
    --dtype bfloat16 \
    --max-model-len 2048 \
    --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.5}" \
    --enable-lora --max-loras 4 --max-cpu-loras 8 --max-lora-rank 64 \
    --api-key "$TOKEN" \
    --host 127.0.0.1 --port "$PORT" \
    >"$WORK/vllm.log" 2>&1 &
SERVER_PID=$!

started=$SECONDS
until "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$PORT/health" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        tail -n 60 "$WORK/vllm.log" >&2
        fail "vllm serve exited during startup"
    fi
    left_s >/dev/null
    sleep 2
done
echo "vllm serve ready after $((SECONDS - started))s"
grep -i "tunery\|plugin" "$WORK/vllm.log" | head -n 5 || true

echo "== checks and throughput"
if ! timeout "$(left_s)" "$PY" "$ROOT/bench/gpu/vllm_client.py" --url "http://127.0.0.1:$PORT" \
    --token "$TOKEN" --adapter "$ADAPTER" --base "$BASE_NAME" --out "$RESULTS_DIR/vllm_serve.json"; then
    tail -n 40 "$WORK/vllm.log" >&2
    fail "a check failed"
fi
grep -q "Resolved and loaded LoRA adapter '$ADAPTER'" "$WORK/vllm.log" \
    || echo "note: vLLM's log does not say which resolver loaded $ADAPTER" >&2
echo "all checks passed in ${SECONDS}s"
