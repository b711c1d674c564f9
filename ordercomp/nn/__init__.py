"""Layers and model transforms: quantized conv/linear, ``quantize_model``, exit heads and ``ExitNet``."""

from __future__ import annotations

from .exits import HEADS, ConvHead, ExitNet, ExitResult, PoolHead, attach_exits
from .quant import QuantConv2d, QuantLayer, QuantLinear, check_a_bits, check_w_bits, quant_report, quantize_model

__all__ = [
    "QuantLayer",
    "QuantConv2d",
    "QuantLinear",
    "quantize_model",
    "quant_report",
    "check_w_bits",
    "check_a_bits",
    "PoolHead",
    "ConvHead",
    "HEADS",
    "ExitNet",
    "ExitResult",
    "attach_exits",
]
