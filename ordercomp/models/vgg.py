"""CIFAR-style VGG with batch norm (kuangliu/pytorch-cifar): 3x3 convs with bias, one linear classifier."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ._common import conv_bn_relu, make_classifier

__all__ = ["VGG", "CONFIGS"]

CONFIGS: Dict[str, List[Sequence[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    """``features`` = one ``nn.Sequential`` per stage (conv-BN-ReLU layers, then a 2x2 max-pool).

    ``stages`` lists the conv widths of each stage (see ``CONFIGS``). Max-pools round up
    (``ceil_mode``), so 28x28 inputs reach 1x1 like 32x32 ones; ``classifier`` = global average
    pool, flatten, [dropout], linear.
    """

    def __init__(
        self, stages: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
    ):
        super().__init__()
        if not stages or not all(stages):
            raise ConfigError(f"stages must be a non-empty list of non-empty width lists, got {stages!r}")
        blocks = []
        for widths in stages:
            layers = []
            for w in widths:
                layers.append(conv_bn_relu(in_channels, w, 3, bias=True))
                in_channels = w
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.classifier = make_classifier(in_channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def default_exit_points(self) -> List[int]:
        """After every stage but the first and the last (indices into ``features``)."""
        return list(range(1, len(self.features) - 1))
