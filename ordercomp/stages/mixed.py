"""Bits per layer: how much each quantized layer's output suffers from fewer bits, and the bits that
lose the least under a BitOps limit.

- :func:`sensitivities`: for each quantized layer and each ``(w_bits, a_bits)`` option, the mean
  KL divergence of the model's predicted distribution when that layer alone is set to those bits
  (every other layer as it is) from the model as it is, over calibration batches. The model's
  batch-norm statistics must be its own: DoReFa rescales the weights, and statistics still set
  for the float model make the reference itself wrong (Q re-estimates them first). With
  ``recalibrate`` they are also re-estimated at each option (and put back after), as fine-tuning
  would; that ranked the true change of single layers worse on digits
  (``benchmarks/bench_sensitivity.py``), so Q does not.
- :func:`hessian_sensitivities`: HAWQ-v2's measure for weights, the mean Hessian trace of the loss
  over a layer's weights (Hutchinson's estimate on calibration batches, taken at the weights the
  layer computes with) times the squared change of those weights at fewer bits; inputs do not
  enter it (``benchmarks/bench_sensitivity.py`` compares the two against the true accuracy change).
- :func:`allocate`: the option per layer with the least total sensitivity whose total BitOps stay
  within a limit: an exact dynamic program over the BitOps axis (a multiple-choice knapsack), in
  ``resolution`` steps of the limit with every layer's cost rounded up, so the result never
  exceeds the limit (it is the optimum of the rounded problem).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import bitops, ops
from ..errors import ConfigError
from ..nn import QuantLayer, select_logits
from ..nn.quant import FLOAT_BITS
from ..nn.modes import evaluating

__all__ = ["Bits", "sensitivities", "hessian_sensitivities", "layer_macs", "allocate", "assignment_bitops"]

Bits = Tuple[int, int]


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> Dict[str, float]:
    """MACs per input of every quantized layer of ``model`` (by name)."""
    names = {name for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    return {r.name: float(r.macs) for r in bitops.profile(model, example_input).layers if r.name in names}


def assignment_bitops(macs: Mapping[str, float], bits: Mapping[str, Bits]) -> float:
    """BitOps per input of the quantized layers at ``bits`` (MACs times weight bits times input bits)."""
    return float(sum(macs[name] * w * a for name, (w, a) in bits.items()))


def _norm_state(model: nn.Module) -> List[Tuple[nn.Module, Dict[str, torch.Tensor]]]:
    """A copy of every batch norm's running statistics, to put back with :func:`_put_back`."""
    return [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _put_back(state: List[Tuple[nn.Module, Dict[str, torch.Tensor]]]) -> None:
    for m, buffers in state:
        for k, v in buffers.items():
            getattr(m, k).copy_(v)


@torch.no_grad()
def sensitivities(model: nn.Module, batches: Iterable[torch.Tensor], options: Sequence[Bits],
                  output=None, recalibrate: Optional[Callable[[nn.Module], Any]] = None
                  ) -> Dict[str, Dict[Bits, float]]:
    """``{layer: {(w_bits, a_bits): mean KL(model as it is || that layer alone at those bits)}}`` over
    ``batches`` of inputs, for every quantized layer of ``model`` (left as it was, its batch-norm
    statistics included). ``recalibrate(model)``: re-estimates the batch-norm statistics, called at
    each option before it is measured (see the module text; give the model as it is statistics
    estimated the same way, or the reference is the stale one)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ConfigError("sensitivities: the model has no quantized layer (quantize it first)")
    inputs = [x for x in batches]
    with evaluating(model):
        reference = [F.log_softmax(select_logits(model(x), output).float(), 1) for x in inputs]

        def divergence() -> float:
            total = sum(F.kl_div(F.log_softmax(select_logits(model(x), output).float(), 1), ref, log_target=True,
                                 reduction="sum").item() for x, ref in zip(inputs, reference))
            return total / sum(len(x) for x in inputs)

        out: Dict[str, Dict[Bits, float]] = {}
        norms = _norm_state(model) if recalibrate is not None else []
        for name, layer in layers.items():
            kept = (layer.w_bits, layer.a_bits)
            out[name] = {}
            try:
                for w, a in options:
                    layer.configure(w, a)
                    if recalibrate is not None:
                        recalibrate(model)
                        model.eval()
                    out[name][(w, a)] = max(0.0, divergence())
            finally:
                layer.configure(*kept)
                _put_back(norms)
    return out


def _float_twin(model: nn.Module) -> Tuple[nn.Module, Dict[str, nn.Parameter]]:
    """A float copy of ``model`` whose quantized layers compute with their quantized weights as plain
    parameters (their inputs unquantized), and those parameters by layer name."""
    twin = copy.deepcopy(model)
    weights = {}
    for name, m in twin.named_modules():
        if isinstance(m, QuantLayer):
            effective = m.quantized_weight().detach().clone()
            m.configure(FLOAT_BITS, FLOAT_BITS)
            with torch.no_grad():
                m.weight.copy_(effective)
            weights[name] = m.weight
    return twin, weights


def hessian_sensitivities(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                          w_bits: Sequence[int], samples: int = 16, output=None,
                          seed: int = 0) -> Dict[str, Dict[int, float]]:
    """``{layer: {w_bits: mean Tr(H) * ||W(w_bits) - W||^2}}`` (HAWQ-v2; see the module text) over
    ``batches`` of ``(inputs, labels)``, ``samples`` Rademacher vectors per layer."""
    twin, weights = _float_twin(model)
    params = list(weights.values())
    traces = {name: 0.0 for name in weights}
    generator = torch.Generator().manual_seed(seed)
    data = list(batches)
    with evaluating(twin):
        for _ in range(samples):
            vs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            for x, y in data:
                loss = F.cross_entropy(select_logits(twin(x), output), y)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                hv = torch.autograd.grad(grads, params, grad_outputs=vs)
                for name, v, h in zip(weights, vs, hv):
                    traces[name] += float((v * h).sum()) / (samples * len(data) * v.numel())
    layers = dict(model.named_modules())
    out = {}
    for name, trace in traces.items():
        layer = layers[name]
        now = layer.quantized_weight().detach()
        out[name] = {b: trace * float(((ops.quantize_weight(layer.weight.detach(), b) - now) ** 2).sum())
                     for b in w_bits}
    return out


def allocate(macs: Mapping[str, float], sensitivity: Mapping[str, Mapping[Bits, float]], limit: float,
             resolution: int = 2000) -> Dict[str, Bits]:
    """The ``(w_bits, a_bits)`` per layer (of ``sensitivity``'s options) with the least total
    sensitivity whose BitOps (``macs`` x w x a) stay within ``limit`` (see the module text).
    Raises when even the cheapest options exceed the limit."""
    names = list(sensitivity)
    if not names:
        return {}
    step = float(limit) / resolution
    choices: List[List[Tuple[Bits, int, float]]] = []
    for name in names:
        options = []
        for bits, s in sensitivity[name].items():
            cost = macs[name] * bits[0] * bits[1]
            options.append((tuple(bits), int(math.ceil(cost / step - 1e-9)) if step > 0 else 0, float(s)))
        choices.append(options)
    cheapest = sum(min(c for _, c, _ in options) for options in choices)
    if step <= 0 or cheapest > resolution:
        least = sum(min(macs[n] * b[0] * b[1] for b in sensitivity[n]) for n in names)
        if step > 0 and least <= limit * (1 + 1e-9):  # fits, but each cost rounded up to whole steps does not:
            return {n: min(sensitivity[n], key=lambda b: (macs[n] * b[0] * b[1], sensitivity[n][b]))  # the fewest
                    for n in names}  # bits are all there is within the limit (a ladder's lowest level)
        raise ConfigError(f"a BitOps limit of {limit:.4g} cannot be met: the fewest bits of every layer take "
                          f"{least:.4g} BitOps")
    best = np.full(resolution + 1, np.inf)
    best[0] = 0.0
    picks = []
    for options in choices:  # best[j]: least sensitivity of the layers so far at exactly j steps
        nxt = np.full(resolution + 1, np.inf)
        pick = np.full(resolution + 1, -1, dtype=np.int64)
        for k, (_, cost, s) in enumerate(options):
            if cost > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[cost:] = best[:resolution + 1 - cost] + s
            better = candidate < nxt
            nxt[better], pick[better] = candidate[better], k
        best = nxt
        picks.append(pick)
    j = int(np.argmin(best))
    chosen: Dict[str, Bits] = {}
    for i in range(len(names) - 1, -1, -1):
        k = int(picks[i][j])
        bits, cost, _ = choices[i][k]
        chosen[names[i]] = bits
        j -= cost
    return {name: chosen[name] for name in names}
