#!/usr/bin/env bash
# One prepared GPU session of at most 8 minutes (BUDGET seconds): step throughput eager vs compiled with MFU
# and peak memory, the augmentation alone, the input path (CPU decode per core, nvJPEG), the short CIFAR-10
# GPU recipe end to end under a time budget with its kNN, and the CUDA tests last.
#
# Here, before the lease (copies the CIFAR-10 archive into data/ and simplejpeg's wheel for the GPU
# machine's Python into .whl/; both are ignored paths):
#     bash bench/gpu_prepare.sh
# Then one call of the device tool, with carry=["data", ".whl"] and timeout_s 560:
#     bash bench/gpu_check.sh
#     LARGE_VITS=1 bash bench/gpu_check.sh   (+ ViT-L/16, ViT-H/14 memory rows: add BUDGET=630)
#     SHORT=1 BUDGET=150 PAIRS=vit_small_224:bf16,... bash bench/gpu_check.sh   (step throughput alone)
#
# Output under $OUT (default bench/results/gpu), at most 6 files (the device tool brings back 8):
# env.json, step_throughput_gpu.json, data_throughput_gpu.json, cifar10_e2e_gpu.json,
# step_throughput_large_gpu.json (LARGE_VITS=1) and logs.tar.gz (every log and a torch.profiler table per
# step case, refreshed after each section).
# Copy the JSON into bench/results/ and commit it, naming the device.
#
# It uses the machine's own torch (no install; PYTHONPATH points at this checkout) and installs the wheels
# in .whl/ when that folder exists. Every section has its own time limit, and the CIFAR-10 run gets what
# is left of BUDGET (at most CIFAR_SECONDS); a section that fails leaves its log and the others still run.
set -uo pipefail
BUDGET="${BUDGET:-480}"
LARGE_VITS="${LARGE_VITS:-0}"
SKIP_GPU_SECTIONS="${SKIP_GPU_SECTIONS:-0}"   # 1: only section 3 (a dry run of it on a CPU machine)
SHORT="${SHORT:-0}"   # 1: section 2 alone, with PAIRS, in BUDGET seconds (a lease with little device time left)
PAIRS="${PAIRS:-aug_224:bf16:aug,aug_224:bf16:aug_compiled,vit_small_224:bf16:compiled,vit_base_224:bf16:compiled,cifar_vits4:bf16:compiled,dino_vit_small_224:bf16:compiled,vit_small_224:bf16,vit_base_224:bf16,resnet50_224:bf16,resnet50_224:bf16:compiled}"
TAR="${CIFAR_TAR:-data/cifar10-jpeg.tar.gz}"
CIFAR_CONFIG="${CIFAR_CONFIG:-configs/cifar10_vit_small_gpu_short.yaml}"
CIFAR_SECONDS="${CIFAR_SECONDS:-180}"
CIFAR_OVERRIDES="${CIFAR_OVERRIDES:-}"
PYTHON="${PYTHON:-python3}"
WORK="${WORK:-/tmp/mocov3-gpu-check}"          # the extracted archive and the CIFAR-10 run folder
DATA_N="${DATA_N:-200}"                          # synthetic 500x375 JPEGs of the input section
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
# limit N RESERVE: N seconds, or less so that RESERVE seconds of the budget stay for the sections after it
limit() { local left=$(( BUDGET - $(elapsed) - $2 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
stamp() { echo "[$(elapsed) s] $*" | tee -a "$LOGS/progress.txt"; tar czf "$OUT/logs.tar.gz" -C "$LOGS" .; }
# bounded SECS LOG CMD...: CMD in its own process group, output to LOG; at SECS it gets SIGTERM, 10 s later
# SIGKILL, and the script goes on even if the process does not die (the first lease hung for 550 s in a
# pytest that `timeout` had signalled: a process blocked in the driver outlives its signals). Returns CMD's
# status, or 124 when it was stopped.
bounded() {
  local secs=$1 logfile=$2; shift 2
  setsid "$@" > "$logfile" 2>&1 &
  local pid=$! t=0
  while kill -0 "$pid" 2>/dev/null && (( t < secs )); do sleep 1; t=$((t + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null
    echo "stopped after $secs s" >> "$logfile"; disown "$pid" 2>/dev/null; return 124
  fi
  wait "$pid"
}
# the logs come back even if the device tool's limit ends the whole script: refreshed every 20 s
( while sleep 20; do tar czf "$OUT/logs.tar.gz.part" -C "$LOGS" . 2>/dev/null && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"; done ) &
FLUSHER=$!

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mocov3-site \
    .whl/*.whl > "$LOGS/wheels.txt" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/mocov3-site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$LOGS/nvidia_smi.csv" 2>&1
"$PYTHON" - "$OUT/env.json" > "$LOGS/env.txt" 2>&1 <<'PY'
import json, sys, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported())
for name in ("torchvision", "timm", "simplejpeg"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        info[name] = f"absent ({type(e).__name__})"
json.dump(info, open(sys.argv[1], "w"), indent=2)
PY
stamp "env done: $(cat "$OUT/env.json" 2>/dev/null | tr -d '\n ')"

if [ "$SKIP_GPU_SECTIONS" != 1 ]; then
  # 2. one training step (augmentation included), eager vs compiled, and the augmentation alone. Each case is
  # a fresh process (~8 s) and a compiled one compiles for ~40 s, so not every row may fit: the rows the
  # targets name come first (the augmentation, the compiled ViT-S/16 and ViT-B/16, the CIFAR model, whose
  # figure section 3 uses), then the eager baselines, ResNet-50 last; each row is saved as it is measured
  if [ "$SHORT" = 1 ]; then THROUGHPUT_LIMIT=$(limit 100000 5); PROFILE=(); else THROUGHPUT_LIMIT=$(limit 220 255); PROFILE=(--profile-dir "$LOGS"); fi
  bounded "$THROUGHPUT_LIMIT" "$LOGS/throughput.txt" "$PYTHON" bench/step_throughput.py --device cuda --steps 15 \
    --pairs "$PAIRS" --out "$OUT/step_throughput_gpu.json" "${PROFILE[@]}"
  stamp "throughput done (rc=$?)"
fi
if [ "$SKIP_GPU_SECTIONS" != 1 ] && [ "$SHORT" != 1 ]; then

  # 2b. the input path: CPU decode per core beside nvJPEG decode + crop on the GPU (issue 12)
  bounded "$(limit 40 215)" "$LOGS/data_throughput.txt" "$PYTHON" bench/data_throughput.py --n "$DATA_N" \
    --workers 8 --out "$OUT/data_throughput_gpu.json"
  stamp "data throughput done (rc=$?)"

  # 2c. large ViTs on one GPU: peak memory, eager vs activation checkpointing (opt-in: ~2 more minutes)
  if [ "$LARGE_VITS" = 1 ]; then
    bounded "$(limit 150 250)" "$LOGS/throughput_large.txt" "$PYTHON" bench/step_throughput.py --device cuda \
      --steps 6 --pairs vit_large_224:bf16,vit_large_224_gc:bf16,vit_huge14_224_gc:bf16 \
      --out "$OUT/step_throughput_large_gpu.json"
    stamp "large ViTs done (rc=$?)"
  fi
fi

# 3. the short CIFAR-10 recipe end to end under a time budget (train.budget_minutes: the run measures its
# own pace after its first steps and sets its epochs so that the schedule and its kNN points end inside the
# budget), stopped by SIGTERM at the latest (which saves a checkpoint), then its kNN
if [ "$SHORT" = 1 ]; then
  stamp "cifar skipped (SHORT=1)"
elif [ -f "$TAR" ]; then
  D="$WORK/data/cifar10-jpeg"
  mkdir -p "$WORK/data" && [ -d "$D/train" ] || tar xzf "$TAR" -C "$WORK/data"
  SECONDS_LEFT=$(limit "$CIFAR_SECONDS" 95)
  NTRAIN=$(find "$D/train" -type f | wc -l)
  # the budget counts from the start of pretraining: ~15 s of interpreter and import before it
  BUDGET_MIN=$("$PYTHON" -c "print(round(max($SECONDS_LEFT - 15, 10) / 60, 3))")
  stamp "cifar: $NTRAIN images, budget $BUDGET_MIN min, stopped after $SECONDS_LEFT s at the latest"
  rm -rf "$WORK/run"
  # shellcheck disable=SC2086
  bounded "$SECONDS_LEFT" "$LOGS/cifar_pretrain.txt" "$PYTHON" -m mocov3 pretrain --config "$CIFAR_CONFIG" \
    --data "$D/train" --eval-data "$D/test" --output-dir "$WORK/run" --no-progress \
    "train.budget_minutes=$BUDGET_MIN" $CIFAR_OVERRIDES
  echo "pretrain rc=$?" >> "$LOGS/cifar_pretrain.txt"
  cp "$WORK/run"/metrics.jsonl "$LOGS/cifar_metrics.jsonl" 2>/dev/null
  cp "$WORK/run"/config.yaml "$LOGS/cifar_config.yaml" 2>/dev/null
  # shellcheck disable=SC2086
  bounded "$(limit 45 50)" "$LOGS/cifar_knn.txt" "$PYTHON" -m mocov3 knn --checkpoint "$WORK/run"/checkpoint.pt \
    --train-data "$D/train" --test-data "$D/test" $CIFAR_OVERRIDES
  "$PYTHON" bench/_gpu_check.py summary --out "$LOGS" --config "$CIFAR_CONFIG" --seconds "$SECONDS_LEFT" \
    --overrides "train.budget_minutes=$BUDGET_MIN $CIFAR_OVERRIDES" > /dev/null 2> "$LOGS/cifar_summary_err.txt" && cp "$LOGS/cifar10_e2e_gpu.json" "$OUT/"
  stamp "cifar done: $(tail -1 "$LOGS/cifar_knn.txt" 2>/dev/null)"
else
  echo "no $TAR: CIFAR-10 end-to-end skipped (bash bench/gpu_prepare.sh, then carry data/)" | tee "$LOGS/cifar_pretrain.txt"
  stamp "cifar skipped"
fi
# 4. CUDA-only tests (SyncBatchNorm kernels on NCCL, a bf16 step, nvJPEG) and interop (timm, torchvision exist
# only there), last: on the first lease this section hung past its limit and the rest never ran
if [ "$SKIP_GPU_SECTIONS" != 1 ] && [ "$SHORT" != 1 ]; then
  bounded "$(limit 60 0)" "$LOGS/pytest_gpu.txt" "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
    tests/test_export.py tests/test_methods.py tests/test_gpu_decode.py tests/test_augment.py \
    -k "gpu or cuda or interop or nvjpeg"
  echo "pytest rc=$?" >> "$LOGS/pytest_gpu.txt"
  stamp "tests done: $(tail -2 "$LOGS/pytest_gpu.txt" | tr '\n' ' ')"
fi
kill "$FLUSHER" 2>/dev/null; wait "$FLUSHER" 2>/dev/null; rm -f "$OUT/logs.tar.gz.part"
cat "$LOGS/progress.txt"; tail -3 "$LOGS/pytest_gpu.txt" 2>/dev/null; cat "$LOGS/throughput.txt" 2>/dev/null
cat "$LOGS/throughput_large.txt" "$LOGS/data_throughput.txt" "$OUT/cifar10_e2e_gpu.json" 2>/dev/null
rm -rf "$LOGS"
