"""ResNet-18 / ResNet-50 with torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...), written here so the project does not depend on torchvision.

``forward(x: [B, 3, H, W]) -> [B, num_features]`` (global average pooled; no ``fc``: the heads of the
self-supervised method or the classifier of an evaluation sit on top). ``cifar_stem=True`` replaces the
7x7 stride-2 conv and the max-pool by one 3x3 stride-1 conv, the usual stem for 32-pixel images.
BatchNorm layers are synchronized across processes (:class:`mocov3.distributed.GlobalBatchNorm2d`),
as docs/paper.md §1 asks for ResNets under distributed training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distributed import batch_norm_2d


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = batch_norm_2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = batch_norm_2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's ResNet v1.5) -> 1x1, expansion 4."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = batch_norm_2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = batch_norm_2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = batch_norm_2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


#: name -> (block, blocks per stage)
RESNET_PRESETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


@dataclass
class ResNetSpec:
    name: str = "resnet50"
    cifar_stem: bool = False
    zero_init_residual: bool = True
    img_size: int = 224


class ResNet(nn.Module):
    """ResNet backbone. Initialization as torchvision: conv kaiming-normal (fan_out), BN weight 1 and
    bias 0, and with ``zero_init_residual`` (as MoCo v3's ResNet recipe) the last BN of every residual
    branch starts at 0, so each block starts as the identity."""

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        if spec.name not in RESNET_PRESETS:
            raise ValueError(f"unknown ResNet {spec.name!r}; choose from {', '.join(RESNET_PRESETS)}")
        self.spec = spec
        block, layers = RESNET_PRESETS[spec.name]
        if spec.cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = batch_norm_2d(64)
        self.relu = nn.ReLU(inplace=True)
        c_in = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != width * block.expansion:
                down = nn.Sequential(nn.Conv2d(c_in, width * block.expansion, 1, stride, bias=False),
                                     batch_norm_2d(width * block.expansion))
            blocks = [block(c_in, width, stride, down)]
            c_in = width * block.expansion
            blocks += [block(c_in, width) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.embed_dim = c_in
        self._init(spec.zero_init_residual)

    @torch.no_grad()
    def _init(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay by name (none: 1-D exclusion is by shape)."""
        return set()

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The stem and the four stages, input to output (for monitors and layer-wise lr decay)."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [("stem", stem)] + [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> feature map [B, C, H', W']."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)
