#!/usr/bin/env bash
# Draft tuning on one CUDA GPU, with a sampled pool: a run that stops inside draft tuning and resumes
# must end where an uninterrupted run ends (the pool is drawn on the GPU from a seeded generator and
# rebuilt on resume). Run from the repo root on the GPU machine (see gpu_check.sh for the wheels):
#
#     bash benchmarks/gpu_draft_tuning_check.sh          (ACCEL=cpu: the same on the CPU)
#
# Prints the largest weight difference between the two runs and whether only the draft maps changed
# during draft tuning.
set -uo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf MTP_LIGHTNING_CACHE=/tmp/mtpcache
R=${R:-/tmp/dt_runs}
rm -rf "$R"
COMMON=(--config conf/smoke.yaml "run.root=$R" "trainer.accelerator=${ACCEL:-gpu}" trainer.devices=1 trainer.max_steps=20
        trainer.val_check_interval=10 checkpoint.every_n_steps=10 trainer.progress_bar=false spec.every_n_val=0
        draft_tuning.sequences=24 draft_tuning.prompt_len=16 draft_tuning.new_tokens=24 draft_tuning.batch_size=8
        draft_tuning.temperature=1.0)
python3 -m mtp_lightning fit "${COMMON[@]}" run.name=whole draft_tuning.steps=10 || exit 1
python3 -m mtp_lightning fit "${COMMON[@]}" run.name=split draft_tuning.steps=5 || exit 1
python3 -m mtp_lightning fit --resume last "${COMMON[@]}" run.name=split draft_tuning.steps=10 || exit 1
python3 - "$R" <<'EOF'
import sys
import torch
from mtp_lightning.checkpoints.io import safe_load
r = sys.argv[1]
whole = safe_load(f"{r}/whole/checkpoints/last.ckpt")
split = safe_load(f"{r}/split/checkpoints/last.ckpt")
before = safe_load(f"{r}/whole/checkpoints/best-step0000020.ckpt")
print("steps", whole["global_step"], split["global_step"], "precision", whole["mtp_lightning"]["config"]["trainer"]["precision"])
diff = max((whole["state_dict"][k].float() - v.float()).abs().max().item() for k, v in split["state_dict"].items())
print(f"max |whole - resumed| over all weights: {diff:.3g}")
changed = sorted(k for k, v in before["state_dict"].items() if not torch.equal(v, whole["state_dict"][k]))
print("changed by draft tuning:", changed)
EOF
