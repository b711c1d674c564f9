"""CIFAR-style MobileNetV2 (kuangliu/pytorch-cifar): stride-1 stem, block strides 1,1,2,2,1,2,1."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import conv_bn_relu, make_classifier

__all__ = ["InvertedResidual", "MobileNetV2", "CONFIG"]

# (expansion, out channels, blocks, stride of the first block) per group
CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` to ``value``, never below 90 % of it (as in the MobileNetV2 paper)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, with a shortcut at stride 1.

    As in kuangliu/pytorch-cifar the expansion conv is kept at expansion 1, and a stride-1 block
    that changes the width has a 1x1 conv + BN shortcut.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        planes = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """``features`` = [stem, one ``nn.Sequential`` of blocks per ``CONFIG`` row, 1x1 conv to 1280].

    ``width_mult`` scales every width but the last conv's 1280 (rounded to multiples of 8);
    ``classifier`` = global average pool, flatten, [dropout], linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not width_mult > 0:
            raise ConfigError(f"width_mult must be > 0, got {width_mult!r}")
        in_planes = make_divisible(32 * width_mult)
        groups = [conv_bn_relu(in_channels, in_planes, 3)]
        for expansion, out, n, stride in CONFIG:
            out = make_divisible(out * width_mult)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(in_planes, out, expansion, stride if j == 0 else 1))
                in_planes = out
            groups.append(nn.Sequential(*blocks))
        last = make_divisible(1280 * max(1.0, width_mult))
        groups.append(conv_bn_relu(in_planes, last, 1))
        self.features = nn.Sequential(*groups)
        self.classifier = make_classifier(last, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def default_exit_points(self) -> List[int]:
        """At the end of each resolution but the last: after the 24-, 32- and 96-channel groups."""
        return [2, 3, 5]
