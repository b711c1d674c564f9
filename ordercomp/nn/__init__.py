"""Layers and networks: quantized conv / linear, exit heads, ExitNet, cutting a backbone, introspection."""

from __future__ import annotations

from .exits import ExitNet, ExitResult
from .heads import HEADS, ConvHead, PoolHead, make_head
from .introspect import PenultimateFeatures, exit_outputs, final_classifier, logit_layers
from .outputs import Output, check_output, select_logits
from .quant import QuantConv2d, QuantLayer, QuantLinear, check_a_bits, check_w_bits, quant_report, quantize_model
from .split import attach_exits

__all__ = [
    "Output",
    "ConvHead",
    "ExitNet",
    "ExitResult",
    "HEADS",
    "PenultimateFeatures",
    "PoolHead",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "attach_exits",
    "check_a_bits",
    "check_output",
    "check_w_bits",
    "exit_outputs",
    "final_classifier",
    "logit_layers",
    "make_head",
    "quant_report",
    "quantize_model",
    "select_logits",
]
