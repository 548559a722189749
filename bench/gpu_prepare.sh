#!/usr/bin/env bash
# Run here, before a GPU lease: puts what bench/gpu_check.sh needs and the GPU machine lacks into two ignored
# folders that the device tool carries (carry=["data", ".whl"]):
#   data/cifar10-jpeg.tar.gz   the CIFAR-10 JPEG archive (from ../shared/datasets/, or $CIFAR_TAR)
#   .whl/                      simplejpeg for the GPU machine's Python 3.12 (the CPU decode path; without it
#                              the data section measures the Pillow fallback)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${CIFAR_TAR:-../shared/datasets/cifar10-jpeg.tar.gz}"
mkdir -p data .whl
if [ -f "$SRC" ]; then cp -n "$SRC" data/cifar10-jpeg.tar.gz; else echo "no $SRC: the CIFAR-10 section will be skipped" >&2; fi
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "simplejpeg>=1.7"
du -sh data .whl
