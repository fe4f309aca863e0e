#!/usr/bin/env bash
# One GPU check, run from the repo root on a machine with one NVIDIA H100/H200 and no network:
#
#     bash benchmarks/gpu_check.sh
#
# The image has python3 3.12 with torch (CUDA), lightning, torchmetrics, tokenizers, tensorboard,
# matplotlib and transformers, but not omegaconf, antlr4-python3-runtime, datasets, dill or
# multiprocess: their pure-python wheels travel in .whl/ (ignored by git) and are installed into
# /tmp/site. Everything printed goes to $OUT/gpu_log.txt (and to stdout); results are a few JSONs
# beside it. Every step has a timeout and a failing step does not stop the others.
#
# CPU_DRY_RUN=1 bash benchmarks/gpu_check.sh   checks the invocations and their arguments here: the
# same steps on the CPU with tiny sizes, nothing installed (PY defaults to .venv/bin/python then).

if [ -z "${CPU_DRY_RUN:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD \
        || { WHEELS_FAILED=$?; export PYTHONPATH=/tmp/site:$PWD; }
    PY=${PY:-python3}
else
    export PYTHONPATH=$PWD
    PY=${PY:-.venv/bin/python}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf MTP_LIGHTNING_CACHE=/tmp/mtpcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
START=$SECONDS

if [ -z "${CPU_DRY_RUN:-}" ]; then
    # CP n=4 r=8 at vocab 32768 over 8 x 512 = 4096 tokens on a 6-layer d=512 trunk; vocab 32768 and 4x8
    # first, so that a step cut short by its timeout still has the target rows (the JSON is
    # written after every row)
    SIZES=(--device cuda --layers 6 --d-model 512 --heads 8 --batch 8 --seq 512 --vocab 32768 4096
           --nr 4x8 4x4 2x2 --warmup 2 --steps 5 --mem-budget-gib 40)
    SMALL=(--device cuda --layers 6 --d-model 512 --heads 8 --batch 8 --seq 512 --vocab 32768
           --nr 4x8 --warmup 2 --steps 5 --mem-budget-gib 40)
    T_STRATEGY=75  # seconds per strategy (16 rows, each its own process)
    T_SMALL=25
else
    SIZES=(--device cpu --layers 1 --d-model 16 --heads 2 --batch 2 --seq 16 --vocab 64
           --nr 2x2 --warmup 1 --steps 1 --threads 1 --mem-budget-gib 1)
    SMALL=(--device cpu --layers 1 --d-model 16 --heads 2 --batch 2 --seq 16 --vocab 64
           --nr 2x2 --warmup 1 --steps 1 --threads 1 --mem-budget-gib 1)
    T_STRATEGY=1200
    T_SMALL=1200
fi
T_MACHINE=${CPU_DRY_RUN:+600}

step() {  # step NAME: a banner with the time since the start
    echo
    echo "=== $1 (t=$((SECONDS - START)) s, $(date +%T)) ==="
}

bench() {  # bench NAME LIMIT ARGS...: one bench-train invocation, its JSON at $OUT/bench_train_gpu_NAME.json
    local name=$1 limit=$2
    shift 2
    step "STEP 1 bench-train $name"
    timeout -k 10 "$limit" "$PY" -m mtp_lightning bench-train "$@" --json "$OUT/bench_train_gpu_$name.json" \
        || echo "STEP 1 $name FAILED rc=$?"
}

main() {
    step "STEP 0 machine"
    [ -n "${WHEELS_FAILED:-}" ] && echo "STEP 0 WHEEL INSTALL FAILED rc=$WHEELS_FAILED"
    timeout 30 nvidia-smi -L || echo "STEP 0 nvidia-smi FAILED rc=$?"
    timeout "${T_MACHINE:-60}" "$PY" -c '
import sys, torch, lightning
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| lightning", lightning.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported(),
          "| memory GiB %.1f" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
import omegaconf, datasets, mtp_lightning.cli
print("omegaconf", omegaconf.__version__, "| datasets", datasets.__version__, "| mtp_lightning imports")
' || echo "STEP 0 versions FAILED rc=$?"

    # bf16-mixed with the lean loss's products in bf16 too (--bf16-unembed), so every row's unembedding
    # products run in bf16; the three ways of holding the model that fit one GPU
    bench none "$T_STRATEGY" "${SIZES[@]}" --precision bf16-mixed --bf16-unembed --strategy none
    bench ddp "$T_STRATEGY" "${SIZES[@]}" --precision bf16-mixed --bf16-unembed --strategy ddp
    bench fsdp "$T_STRATEGY" "${SIZES[@]}" --precision bf16-mixed --bf16-unembed --strategy fsdp
    # the project's default loss config under bf16-mixed: the lean loss multiplies in float32
    bench none_fp32lean "$T_SMALL" "${SMALL[@]}" --precision bf16-mixed --strategy none

    step "STEP 2 fit checks"
    PY="$PY" OUT="$OUT" bash benchmarks/gpu_fit_checks.sh

    step "done"
    ls -l "$OUT"
}

main 2>&1 | tee -a "$LOG"
