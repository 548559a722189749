#!/usr/bin/env bash
# Check that exports load into timm's VisionTransformer on a machine where timm cannot be installed
# normally (pip would replace the CPU torch by a CUDA build through torchvision). timm is unpacked
# without its dependencies into a temporary folder, and the few torchvision names that timm imports at
# start-up (dataset classes, transform classes, FrozenBatchNorm2d; none of them used by ViT) are stubbed
# there. Runs the timm tests of tests/test_export.py. Usage: bash scripts/check_timm.sh [PYTHON]
set -euo pipefail
PY=${1:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download timm --no-deps -d "$TMP/dl" -q
mkdir -p "$TMP/pkg" "$TMP/stub/torchvision/ops" "$TMP/stub/torchvision/datasets" "$TMP/stub/torchvision/transforms"
"$PY" -c "import zipfile, glob, sys; zipfile.ZipFile(glob.glob(sys.argv[1] + '/timm-*.whl')[0]).extractall(sys.argv[2])" \
  "$TMP/dl" "$TMP/pkg"
S=$TMP/stub/torchvision
: > "$S/__init__.py"; : > "$S/ops/__init__.py"; : > "$S/transforms/v2.py"
printf 'import torch.nn as nn\n\n\nclass FrozenBatchNorm2d(nn.Module):\n    pass\n' > "$S/ops/misc.py"
cat > "$S/datasets/__init__.py" <<'PY'
class _Stub:
    pass
CIFAR100 = CIFAR10 = MNIST = KMNIST = FashionMNIST = ImageFolder = QMNIST = EMNIST = SVHN = Places365 = _Stub
Kinetics = INaturalist = Flowers102 = OxfordIIITPet = Food101 = StanfordCars = FGVCAircraft = DTD = _Stub
PY
cat > "$S/transforms/__init__.py" <<'PY'
import enum
class InterpolationMode(enum.Enum):
    NEAREST = "nearest"; BILINEAR = "bilinear"; BICUBIC = "bicubic"; BOX = "box"; HAMMING = "hamming"
    LANCZOS = "lanczos"; NEAREST_EXACT = "nearest-exact"
class _Stub:
    def __init__(self, *a, **k):
        pass
Compose = RandomResizedCrop = CenterCrop = Resize = ToTensor = Normalize = RandomHorizontalFlip = _Stub
ColorJitter = RandomCrop = RandomApply = RandomGrayscale = GaussianBlur = Lambda = ToPILImage = PILToTensor = _Stub
PY
echo "from . import InterpolationMode" > "$S/transforms/functional.py"
PYTHONPATH="$TMP/pkg:$TMP/stub${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import timm; print('timm', timm.__version__)"
PYTHONPATH="$TMP/pkg:$TMP/stub${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -rs tests/test_export.py -k timm
