"""Exit heads: small classifiers that read a backbone's features at an exit point."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import nn

from ..errors import ConfigError

__all__ = ["PoolHead", "ConvHead", "HEADS", "make_head"]


class PoolHead(nn.Sequential):
    """Exit head: global average pool -> flatten -> linear (the cheapest head)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_channels, num_classes))
        )


class ConvHead(nn.Sequential):
    """Exit head: 1x1 conv -> BN -> ReLU -> average pool to a ``grid`` x ``grid`` map -> linear.

    Keeps some spatial information, which helps heads placed early in the backbone.
    ``width`` (default: ``in_channels``) is the number of 1x1 conv filters.
    """

    def __init__(self, in_channels: int, num_classes: int, width: Optional[int] = None, grid: int = 2):
        width = in_channels if width is None else width
        if width < 1 or grid < 1:
            raise ConfigError(f"width and grid must be >= 1, got width={width}, grid={grid}")
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, width, 1, bias=False),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU(),
                pool=nn.AdaptiveAvgPool2d(grid),
                flatten=nn.Flatten(),
                fc=nn.Linear(width * grid * grid, num_classes),
            )
        )


HEADS = {"pool": PoolHead, "conv": ConvHead}


def make_head(head, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    if callable(head) and not isinstance(head, str):
        return head(in_channels, num_classes, **kwargs)
    if head not in HEADS:
        raise ConfigError(f"head must be one of {tuple(HEADS)} or a callable(in_channels, num_classes), got {head!r}")
    return HEADS[head](in_channels, num_classes, **kwargs)
