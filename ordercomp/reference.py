"""Pure-PyTorch twins of every compiled op.

They are the test oracle for the kernels and the fallback when the compiled library is not
available. Each function mirrors one op schema in ``csrc/ops.cpp`` exactly: same arguments,
same outputs, same rounding (round half to even, as ``torch.round`` and ``nearbyint`` do).
Argument checking lives in :mod:`ordercomp.ops`; these functions assume valid input.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "act_levels",
    "fake_quant_act",
    "fake_quant_act_backward",
    "quantize_weight",
    "quantize_weight_backward",
    "exit_check",
    "accumulate_bitops",
]


def act_levels(bits: int, signed: bool) -> int:
    """Number of quantization steps on each side of zero: 2^k - 1 unsigned, 2^(k-1) - 1 signed."""
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def fake_quant_act(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool = False):
    """k-bit uniform fake quantization of ``x`` clipped to [0, alpha] (signed: [-alpha, alpha]).

    Returns ``(out, region)``: ``region`` is int8, -1 where x was below the clip range, +1 where
    it was above, 0 inside. The straight-through backward passes the gradient to ``x`` where
    region == 0 and gives ``alpha`` the PACT gradient (sum of the gradient where region == +1,
    minus where region == -1 for the signed variant). ``+-inf`` inputs clip; a NaN input gives a
    NaN output in region 0 (``minimum``/``maximum`` propagate NaN, and NaN compares false).
    """
    levels = act_levels(bits, signed)
    a = alpha.reshape(()).to(torch.float32)
    lo = -a if signed else torch.zeros_like(a)
    scale = a / levels
    inv_scale = 1.0 / scale
    xf = x.to(torch.float32)
    out = torch.round(torch.minimum(torch.maximum(xf, lo), a) * inv_scale) * scale
    region = (xf > a).to(torch.int8) - (xf < lo).to(torch.int8)
    return out.to(x.dtype), region


def fake_quant_act_backward(grad: torch.Tensor, region: torch.Tensor, signed: bool = False):
    """Straight-through gradients of :func:`fake_quant_act`: ``(grad_x, grad_alpha)``.

    Each gradient element goes to the one input its output depends on: to ``x`` in region 0, to
    ``alpha`` in region +1 (and, negated, -1 when signed), nowhere else; so a NaN or infinite
    gradient reaches ``alpha`` only from the elements that were clipped.
    """
    g = grad.to(torch.float32)
    zero = torch.zeros_like(g)
    grad_x = torch.where(region == 0, g, zero).to(grad.dtype)
    below = torch.where(region < 0, -g, zero) if signed else zero
    grad_alpha = torch.where(region > 0, g, below).sum()
    return grad_x, grad_alpha


def _tanh_normalised(w: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(w)
    m = t.abs().amax().clamp_min(torch.finfo(t.dtype).tiny)
    return t / m


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantizer.

    k >= 2: ``w' = tanh(w) / max|tanh(w)| * 0.5 + 0.5``, ``w_q = 2 * round(w' * (2^k-1)) / (2^k-1) - 1``;
    k = 1: ``sign(w) * mean|w|`` (sign(0) = +1, so every weight takes one of two values);
    k = 32: identity.

    Non-finite weights: ``+-inf`` maps to ``+-1`` (k >= 2, as tanh(+-inf) = +-1) and makes the
    k = 1 scale infinite. One NaN weight makes the whole output NaN (k = 1 and k >= 2): the scale
    ``max|tanh(w)|`` (or ``mean|w|``) of the tensor is NaN, and a training run that diverged
    shows it at once instead of quantizing the other weights with a scale that ignores it.
    """
    if w.numel() == 0 or bits == 32:
        return w.clone()
    wf = w.to(torch.float32)
    if bits == 1:
        e = wf.abs().mean()
        return torch.where(wf >= 0, e, -e).to(w.dtype)
    n = (1 << bits) - 1
    unit = _tanh_normalised(wf) * 0.5 + 0.5
    return (2.0 * torch.round(unit * n) / n - 1.0).to(w.dtype)


def quantize_weight_backward(grad: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """Straight-through gradient of :func:`quantize_weight`.

    k >= 2: rounding passes the gradient unchanged; tanh and the division by the maximum are
    differentiated exactly (the maximum's gradient goes to the largest weights, shared evenly
    among ties, as ``amax`` does). k = 1 and k = 32: identity, as in DoReFa, where ``sign`` has
    an identity gradient and the scale ``mean|w|`` is a constant. For k >= 2 a NaN weight makes
    every gradient NaN (the scale is NaN); an infinite one gets gradient 0 (tanh is flat there).
    """
    if bits in (1, 32) or w.numel() == 0:
        return grad.clone()
    with torch.enable_grad():
        wf = w.detach().to(torch.float32).requires_grad_(True)
        (gw,) = torch.autograd.grad(_tanh_normalised(wf), wf, grad.to(torch.float32))
    return gw.to(w.dtype)


def exit_check(logits: torch.Tensor, threshold: float, criterion: str = "maxprob"):
    """Early-exit decision for a batch of logits [B, C].

    ``maxprob``: confidence = max softmax probability. ``entropy``: confidence = 1 - H(p)/log(C)
    (1 for a one-hot prediction, 0 for a uniform one; 1 when C == 1). Returns
    ``(confidence [B] (logits dtype), prediction [B] int64, exit_mask [B] bool)`` with
    ``exit_mask = confidence >= threshold``.

    Non-finite logits: a ``-inf`` logit has probability 0 (p log p = 0) when the row's maximum is
    finite. A row with no softmax -- any NaN, any ``+inf`` (inf - inf), or only ``-inf`` -- has
    NaN confidence under both criteria (C == 1 included) and so never exits; its prediction is
    ``argmax``'s, which ranks NaN highest (the first NaN, else the first maximum).
    """
    lf = logits.to(torch.float32)
    pred = lf.argmax(dim=1) if lf.shape[0] > 0 else torch.zeros(0, dtype=torch.int64, device=lf.device)
    logp = torch.log_softmax(lf, dim=1)
    if criterion == "maxprob":
        conf = logp.amax(dim=1).exp() if lf.shape[0] > 0 else lf.new_zeros(0)
    else:
        num_classes = lf.shape[1]
        if num_classes == 1:
            conf = 1.0 + logp[:, 0]  # log p is 0, or NaN for a non-finite logit
        else:
            plogp = torch.where(logp == -math.inf, torch.zeros_like(logp), logp.exp() * logp)
            entropy = -plogp.sum(dim=1)
            conf = 1.0 - entropy / math.log(num_classes)
    return conf.to(logits.dtype), pred, conf >= threshold


def accumulate_bitops(counter: torch.Tensor, active_mask: torch.Tensor, bitops: float) -> None:
    """Adds ``bitops`` to ``counter[i]`` for every input ``i`` still active (in place)."""
    counter.add_(active_mask.to(counter.dtype) * torch.tensor(bitops, dtype=counter.dtype, device=counter.device))
