"""Building blocks shared by the zoo models."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False
) -> nn.Sequential:
    """Conv ("same" padding) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


def make_classifier(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Global average pool -> flatten -> [dropout] -> linear: works for any input resolution."""
    layers = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(in_features, num_classes)
    return nn.Sequential(layers)
