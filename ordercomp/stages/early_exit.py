"""E: exit heads trained on a frozen body, and a confidence threshold chosen on calibration data.

:func:`choose_threshold` chooses an ExitNet's threshold; the runner calls it after every stage
that leaves a model with exits (their accuracy has changed), and so can a user's own loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import bitops, checks, ops, stats
from ..data import unpack
from ..errors import ConfigError, DataError, ModelError
from ..losses import TaskObjective
from ..nn import HEADS, ExitNet, QuantLayer, attach_exits
from ..nn.points import DEFAULT_NUM_POINTS, candidate_points, find_exit_points
from .base import Phase, Prepared, Stage
from .quantize import activation_sample, quantize_new_layers

__all__ = ["EarlyExit", "SweepPoint", "sweep", "choose_threshold", "threshold_choice", "no_exit_margins", "NO_EXIT",
           "DEFAULT_THRESHOLDS", "ORIGINAL"]

NO_EXIT = 2.0
SPEED_TIE = 0.05  # measured speed-ups within 5 % of each other are one speed (interleaved medians' noise)
ORIGINAL = "original"  # EarlyExit.baseline: bound the threshold against the original model
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999)
_POINTS_HELP = ("An exit point is a module or torch.fx node name (or, for a model with `features` and "
                "`classifier`, an index into `features`) whose output, image features [B, C, H, W], is the "
                "only value the rest of the forward needs: e.g. a block's output after its residual add")


def _candidates(model: nn.Module, x: torch.Tensor, output) -> str:
    """The candidate exit points of ``model`` as a sentence for error messages."""
    try:
        found = candidate_points(model, x, output)
    except ModelError as e:
        return f"no candidates: {e}"
    if not found:
        return "the model has no candidate exit point"
    return "candidates: " + ", ".join(str(p) for p in found)


@dataclass
class SweepPoint:
    """Dynamic inference at one threshold: top-1 accuracy (%), mean BitOps per input, share leaving
    at each exit, and (when asked for) whether each input was predicted right."""

    threshold: float
    accuracy: float
    expected_bitops: float
    exit_fractions: List[float]
    correct: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The JSON-able fields (not ``correct``)."""
        return {"threshold": self.threshold, "accuracy": self.accuracy, "expected_bitops": self.expected_bitops,
                "exit_fractions": self.exit_fractions}


@torch.no_grad()
def sweep(
    net: ExitNet,
    loader,
    thresholds: Sequence[float],
    example_input: torch.Tensor,
    criterion: str = "maxprob",
    device: Optional[torch.device] = None,
    progress: bool = False,
    per_input: bool = False,
) -> List[SweepPoint]:
    """Dynamic inference (:meth:`ExitNet.infer`) over ``loader`` at every threshold, then at ``NO_EXIT``.

    Each input is charged the BitOps of the segments it ran and the heads it evaluated. The
    loader is read once; every batch runs at every threshold. ``per_input``: each point also
    holds ``correct``, one bool per input in the loader's order.
    """
    device = device or example_input.device
    p = bitops.profile(net, example_input)
    costs = p.segment_bitops, p.head_bitops  # what ExitNet.infer charges each input
    levels = [*map(float, thresholds), NO_EXIT]
    correct = [0] * len(levels)
    spent = [0.0] * len(levels)
    counts = torch.zeros(len(levels), net.num_exits, dtype=torch.int64)
    hits: List[List[torch.Tensor]] = [[] for _ in levels]
    was_training = net.training
    net.eval()
    try:
        for batch in tqdm(loader, leave=False, desc="E sweep", disable=not progress):
            x, y, _ = unpack(batch, "the calibration loader")
            x, y = x.to(device), y.to(device)
            for i, threshold in enumerate(levels):
                r = net.infer(x, threshold, criterion, bitops=costs)
                right = r.predictions == y
                correct[i] += int(right.sum())
                if per_input:
                    hits[i].append(right.cpu())
                spent[i] += float(r.bitops.sum())
                counts[i] += r.exit_counts().cpu()
    finally:
        net.train(was_training)
    n = int(counts[0].sum())
    if n == 0:
        raise DataError("loader yielded no samples to sweep the thresholds on")
    return [
        SweepPoint(t, 100.0 * c / n, b / n, (k.double() / n).tolist(), torch.cat(h) if per_input else None)
        for t, c, b, k, h in zip(levels, correct, spent, counts, hits)
    ]


@dataclass
class EarlyExit(Stage):
    """Attach exit heads, train them with the body frozen (CE per head), choose a threshold.

    ``points``: where heads go: feature indices of a zoo-style model, or module / torch.fx node
    names (None: the model's ``default_exit_points()``, else ``num_points`` points found
    automatically, see :func:`~ordercomp.nn.points.find_exit_points`); ``head``: ``"conv"``
    (1x1 conv, pooled to a 2x2 grid, then linear: the default, strong enough to let inputs leave
    early on small backbones) or ``"pool"`` (global pooling, then linear). An input leaves at the
    first head whose confidence (``criterion``) reaches the threshold. ``thresholds`` are swept on
    the calibration data; the chosen one is the cheapest (expected BitOps) whose accuracy, less a
    margin, is at most ``max_accuracy_loss`` percentage points below ``baseline``: None, the same
    network with every input at the final classifier; ``"original"``, the original model
    (``context.teacher``), paired input by input; or a calibration accuracy. The margin is z
    standard errors of the threshold's accuracy change against the network without exits (against
    the original with ``"original"``), paired over the calibration inputs, z the one-sided normal
    quantile of ``confidence`` (0.95; 0.5: no margin): on a few
    hundred inputs a threshold next to a cliff can look free by luck. The net keeps
    it as ``net.threshold`` and the criterion as ``net.criterion`` (its own state: both survive
    ``state_dict()``); later stages choose the threshold again with these settings (see
    :func:`choose_threshold`). Phases: ``train`` (the heads, at the initial learning rate, with
    the backbone and its batch-norm statistics frozen; each head's loss is ``(1 - head_kd) * CE +
    head_kd * KD`` from the network's own final classifier; it ends when the heads' mean
    calibration accuracy stops improving), then ``finetune`` when on (off by default). When no
    threshold lets any input leave within the accuracy bound (no exit pays off), the runner
    keeps the model without heads and the report says so.

    Order semantics: PE — heads are trained on the pruned body; QE — on a quantized body the heads
    are quantized the same way before training (QAT from the start); EP / EQ — later P / Q
    stages prune / quantize body and heads together; ED — see ``Distill``. On a model that is
    already an ExitNet (EE) the heads are trained again.
    """

    letter = "E"
    points: Optional[Sequence] = None
    num_points: int = DEFAULT_NUM_POINTS
    head: str = "conv"
    criterion: str = "maxprob"
    max_accuracy_loss: float = 0.5
    baseline: Union[None, float, str] = None
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    confidence: float = 0.95
    head_kd: float = 0.5
    finetune: bool = field(default=False, kw_only=True)

    def bounded(self, loss: float, confidence: float) -> "EarlyExit":
        """The threshold is chosen to lose at most ``loss`` pp (clamped to [0, 100]) against the
        original, margin at ``confidence`` included."""
        return dataclasses.replace(self, max_accuracy_loss=max(0.0, min(100.0, loss)), baseline=ORIGINAL,
                                   confidence=confidence)

    def check(self) -> None:
        super().check()
        checks.one_of("head", self.head, tuple(HEADS))
        checks.integer("num_points", self.num_points, 1)
        if self.points is not None and (isinstance(self.points, (str, bytes)) or not isinstance(self.points, Sequence)):
            raise ConfigError(f"early_exit.points must be a list of module / node names or feature indices, "
                              f"or None, got {self.points!r}")
        checks.one_of("criterion", self.criterion, ops.CRITERIA)
        checks.number("head_kd", self.head_kd, low=0, high=1)
        checks.number("confidence", self.confidence, low=0.5, high=1, high_open=True)
        loss = self.max_accuracy_loss
        if not checks.is_real(loss) or not 0 <= loss <= 100:
            raise ConfigError(f"max_accuracy_loss must be a number in [0, 100] (percentage points), got {loss!r}")
        if self.baseline not in (None, ORIGINAL) and (not checks.is_real(self.baseline)
                                                      or not 0 <= self.baseline <= 100):
            raise ConfigError(f"baseline must be None, {ORIGINAL!r} or an accuracy in [0, 100], got {self.baseline!r}")
        ts = list(self.thresholds)
        bad = [t for t in ts if not checks.is_real(t) or math.isnan(t) or not 0 <= t <= 1]
        if not ts or bad:
            raise ConfigError(f"thresholds must be a non-empty list of numbers in [0, 1], got {self.thresholds!r}")

    def check_model(self, model: nn.Module, context) -> None:
        """Checks (before any training) that the exit points, given or found, cut ``model``."""
        super().check_model(model, context)
        if not isinstance(model, ExitNet):
            self.exit_points(model, context, check=True)

    def exit_points(self, model: nn.Module, context, check: bool = False) -> Tuple[list, str]:
        """The points where heads go on ``model`` and where they come from (``"given"``,
        ``"model default"`` or ``"found"``). ``check``: also cut the model there (heads are made
        and dropped). Errors name ``early_exit.points``, say what a point is and list the
        candidates found."""
        x, output = context.example_input, context.output
        if self.points is not None:
            points, source = list(self.points), "given"
        elif hasattr(model, "default_exit_points"):
            points, source = list(model.default_exit_points()), "model default"
        else:
            try:
                points, source = find_exit_points(model, x, self.num_points, output), "found"
            except ModelError as e:
                raise ConfigError(f"early_exit.points: none found automatically: {e}. {_POINTS_HELP}") from e
        if check:
            try:
                attach_exits(model, points, self.head, example_input=x, output=output)
            except (ConfigError, ModelError, TypeError) as e:
                raise ConfigError(f"early_exit.points {points!r} ({source}): {e}. {_POINTS_HELP}; "
                                  f"{_candidates(model, x, output)}") from e
        return points, source

    def prepare(self, model: nn.Module, context) -> Prepared:
        """Attaches the heads (an ExitNet keeps its own); the phases train them on the frozen body."""
        info = {}
        if isinstance(model, ExitNet):
            net = model
        else:
            points, _ = self.exit_points(model, context)
            net = attach_exits(model.to(context.device), points, self.head, example_input=context.example_input,
                               output=context.output)
            if any(isinstance(m, QuantLayer) for m in net.modules()):  # QE: heads quantized like the body
                info["bits"] = quantize_new_layers(net, net.classifiers()[-1], activation_sample(context))
        net.criterion = self.criterion
        info["points"] = list(net.points)
        heads = Phase("train", TaskObjective(heads=1.0, final=0.0, head_kd=self.head_kd),
                      params=list(net.head_parameters()), frozen=[net.segments], lr_scale=1.0, monitor="heads")
        return Prepared(net, [heads] + self.finetune_phases(context), info)


def choose_threshold(net: ExitNet, context, settings: Optional[EarlyExit] = None) -> dict:
    """Sweeps ``settings.thresholds`` (default :class:`EarlyExit`'s) on the calibration data
    (``context.calibration``) with the net's criterion and stores the chosen threshold on ``net``
    (see :class:`EarlyExit`); returns the choice and the sweep, both measured on that data
    (:func:`threshold_choice`). A numeric ``settings.baseline`` must be a calibration accuracy
    too; ``"original"`` pairs every threshold with ``context.teacher_correct()``."""
    settings = settings or EarlyExit()
    points = sweep(net, context.calibration, settings.thresholds, context.example_input, net.criterion,
                   context.device, context.progress, per_input=True)
    reference = context.teacher_correct() if settings.baseline == ORIGINAL else None
    speedups = None
    if context.exit_speedups is not None:
        speedups = context.exit_speedups(net, [p.threshold for p in points])
    choice = threshold_choice(points, settings, reference, speedups)
    net.threshold = choice["threshold"]
    return choice


def threshold_choice(points: List[SweepPoint], settings: EarlyExit,
                     reference: Optional[torch.Tensor] = None, speedups: Optional[Dict[float, float]] = None) -> dict:
    """The choice among swept ``points`` (the last one: no exit; each with per-input results) as
    ``settings`` asks (see :class:`EarlyExit`); ``reference``: the original's per-input results on
    the same inputs, needed when ``settings.baseline`` is ``"original"``. Returns the chosen
    threshold, its accuracy, expected BitOps and exit fractions, the baseline, ``pays_off`` (some
    input leaves early) and the sweep with each point's margin. With measured ``speedups``
    (``{threshold: speed-up}``) the fastest feasible point is chosen (within ``SPEED_TIE`` of the
    fastest: the most accurate) instead of the one with the fewest expected BitOps."""
    backbone = points[-1]
    if settings.baseline == ORIGINAL:
        if reference is None:
            raise ConfigError("early_exit.baseline 'original' needs the original's per-input results (reference)")
        bounds = [stats.paired_loss_bound(reference, p.correct, settings.confidence) for p in points]
        baseline, margins = 100 * float(torch.as_tensor(reference).double().mean()), [m for _, m in bounds]
        feasible = [p for p, (loss, m) in zip(points, bounds) if loss + m <= settings.max_accuracy_loss + 1e-9]
    else:
        baseline = backbone.accuracy if settings.baseline is None else float(settings.baseline)
        margins = no_exit_margins(points, settings.confidence)
        feasible = [p for p, m in zip(points, margins)
                    if p.accuracy - m >= baseline - settings.max_accuracy_loss - 1e-9]
    if feasible and speedups is not None:
        top = max(speedups[p.threshold] for p in feasible)
        chosen = max((p for p in feasible if speedups[p.threshold] >= (1 - SPEED_TIE) * top),
                     key=lambda p: (p.accuracy, speedups[p.threshold]))
    elif feasible:
        chosen = min(feasible, key=lambda p: (p.expected_bitops, -p.accuracy))
    else:
        chosen = max(points, key=lambda p: (p.accuracy, -p.expected_bitops))
    return {
        "threshold": chosen.threshold,
        "accuracy": chosen.accuracy,
        "expected_bitops": chosen.expected_bitops,
        "exit_fractions": chosen.exit_fractions,
        "baseline": baseline,
        "pays_off": chosen.threshold <= 1 and chosen.expected_bitops < backbone.expected_bitops,
        "sweep": [dict(p.to_dict(), margin=m, **({"speedup": speedups[p.threshold]} if speedups else {}))
                  for p, m in zip(points, margins)],
    }


def no_exit_margins(points: List[SweepPoint], confidence: float) -> List[float]:
    """The one-sided margin (pp, at ``confidence``) of each point's accuracy change against the
    last point (no exit), paired over the same inputs: the calibration data's own uncertainty about
    that change (none for a point that is right and wrong on exactly the inputs the last one is)."""
    base = points[-1].correct
    return [0.0 if torch.equal(p.correct, base) else stats.paired_loss_bound(base, p.correct, confidence)[1]
            for p in points]
