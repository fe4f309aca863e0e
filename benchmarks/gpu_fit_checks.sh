#!/usr/bin/env bash
# Lightning fit checks on one GPU, called by benchmarks/gpu_check.sh (PY, OUT set there): the CUDA
# paths of `fit` (fsdp and ddp strategies, bf16-mixed, activation checkpointing, torch.compile,
# --resume last, the acceptance callback under FSDP) and `bench` on the GPU. Each step has a timeout;
# a failing step does not stop the others. Summaries come from the runs' TensorBoard files.
# ACC=cpu PREC=32-true R=/tmp/dry bash benchmarks/gpu_fit_checks.sh  checks the invocations on the CPU
PY=${PY:-python3}
R=${R:-/tmp/gpuruns}
ACC=${ACC:-gpu}
PREC=${PREC:-bf16-mixed}
OUT=${OUT:-$R}
G=(run.root=$R trainer.accelerator=$ACC trainer.devices=1 trainer.progress_bar=false)
# the smoke model, a little longer, with the acceptance callback at every validation
S=(--config conf/smoke.yaml trainer.max_steps=60 trainer.val_check_interval=20 checkpoint.every_n_steps=20
   spec.every_n_val=1 spec.n_prompts=4 spec.max_new_tokens=24)
summary() { timeout 60 "$PY" benchmarks/tb_summary.py "$R/$1" || echo "summary $1 FAILED rc=$?"; }

echo "--- F1 fsdp + bf16-mixed + activation checkpointing (+ acceptance callback)"
timeout -k 10 110 "$PY" -m mtp_lightning fit "${S[@]}" "${G[@]}" run.name=fsdp trainer.strategy=fsdp \
    trainer.precision=$PREC model.activation_checkpointing=true || echo "F1 FAILED rc=$?"
echo "--- F1b fsdp --resume last to step 80"
timeout -k 10 120 "$PY" -m mtp_lightning fit --resume last "${G[@]}" run.name=fsdp trainer.max_steps=80 \
    || echo "F1b FAILED rc=$?"
summary fsdp

echo "--- F2 ddp + bf16-mixed + torch.compile"
timeout -k 10 150 "$PY" -m mtp_lightning fit "${S[@]}" "${G[@]}" run.name=ddp trainer.strategy=ddp \
    trainer.precision=$PREC model.compile=true || echo "F2 FAILED rc=$?"
summary ddp

echo "--- F3 bench (AR vs speculative, greedy, identical check) on the GPU, ddp run's checkpoint"
timeout -k 10 120 "$PY" -m mtp_lightning bench --ckpt $R/ddp/checkpoints/last.ckpt --n-prompts 4 --prompt-len 32 \
    --max-new-tokens 48 --json "$OUT/bench_gpu_smoke.json" || echo "F3 FAILED rc=$?"

