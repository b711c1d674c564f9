"""The integer forms of quantized layers, each with its PyTorch meaning and its ONNX nodes.

A spec computes in PyTorch exactly what the quantized layer computes (so the rewritten model can
be checked and calibrated), and emits the ONNX nodes that compute the same from integers:

- :class:`ActQuant`, a layer's input: ``Clip`` then ``QuantizeLinear``/``DequantizeLinear`` to uint8
  (scale ``alpha / (2^a - 1)``, zero point 0; a signed input has zero point 128). Above 8 bits
  there is no 8-bit form, and the exact graph rounds in float instead.
- :class:`WeightCodes`, a weight: int8 codes and a scale per output channel, read by
  ``DequantizeLinear``. DoReFa weights of 2..7 bits are odd codes ``2q - n`` (``n = 2^k - 1``) times
  ``1/n``; 1 bit is ``+-1`` times ``mean|w|``; folding batch norm only changes each channel's scale.
- :class:`Requant`, a convolution's output in the fast graph: uint8 with a calibrated range, so that
  ONNX Runtime fuses the convolution into ``QLinearConv``.

The specs reach the ONNX graph through one ``torch.autograd.Function`` whose ``symbolic`` calls
``emit`` where its forward called ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference

__all__ = ["ActQuant", "WeightCodes", "Requant", "quantize_input", "dequantize_weight", "requantize", "codes_of",
           "requantized_codes"]

UINT8_MAX = 255


def _constant(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


@dataclass(eq=False)
class ActQuant:
    """A layer's input quantization: clip to [0, alpha] ([-alpha, alpha] when signed), ``bits`` levels.
    ``in_float``: for a layer the fast graph runs in float: the integer codes as floats, by ops ONNX
    Runtime does not fuse into an int8 kernel (unsigned up to 8 bits: ``QuantizeLinear`` to uint8,
    after a ``Clip`` below 8 bits, then ``Cast``; else clip, scale, round); the layer's float weight
    carries their ``scale``. At 8 unsigned bits that is two ops where clip, scale, round and scale
    back were four; at batch 1 each op is time (see the README's deploy section)."""

    alpha: torch.Tensor  # float32 scalar
    bits: int
    signed: bool
    in_float: bool = False

    @property
    def levels(self) -> int:
        return reference.act_levels(self.bits, self.signed)

    @property
    def scale(self) -> torch.Tensor:
        return (self.alpha / self.levels).to(torch.float32)

    @property
    def zero_point(self) -> int:
        return 128 if self.signed else 0

    @property
    def fits_uint8(self) -> bool:
        return self.bits <= 8

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = reference.fake_quant_act(x, self.alpha, self.bits, self.signed)[0]
        return torch.round(y / self.scale) if self.in_float else y  # in float: the codes, exact integers

    def emit(self, g, x):
        if self.in_float and not self.signed and self.fits_uint8:
            return self._emit_codes(g, x)
        lo = -self.alpha if self.signed else torch.zeros_like(self.alpha)
        if self.signed or self.bits != 8:  # at 8 unsigned bits, uint8 saturation is the clip
            x = g.op("Clip", x, _constant(g, lo.reshape(())), _constant(g, self.alpha.reshape(())))
        scale = _constant(g, self.scale.reshape(()))
        if self.in_float or not self.fits_uint8:  # round in float, as the reference does
            codes = g.op("Round", g.op("Mul", x, _constant(g, (1.0 / self.scale).reshape(()))))
            return codes if self.in_float else g.op("Mul", codes, scale)
        zero = _constant(g, torch.tensor(self.zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale, zero)

    def _emit_codes(self, g, x):
        """Unsigned codes as floats: uint8 saturation is the clip at 8 bits (0 and 255 levels)."""
        if self.bits != 8:
            x = g.op("Clip", x, _constant(g, torch.zeros(())), _constant(g, self.alpha.reshape(())))
        codes = g.op("QuantizeLinear", x, _constant(g, self.scale.reshape(())),
                     _constant(g, torch.tensor(0, dtype=torch.uint8)))
        return g.op("Cast", codes, to_i=1)  # TensorProto.FLOAT


@dataclass(eq=False)
class WeightCodes:
    """A weight as int8 ``codes`` [out, ...] times a float32 ``scale`` per output channel."""

    codes: torch.Tensor  # int8
    scale: torch.Tensor  # float32 [out]
    bits: int  # the bits each code needs (what a packed file would spend)

    def apply(self, anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float weight (``anchor``, the tensor the exporter places the nodes by, is not read)."""
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.to(torch.float32) * self.scale.view(shape)

    def emit(self, g, anchor=None):
        zero = torch.zeros(self.scale.shape, dtype=torch.int8)
        return g.op("DequantizeLinear", _constant(g, self.codes), _constant(g, self.scale), _constant(g, zero), axis_i=0)


@dataclass(eq=False)
class Requant:
    """A convolution's output, re-quantized to uint8 over a calibrated range ``[low, high]``."""

    scale: float
    zero_point: int

    @classmethod
    def over(cls, low: float, high: float) -> "Requant":
        low, high = min(low, 0.0), max(high, 0.0)
        scale = float(torch.tensor((high - low) / UINT8_MAX, dtype=torch.float32)) or 1.0
        return cls(scale, int(min(max(round(-low / scale), 0), UINT8_MAX)))

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(y, self.scale, self.zero_point, 0, UINT8_MAX)

    def emit(self, g, y):
        scale = _constant(g, torch.tensor(self.scale, dtype=torch.float32))
        zero = _constant(g, torch.tensor(self.zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", y, scale, zero), scale, zero)


class _Spec(torch.autograd.Function):
    """Runs ``spec.apply(x)``; the exporter emits ``spec.emit(g, x)`` in its place."""

    @staticmethod
    def forward(ctx, x, spec):
        return spec.apply(x)

    @staticmethod
    def symbolic(g, x, spec):
        return spec.emit(g, x)


def quantize_input(x: torch.Tensor, spec: Optional[ActQuant]) -> torch.Tensor:
    return x if spec is None else _Spec.apply(x, spec)


def dequantize_weight(anchor: torch.Tensor, spec: WeightCodes) -> torch.Tensor:
    """The float weight of ``spec`` (``anchor``: any tensor of the forward, which the exporter needs
    to place the nodes)."""
    return _Spec.apply(anchor, spec)


def requantize(y: torch.Tensor, spec: Optional[Requant]) -> torch.Tensor:
    return y if spec is None else _Spec.apply(y, spec)


def codes_of(weight: torch.Tensor, bits: int) -> Optional[WeightCodes]:
    """The exact int8 form of a DoReFa ``bits``-bit weight (per-layer scale), or None when the codes
    do not fit in int8 (8 bits and more)."""
    w = weight.detach().to(torch.float32)
    out = w.shape[0]
    if bits == 1:
        e = w.abs().mean()
        codes = torch.where(w >= 0, 1, -1).to(torch.int8)
        return WeightCodes(codes, e.expand(out).clone(), 1)
    if bits > 7:
        return None
    n = (1 << bits) - 1
    quantized = reference.quantize_weight(w, bits)
    codes = torch.round(quantized * n)
    return WeightCodes(codes.to(torch.int8), torch.full((out,), 1.0 / n, dtype=torch.float32), bits)


def requantized_codes(weight: torch.Tensor) -> WeightCodes:
    """Symmetric int8 codes per output channel of a float weight (for weights of 8 bits and more
    in the fast graph; the rounding error is what the fast graph changes)."""
    w = weight.detach().to(torch.float32)
    peak = w.abs().flatten(1).amax(dim=1)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    shape = (-1,) + (1,) * (w.dim() - 1)
    codes = torch.round(w / scale.view(shape)).clamp(-127, 127)
    return WeightCodes(codes.to(torch.int8), scale, 8)
