#!/usr/bin/env bash
# One prepared GPU session (at most ~8 minutes): CUDA tests, step throughput eager vs compiled with MFU and
# peak memory, the augmentation alone, and ~3 minutes of the CIFAR-10 GPU recipe end to end with its kNN.
# Everything is written under $OUT (default bench/results/gpu) as JSON / text; copy the JSON into
# bench/results/ and commit it, naming the device.
#
#   bash bench/gpu_check.sh            (on the lent machine, from the repository root)
#   LARGE_VITS=1 bash bench/gpu_check.sh   (+ ViT-L/16, ViT-H/14 memory rows; ~2 minutes more)
#
# It uses the machine's own torch (no install): PYTHONPATH points at this checkout. The CIFAR-10 run needs
# the JPEG archive: $CIFAR_TAR, or data/cifar10-jpeg.tar.gz inside the checkout (an ignored path: copy it
# there from ../shared/datasets/ and pass it to the device tool with carry=["data"]); skipped without it.
set -uo pipefail
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/progress.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
python - <<'PY' > "$OUT/env.json"
import json, torch; print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
  "device": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported()}))
PY
stamp "env done"

if [ "$SKIP_GPU_SECTIONS" != 1 ]; then
# 1. CUDA-only tests (SyncBatchNorm kernels, a bf16 step) and interop (timm, torchvision exist only there)
timeout 120 python -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_export.py tests/test_methods.py \
  tests/test_gpu_decode.py -k "gpu or cuda or timm or torchvision or nvjpeg" > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt"
stamp "tests done"

# 2. one training step: eager vs compiled (ViT-S/16 bs 256, ViT-B/16 bs 128, ResNet-50 bs 256), augmentation alone
timeout 260 python bench/step_throughput.py --device cuda --steps 15 \
  --pairs vit_small_224:bf16,vit_small_224:bf16:compiled,vit_base_224:bf16,vit_base_224:bf16:compiled,resnet50_224:bf16,resnet50_224:bf16:compiled,aug_224:bf16:aug,cifar_vits4:bf16:compiled \
  --out "$OUT/step_throughput_gpu.json" > "$OUT/throughput.txt" 2>&1
stamp "throughput done"

# 2c. input: the CPU decode path per core beside nvJPEG decode + crop on the GPU (issue 12), ~30 s (90 s at most)
timeout 90 python bench/data_throughput.py --n 200 --workers 8 --out "$OUT/data_throughput_gpu.json" \
  > "$OUT/data_throughput.txt" 2>&1
stamp "data throughput done"

# 2b. large ViTs on one GPU: peak memory per image, eager vs activation checkpointing (issue 13). Opt-in
# (LARGE_VITS=1, ~2 more minutes) so that the default run stays within 8 minutes.
if [ "${LARGE_VITS:-0}" = 1 ]; then
  timeout 150 python bench/step_throughput.py --device cuda --steps 6 \
    --pairs vit_large_224:bf16,vit_large_224_gc:bf16,vit_huge14_224_gc:bf16 \
    --out "$OUT/step_throughput_large_gpu.json" > "$OUT/throughput_large.txt" 2>&1
  stamp "large ViTs done"
fi
fi

# 3. the CIFAR-10 GPU recipe end to end for ~3 minutes (SIGTERM saves a checkpoint), then its kNN
TAR="${CIFAR_TAR:-data/cifar10-jpeg.tar.gz}"
CIFAR_CONFIG="${CIFAR_CONFIG:-configs/cifar10_vit_small_gpu.yaml}"
CIFAR_SECONDS="${CIFAR_SECONDS:-180}"
SKIP_GPU_SECTIONS="${SKIP_GPU_SECTIONS:-0}"  # 1: only section 3 (a dry run of it on a CPU machine)
if [ -f "$TAR" ]; then
  mkdir -p /tmp/mocov3-data && tar xzf "$TAR" -C /tmp/mocov3-data
  D=/tmp/mocov3-data/cifar10-jpeg
  rm -rf /tmp/mocov3-cifar
  timeout -s TERM "$CIFAR_SECONDS" python -m mocov3 pretrain --config "$CIFAR_CONFIG" --data "$D/train" \
    --eval-data "$D/test" --output-dir /tmp/mocov3-cifar --no-progress eval.knn_every=5 ${CIFAR_OVERRIDES:-} \
    > "$OUT/cifar_pretrain.txt" 2>&1
  echo "pretrain rc=$?" >> "$OUT/cifar_pretrain.txt"
  cp /tmp/mocov3-cifar/metrics.jsonl "$OUT/cifar_metrics.jsonl" 2>/dev/null
  timeout 60 python -m mocov3 knn --checkpoint /tmp/mocov3-cifar/checkpoint.pt --train-data "$D/train" \
    --test-data "$D/test" ${CIFAR_OVERRIDES:-} > "$OUT/cifar_knn.txt" 2>&1
  python - "$OUT" "$CIFAR_CONFIG" "$CIFAR_SECONDS" <<'PY'
import json, sys
out = sys.argv[1]
lines = [json.loads(l) for l in open(f"{out}/cifar_metrics.jsonl")]
train = [l for l in lines if "loss" in l]
knn = json.loads(open(f"{out}/cifar_knn.txt").read().strip().splitlines()[-1])
json.dump({"what": f"{sys.argv[2]} on CIFAR-10 JPEG folders, stopped by SIGTERM after {sys.argv[3]} s "
           "of wall time (start-up and kNN points included), then kNN k=20 on the full train bank / test set",
           "steps": train[-1]["step"], "epochs": train[-1]["epoch"], "knn_top1": knn["top1"],
           "knn_init_top1": next((l["knn_init_top1"] for l in lines if "knn_init_top1" in l), None),
           "images_per_sec_median": sorted(l["images_per_sec"] for l in train)[len(train) // 2],
           "mfu_median": sorted(l.get("mfu", 0) for l in train)[len(train) // 2]},
          open(f"{out}/cifar10_e2e_gpu.json", "w"), indent=2)
PY
else
  echo "no $TAR: CIFAR-10 end-to-end skipped" > "$OUT/cifar_pretrain.txt"
fi
stamp "cifar done"
cat "$OUT/progress.txt"; tail -3 "$OUT/pytest_gpu.txt"; cat "$OUT/throughput.txt"; cat "$OUT/throughput_large.txt" 2>/dev/null; cat "$OUT/cifar10_e2e_gpu.json" 2>/dev/null
