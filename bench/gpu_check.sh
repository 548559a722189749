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
timeout 240 python -m pytest -q -x tests > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 240 python bench/step_throughput.py --device cuda --steps 10 \
  --pairs quickstart:fp32,quickstart:bf16,vit_small_224:bf16 --out "$OUT/step_throughput_gpu.json" \
  > "$OUT/throughput.txt" 2>&1
cp "$OUT/step_throughput_gpu.json" bench/results/ 2>/dev/null || true
tail -3 "$OUT/pytest.txt"; cat "$OUT/throughput.txt"
