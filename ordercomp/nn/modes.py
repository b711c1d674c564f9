"""Running a model in eval mode for a moment: :func:`evaluating`."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (batch norm reads its running statistics, dropout
    is off), every module's own mode restored after, also on an error."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
