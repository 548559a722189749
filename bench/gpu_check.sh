#!/usr/bin/env bash
# One short GPU session: test suite on the GPU machine, a CUDA pretraining smoke run, and the step
# throughput benchmark on the GPU. Results go to $OUT (default bench/results/gpu). Run it as
#   bash bench/gpu_check.sh        (on the lent machine, from the repository root)
# It uses the machine's own torch (no install): PYTHONPATH points at this checkout.
set -uo pipefail
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
python - <<'PY' > "$OUT/env.json"
import json, torch; print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
  "device": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported()}))
PY
# interop first (timm and torchvision exist only there): the export loads into timm, ResNets into torchvision
timeout 120 python -m pytest -q -rs tests/test_gpu.py tests/test_export.py tests/test_methods.py -k "gpu or cuda or timm or torchvision" \
  > "$OUT/pytest_interop.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_interop.txt"
timeout 200 python -m pytest -q -x -m "slow or not slow" tests > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 150 python bench/step_throughput.py --device cuda --steps 10 \
  --pairs quickstart:fp32,quickstart:bf16,vit_small_224:bf16,resnet50_224:bf16 --out "$OUT/step_throughput_gpu.json" \
  > "$OUT/throughput.txt" 2>&1
timeout 90 python bench/monitor_overhead.py --device cuda --config configs/imagenet_vit_small.yaml --batch 64 \
  --blocks 4 --steps 10 --out "$OUT/monitor_overhead_gpu.json" > "$OUT/monitor.txt" 2>&1
cp "$OUT"/*_gpu.json bench/results/ 2>/dev/null || true
tail -3 "$OUT/pytest_interop.txt" "$OUT/pytest.txt"; cat "$OUT/throughput.txt"; tail -5 "$OUT/monitor.txt"
