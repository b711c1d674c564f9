"""Measured latency as a cost: a candidate exported as it will be deployed and timed against the original.

:class:`LatencyMeter` exports a model (``mode="fast"``, one graph) to a temporary folder, loads it in
ONNX Runtime on CPU and times it at one batch size in interleaved rounds with the original's float
graph (:func:`~.timing.time_variants`): drift of a shared machine falls on both, and the cost is
their ratio, the **speed-up** (original time / candidate time). An ExitNet is timed at each
threshold asked for in the same rounds (its graph takes the threshold as an input), on real inputs,
so the exits see the mix of easy and hard inputs they would in use.

Timings are cached: a plain model by its architecture and precision (every layer's kind, shape,
stride, groups and bits: two models alike in those run alike, whatever their weights), an ExitNet
also by its weights (which inputs leave where depends on them) and the threshold.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from pathlib import Path
from typing import Dict, Hashable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import checks, runtime
from ..nn import ExitNet
from .api import INT8_MIN_CHANNELS, export
from .timing import time_variants

__all__ = ["LatencyMeter", "signature"]

def signature(model: nn.Module) -> Tuple:
    """What a model's latency depends on besides its inputs: every layer's kind, weight shape, stride,
    groups and bits (and an ExitNet's exit points)."""
    layers = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        layers.append((name, type(m).__name__, tuple(weight.shape), getattr(m, "stride", None),
                       getattr(m, "groups", None), getattr(m, "w_bits", None), getattr(m, "a_bits", None)))
    return (tuple(layers), tuple(getattr(model, "points", ()) or ()))


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:  # extra state
            digest.update(repr(value).encode())
    return digest.hexdigest()


class LatencyMeter:
    """The measured speed-up of candidate models over ``original`` (see the module text).

    ``inputs``: real inputs [N, C, H, W], N >= ``batch``: the fast graph's calibration and the
    timing inputs. ``rounds``: interleaved timing rounds per measurement. ``threads``: ONNX Runtime's
    intra-op threads. ``exports`` counts the candidates exported (cache misses)."""

    def __init__(self, original: nn.Module, inputs: torch.Tensor, batch: int = 1, rounds: int = 5,
                 threads: int = 1, int8_min_channels: int = INT8_MIN_CHANNELS):
        self.batch = checks.integer("budget.latency_batch", batch, 1)
        self.rounds = checks.integer("rounds", rounds, 1)
        self.threads = checks.integer("threads", threads, 1)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or len(inputs) < self.batch:
            raise ValueError(f"inputs must be a tensor [N, C, H, W] with N >= batch ({self.batch}), got "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        self.inputs = inputs.detach().float().cpu()
        self._numpy = np.ascontiguousarray(self.inputs.numpy())
        self.int8_min_channels = int8_min_channels
        self._folder = tempfile.TemporaryDirectory(prefix="ordercomp-latency-")
        self._original = self._load(original.eval(), "original", "exact")
        self._cache: Dict[Hashable, Tuple[float, float]] = {}
        self.exports = 0

    def _load(self, model: nn.Module, name: str, mode: str):
        if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
            model = copy.deepcopy(model).cpu()  # timed where it is deployed: ONNX Runtime on the CPU
        path = Path(self._folder.name) / name
        export(model, path, mode, calibration=self.inputs if mode == "fast" else None,
               input_shape=list(self.inputs.shape[1:]), threads=self.threads,
               int8_min_channels=self.int8_min_channels)
        return runtime.load(path, threads=self.threads)

    def key(self, model: nn.Module, threshold: Optional[float] = None) -> Hashable:
        if isinstance(model, ExitNet):
            return signature(model), _weights_digest(model), model.criterion, float(threshold)
        return signature(model)

    def measure(self, model: nn.Module, thresholds: Optional[Sequence[float]] = None) -> Dict[Optional[float], Tuple[float, float]]:
        """``{threshold: (milliseconds per call, speed-up)}`` of ``model`` (an ExitNet at each of
        ``thresholds``, default its own; any other model under the key None)."""
        exits = isinstance(model, ExitNet)
        wanted = [float(t) for t in (thresholds if thresholds is not None else [model.threshold])] if exits else [None]
        keys = {t: self.key(model, t) for t in wanted}
        missing = [t for t in wanted if keys[t] not in self._cache]
        if missing:
            self.exports += 1
            if exits and model.threshold is None:  # not chosen yet: the graph takes it as an input anyway
                model = copy.deepcopy(model)
                model.threshold = min(wanted[0], 1.0)
            deployed = self._load(model.eval(), f"candidate{self.exports}", "fast")
            variants = {"original": self._original.run}
            for t in missing:
                variants[str(t)] = (lambda x, t=t: deployed.run(x, threshold=t)) if exits else deployed.run
            timed = time_variants(variants, self._numpy, (self.batch,), self.rounds)
            reference = timed["original"][self.batch]
            for t in missing:
                ms = timed[str(t)][self.batch]
                self._cache[keys[t]] = (ms, reference / ms)
        return {t: self._cache[keys[t]] for t in wanted}

    def speedup(self, model: nn.Module) -> float:
        """The speed-up of ``model`` over the original (an ExitNet at its own threshold)."""
        return next(iter(self.measure(model).values()))[1]

    def speedups(self, net: ExitNet, thresholds: Sequence[float]) -> Dict[float, float]:
        """``{threshold: speed-up}`` of an ExitNet; a threshold above 1 runs it without its heads."""
        return {t: v[1] for t, v in self.measure(net, thresholds).items()}

    def close(self) -> None:
        self._folder.cleanup()
