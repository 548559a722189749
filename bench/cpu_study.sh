#!/usr/bin/env bash
# The CPU-scale stability study (docs/stability.md) and framework comparison (docs/frameworks.md).
# Two queues of resumable `mocov3 sweep` runs, one thread each (for a 2-core machine); re-running the
# script skips finished runs. Then: python bench/study_tables.py writes the tables and figures.
#   bash bench/cpu_study.sh [CIFAR_JPEG_ROOT] [OUT]
set -euo pipefail
ROOT=${1:-$HOME/.cache/mocov3/cifar10-jpeg}
OUT=${2:-runs/study}
PY=${PYTHON:-python}
C=configs/study
export OMP_NUM_THREADS=1
sweep() {  # sweep NAME CONFIG GRID...
  local name=$1 cfg=$2; shift 2
  $PY -m mocov3 sweep --config "$cfg" --data "$ROOT/train" --eval-data "$ROOT/test" \
      --output-dir "$OUT/$name" --no-progress --grid "$@" >>"$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
# Three queues on two cores: the two ViT queues (7 runs each, ~15 min per run on one free core) and
# the ResNet-18 run (stopped after epoch 1 of the same 2-epoch schedule, the point compared with the
# ViTs' epoch-1 kNN: its step costs ~3.5x a ViT step here).
(
  sweep stab_frozen $C/cifar10_vit_cpu.yaml model.freeze_patch_embed=true base_lr=1e-3,3e-3,1e-2
  sweep simclr $C/cifar10_vit_cpu_simclr.yaml model.freeze_patch_embed=true,false
  sweep byol $C/cifar10_vit_cpu_byol.yaml model.freeze_patch_embed=true,false
) &
(
  sweep stab_trainable $C/cifar10_vit_cpu.yaml model.freeze_patch_embed=false base_lr=1e-3,3e-3,1e-2
  sweep swav $C/cifar10_vit_cpu_swav.yaml model.freeze_patch_embed=true,false
  sweep lamb $C/cifar10_vit_cpu.yaml optim.name=lamb optim.weight_decay=1e-3 base_lr=3e-3,1e-2
) &
(
  sweep resnet18 $C/cifar10_resnet18_cpu.yaml method.name=mocov3 -- train.max_steps=195
) &
wait
# DINO (issue 25), the frozen / trainable patch projection pair, one run per core
sweep dino_frozen $C/cifar10_vit_cpu_dino.yaml model.freeze_patch_embed=true &
sweep dino_trainable $C/cifar10_vit_cpu_dino.yaml model.freeze_patch_embed=false &
wait
echo "study done: $OUT"
