#!/usr/bin/env bash
# AR against speculative decoding of the default checkpoint on one NVIDIA GPU, on the saved held-out
# prompts (the same ids the CPU rows of docs/benchmarks.md decode), run from the repo root:
#
#     bash benchmarks/gpu_decode_check.sh      (carry .whl and runs/gpu_carry)
#
# The GPU image lacks omegaconf and friends: their wheels in .whl/ go to /tmp/site, as in gpu_check.sh.
# ACCEL=cpu runs the same command here. Output: $OUT/gpu_decode.json and the printed table.
set -u
OUT=${OUT:-/tmp/gpu_decode_out}
mkdir -p "$OUT"
if [ "${ACCEL:-cuda}" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    PY=python3
else
    export PYTHONPATH=$PWD
    PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
timeout -k 10 420 "$PY" benchmarks/decode_prompts_bench.py runs/gpu_carry/default_last_weights.ckpt \
    --prompts runs/gpu_carry/val_prompts_32x64.pt --device "${ACCEL:-cuda}" --settings "${SETTINGS:-8x1,32x1,32x8}" \
    --json "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode_log.txt"
