"""The fast graph keeps the model's predictions: where re-quantizing convolution outputs costs
agreement, the convolutions that cost the most run in float.

Each :class:`~.twin.RequantPoint` rounds a value to 8 bits that the model kept in float (a conv's
output before a residual add or a squeeze-excitation gate). One at a time these roundings are
harmless; over a deep network they add up (a timm RegNetY-400MF trained on digits: 98.8 % top-1
agreement with all 47 of its re-quantized outputs, 31 of them signed, 100 % with none; the four of
its first two blocks make 62 % of the summed cost). :func:`keep_agreement` measures the twin's
agreement with the model on the calibration inputs; below ``min_agreement`` it ranks the points by
what each alone costs (the KL divergence of the logits when only that point rounds) and runs the
convs of the fewest top-ranked points in float that bring the agreement back, found by bisection.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable, Collection, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ExitNet
from .twin import RequantPoint, calibrate

__all__ = ["Fallback", "agreement", "keep_agreement", "sensitivities"]

RANKING_INPUTS = 256  # inputs the per-point costs are measured on (the agreement on all of them)


@dataclasses.dataclass
class Fallback:
    """What :func:`keep_agreement` did: the twin's top-1 agreement (%) with the model on the
    calibration inputs before and after, and the quantized convs it moved to float."""

    min_agreement: float
    before: float
    after: float
    layers: List[str]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.infer(x).logits if isinstance(model, ExitNet) else model(x)


@torch.no_grad()
def agreement(model: nn.Module, twin: nn.Module, inputs: Sequence[torch.Tensor],
              reference: Optional[List[torch.Tensor]] = None) -> float:
    """% of ``inputs`` (batches) on which ``twin`` predicts the class ``model`` predicts."""
    reference = reference or [_logits(model, x) for x in inputs]
    same = sum(int((_logits(twin, x).argmax(1) == r.argmax(1)).sum()) for x, r in zip(inputs, reference))
    return 100.0 * same / sum(x.shape[0] for x in inputs)


def _points(twin: nn.Module) -> List[RequantPoint]:
    return [m for m in twin.modules() if isinstance(m, RequantPoint) and m.spec is not None and m.layer]


@torch.no_grad()
def sensitivities(model: nn.Module, twin: nn.Module, inputs: Sequence[torch.Tensor],
                  reference: Optional[List[torch.Tensor]] = None) -> Dict[str, float]:
    """``{layer: cost}``: the KL divergence from the model's logits (``reference``, when computed
    already) to the twin's on ``inputs`` when only that layer's output point re-quantizes (a
    calibrated twin; it is left as it was)."""
    points = _points(twin)
    specs = [p.spec for p in points]
    reference = [F.log_softmax(r, 1) for r in (reference or [_logits(model, x) for x in inputs])]
    costs: Dict[str, float] = {}
    try:
        for p in points:
            p.spec = None
        for p, spec in zip(points, specs):
            p.spec = spec
            kl = sum(float(F.kl_div(F.log_softmax(_logits(twin, x), 1), r, log_target=True, reduction="sum"))
                     for x, r in zip(inputs, reference))
            costs[p.layer] = costs.get(p.layer, 0.0) + kl / sum(x.shape[0] for x in inputs)
            p.spec = None
    finally:
        for p, spec in zip(points, specs):
            p.spec = spec
    return costs


def _first(inputs: Sequence[torch.Tensor], n: int) -> List[torch.Tensor]:
    out, seen = [], 0
    for x in inputs:
        if seen >= n:
            break
        out.append(x[:n - seen])
        seen += out[-1].shape[0]
    return out


@torch.no_grad()
def _fewest(model: nn.Module, twin: nn.Module, inputs: Sequence[torch.Tensor], ranked: List[str],
            min_agreement: float, reference: List[torch.Tensor]) -> "tuple[Optional[int], float]":
    """``(k, ceiling)``: the fewest ``k`` of ``ranked`` whose points, left out, bring the twin to
    ``min_agreement`` (bisection; None when leaving out all of them does not), and the agreement
    with all of them left out."""
    points = _points(twin)
    specs = {p: p.spec for p in points}

    def without(k: int) -> float:
        off = set(ranked[:k])
        for p in points:
            p.spec = None if p.layer in off else specs[p]
        return agreement(model, twin, inputs, reference)

    try:
        ceiling = without(len(ranked))
        if ceiling < min_agreement:
            return None, ceiling
        low, high = 0, len(ranked)  # meets at high; not at low, measured before
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if without(mid) >= min_agreement else (mid, high)
        return high, ceiling
    finally:
        for p in points:
            p.spec = specs[p]


def keep_agreement(model: nn.Module, twin: nn.Module, inputs: Sequence[torch.Tensor], min_agreement: float,
                   rebuild: Callable[[Collection[str]], nn.Module]) -> "tuple[nn.Module, Fallback]":
    """``(twin, fallback)``: ``twin`` (calibrated on ``inputs``) when its agreement with ``model`` there
    is at least ``min_agreement`` (%), else ``rebuild(layers)`` calibrated, with the fewest quantized
    convs run in float that meet it (see the module text)."""
    reference = [_logits(model, x) for x in inputs]
    before = agreement(model, twin, inputs, reference)
    points = _points(twin)
    if before >= min_agreement or not points:
        return twin, Fallback(min_agreement, before, before, [])
    log = logging.getLogger("ordercomp.export").info
    log("the fast graph agrees with the model on %.2f %% of the calibration inputs, below min_agreement=%g: "
        "measuring what each of its %d re-quantized outputs costs", before, min_agreement, len(points))
    ranking = _first(inputs, RANKING_INPUTS)
    costs = sensitivities(model, twin, ranking, _first(reference, RANKING_INPUTS))
    ranked = sorted(costs, key=costs.get, reverse=True)
    k, ceiling = _fewest(model, twin, inputs, ranked, min_agreement, reference)
    if k is None:
        warnings.warn(f"the fast graph agrees with the model on {before:.2f} % of the calibration inputs, below "
                      f"min_agreement={min_agreement:g}; with all {len(ranked)} re-quantized convs in float it would "
                      f"agree on {ceiling:.2f} % (the rest: the rounding of 8-bit weights to int8, and exits or "
                      "classes the model itself decides by a hair); kept as it is: a min_agreement of at most "
                      f"{ceiling:.2f} moves the convs that cost most to float, mode='exact' keeps the model's own "
                      "integers", stacklevel=3)
        return twin, Fallback(min_agreement, before, before, [])
    layers = ranked[:k]
    log("running %d conv(s) in float: %s", k, ", ".join(layers))
    twin = rebuild(layers)
    calibrate(twin, inputs)
    return twin, Fallback(min_agreement, before, agreement(model, twin, inputs, reference), layers)
