"""CIFAR-style ResNets (kuangliu/pytorch-cifar): 3x3 stride-1 stem, no max-pool, BasicBlocks.

Two families share one class: ``resnet10/18/34`` (four stages, 64..512 channels, as in
kuangliu/pytorch-cifar) and ``resnet8/20/32/56`` (three stages, 16..64 channels, He et al. 2016).
Shortcuts that change shape are 1x1 conv + BN ("option B"), as in kuangliu/pytorch-cifar.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import conv_bn_relu, make_classifier

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus a shortcut; ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``features`` = [stem, layer1, ..., layerN]; ``classifier`` = pool, flatten, linear.

    ``num_blocks[i]`` BasicBlocks with ``widths[i]`` channels in stage i; every stage after the
    first halves the resolution. ``dropout`` > 0 puts a dropout layer before the linear classifier.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(num_blocks) != len(widths) or not num_blocks:
            raise ConfigError(
                f"num_blocks and widths must be non-empty and of equal length, "
                f"got {list(num_blocks)} and {list(widths)}"
            )
        stages = OrderedDict(stem=conv_bn_relu(in_channels, widths[0], 3))
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages[f"layer{i + 1}"] = nn.Sequential(*blocks)
        self.features = nn.Sequential(stages)
        self.classifier = make_classifier(in_planes, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def default_exit_points(self) -> List[int]:
        """After every stage but the last (indices into ``features``)."""
        return list(range(1, len(self.features) - 1))
