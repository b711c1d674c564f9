"""What the accuracy budget buys besides BitOps: measured latency (``budget.cost="latency"``)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import unpack
from ..stages import Context
from .config import CompressConfig

__all__ = ["latency_meter", "LATENCY_INPUTS"]

LATENCY_INPUTS = 256  # calibration inputs the meter calibrates the fast graph on and times with


def latency_meter(config: CompressConfig, original: nn.Module, context: Context):
    """A :class:`~ordercomp.deploy.latency.LatencyMeter` of ``original`` on the first calibration inputs
    when ``config.budget.cost`` is ``"latency"``, else None."""
    if config.budget.cost != "latency":
        return None
    from ..deploy.latency import LatencyMeter  # needs onnx and onnxruntime (the deploy extra)

    inputs, seen = [], 0
    for batch in context.calibration:
        x = unpack(batch, "calibration data")[0]
        inputs.append(x.detach().cpu())
        seen += len(x)
        if seen >= LATENCY_INPUTS:
            break
    inputs = torch.cat(inputs)[:LATENCY_INPUTS]
    return LatencyMeter(original, inputs, batch=min(config.budget.latency_batch, len(inputs)))
