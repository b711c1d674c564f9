"""Accuracy changes with their uncertainty: paired 95 % intervals over the same evaluation inputs.

Two models evaluated on the same inputs are compared input by input: the change of input i is
``d_i = correct_b[i] - correct_a[i]`` (-1, 0 or +1), so inputs both get right or both get wrong
add no noise. The interval is the normal approximation ``mean(d) +- 1.96 * sd(d) / sqrt(n)``, in
percentage points; :func:`paired_loss_bound` gives the one-sided upper end of a loss at a chosen
confidence.
"""

from __future__ import annotations

import math
import statistics
from typing import Tuple

import torch

from .errors import ArgumentTypeError, ConfigError, DataError

__all__ = ["paired_change", "paired_loss_bound", "loss_margin", "Z95", "pack_correct", "unpack_correct"]

Z95 = 1.959964


def paired_change(correct_a: torch.Tensor, correct_b: torch.Tensor) -> Tuple[float, float, float]:
    """``(change, low, high)`` in percentage points of accuracy ``b`` minus accuracy ``a``, with its
    paired 95 % interval; ``correct_*`` are per-input booleans over the same inputs in the same order."""
    d = _differences(correct_a, correct_b)
    mean = float(d.mean())
    half = _half_width(d, Z95)
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


def paired_loss_bound(reference_correct: torch.Tensor, correct: torch.Tensor,
                      confidence: float) -> Tuple[float, float]:
    """``(loss, margin)`` in percentage points: accuracy of ``reference_correct`` minus that of
    ``correct`` (per-input booleans over the same inputs), and ``100 * z * sd(d) / sqrt(n)`` with
    ``d_i = reference_correct[i] - correct[i]`` and z the one-sided normal quantile of
    ``confidence`` in [0.5, 1); ``loss + margin`` is the upper end of the one-sided interval
    (0.5 gives z = 0: the point estimate; a single input gives an infinite margin)."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be a number in [0.5, 1), got {confidence!r}")
    d = _differences(correct, reference_correct)
    z = statistics.NormalDist().inv_cdf(confidence)
    return 100 * float(d.mean()), 100 * _half_width(d, z) if z else 0.0


def loss_margin(changed: float, loss: float, n: int, confidence: float) -> float:
    """The margin (pp) :func:`paired_loss_bound` gives a model whose answers differ from the
    reference's (right against wrong) on the share ``changed`` of ``n`` inputs, with the loss
    ``loss`` (pp): ``mean(d) = loss / 100`` and ``mean(d^2) = changed`` (at least ``|mean(d)|``),
    so ``sd(d)^2 = (changed - mean(d)^2) n / (n - 1)``. For margins of runs not made, from shares
    and losses estimated from those of others."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be a number in [0.5, 1), got {confidence!r}")
    z = statistics.NormalDist().inv_cdf(confidence)
    if not z:
        return 0.0
    if n < 2:
        return math.inf
    mean = loss / 100
    second = min(max(changed, abs(mean)), 1.0)
    return 100 * z * math.sqrt(max(second - mean * mean, 0.0) * n / (n - 1)) / math.sqrt(n)


def _differences(correct_a: torch.Tensor, correct_b: torch.Tensor) -> torch.Tensor:
    """``correct_b - correct_a`` per input, as doubles; refuses results of different inputs."""
    a, b = (torch.as_tensor(c) for c in (correct_a, correct_b))
    if a.shape != b.shape or a.dim() != 1:
        raise DataError(f"paired accuracies need per-input results of the same inputs: got shapes "
                        f"{tuple(a.shape)} and {tuple(b.shape)} (was the evaluation data shuffled or changed?)")
    if a.numel() == 0:
        raise DataError("paired accuracies need at least one input")
    return b.double() - a.double()


def _half_width(d: torch.Tensor, z: float) -> float:
    """``z`` standard errors of the mean of ``d`` (infinite for a single input)."""
    n = d.numel()
    return z * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf


def pack_correct(correct: torch.Tensor) -> str:
    """Per-input booleans as a compact hex string (for JSON state files); see :func:`unpack_correct`."""
    c = torch.as_tensor(correct)
    if c.dtype != torch.bool or c.dim() != 1:
        raise ArgumentTypeError(f"correct must be a 1-D bool tensor, got {c.dtype} {tuple(c.shape)}")
    bits = "".join("1" if v else "0" for v in c.tolist())
    return f"{len(bits)}:" + (f"{int(bits, 2):x}" if bits else "0")


def unpack_correct(text: str) -> torch.Tensor:
    """The booleans :func:`pack_correct` wrote."""
    n, _, digits = text.partition(":")
    bits = bin(int(digits, 16))[2:].zfill(int(n)) if int(n) else ""
    return torch.tensor([ch == "1" for ch in bits], dtype=torch.bool)
