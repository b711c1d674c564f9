"""P: dependency-aware channel pruning at a uniform ratio per layer (Torch-Pruning's DepGraph).

Channels are physically removed (the layers get smaller), coupled layers (residual adds,
BatchNorm, depthwise convs) are pruned together, and the classifier that produces each exit's
logits is never pruned. Quantized layers are ``nn.Conv2d`` / ``nn.Linear`` subclasses, so QP
works unchanged. On an :class:`~ordercomp.nn.ExitNet` the traced forward runs every head, so
body and heads are pruned together (EP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .. import checks
from ..errors import ModelError
from ..nn import ExitNet, Output, logit_layers
from ..nn.introspect import recording
from .base import Prepared, Stage
from .depgraph import pruner_arguments

__all__ = ["Prune", "prune_channels", "protected_layers", "unused_layers", "IMPORTANCES"]

IMPORTANCES = ("l1", "l2")


def check_ratio(ratio) -> float:
    """A pruning ratio must lie strictly between 0 and 1."""
    return checks.number("ratio", ratio, low=0, high=1, low_open=True, high_open=True)


def check_importance(importance) -> str:
    return checks.one_of("importance", importance, IMPORTANCES)


def protected_layers(model: nn.Module, example_input: torch.Tensor, output: Output = None) -> List[nn.Module]:
    """The layers whose outputs the model returns, kept whole by the pruner: every exit classifier
    of an ExitNet; else the layers producing the logits (see :func:`~ordercomp.nn.logit_layers`;
    ``output`` says where they are) and each other tensor the model returns in train mode
    (auxiliary heads, returned features)."""
    if isinstance(model, ExitNet):
        return logit_layers(model, example_input)
    return logit_layers(model, example_input, output, every_output=True)


def used_layers(model: nn.Module, example_input: torch.Tensor) -> set:
    """The conv / linear layers that run in ``model``'s forward, in train or in eval mode."""
    ran = set()

    def hook(module, args, out):
        ran.add(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        for train in (True, False):
            with recording(model, train=train), torch.no_grad():
                model(example_input)
    finally:
        for h in handles:
            h.remove()
    return ran


def unused_layers(model: nn.Module, example_input: torch.Tensor) -> List[str]:
    """Names of the conv / linear layers that never run in ``model``'s forward (pruning leaves them alone)."""
    ran = used_layers(model, example_input)
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in ran]


def _build_pruner(model: nn.Module, ratio: float, example_input, importance: str, ignored: Sequence[nn.Module],
                  round_to: int = 1):
    """A one-step DepGraph pruner, traced in train mode (auxiliary heads are pruned with the body)
    and cut at channel shuffles (see :mod:`.depgraph`). Raises naming every conv / linear layer
    that runs but the trace did not reach; layers that never run are left alone."""
    try:
        with recording(model):
            pruner = tp.pruner.MetaPruner(
                model,
                example_input,
                importance=tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2),
                pruning_ratio=ratio,
                global_pruning=False,
                round_to=round_to if round_to > 1 else None,
                **pruner_arguments(model, example_input, ignored),
            )
    except Exception as e:
        raise ModelError(
            f"cannot prune {type(model).__name__}: Torch-Pruning failed to trace it ({type(e).__name__}: {e})"
        ) from e
    ran = used_layers(model, example_input)
    untraced = [
        name for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m in ran and m not in pruner.DG.module2node
    ]
    if untraced:
        raise ModelError(
            f"cannot prune {type(model).__name__}: layer {untraced[0]!r} is not on the autograd path from "
            f"the input to the output (untraced: {untraced}); avoid detach/no_grad/non-torch ops in forward"
        )
    return pruner


def check_prunable(model: nn.Module, example_input, output: Output = None) -> None:
    """Raises (naming the layer) when ``model`` cannot be traced for pruning; changes nothing."""
    _build_pruner(model, 0.5, example_input, "l1", protected_layers(model, example_input, output))


def prune_channels(
    model: nn.Module,
    ratio: float,
    example_input: torch.Tensor,
    importance: str = "l1",
    ignored_layers: Optional[Sequence[nn.Module]] = None,
    output: Output = None,
    round_to: int = 1,
) -> nn.Module:
    """Removes ``ratio`` of the output channels of every prunable layer, in place; returns the model.

    Uniform per layer (not global): each dependency group keeps its ``1 - ratio`` share of
    channels with the largest L1 / L2 weight magnitude. The layers producing the model's
    outputs (see :func:`protected_layers`; ``output`` says where the logits are) and
    ``ignored_layers`` keep their outputs; layers that never run are left alone. ``round_to`` > 1
    keeps a multiple of that many channels in each group (Torch-Pruning rounds the kept count;
    8 gives widths that int8 and vectorised float kernels run at full speed).
    """
    ratio = check_ratio(ratio)
    check_importance(importance)
    round_to = checks.integer("round_to", round_to, 1)
    ignored = protected_layers(model, example_input, output) + list(ignored_layers or [])
    pruner = _build_pruner(model, ratio, example_input, importance, ignored, round_to)
    with torch.no_grad():
        pruner.step()
    return model


def channel_counts(model: nn.Module) -> dict:
    """``{layer name: output channels}`` for every conv / linear layer (to measure what pruning removed)."""
    return {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@dataclass
class Prune(Stage):
    """Prune ``ratio`` of the channels of every layer (``importance``: ``"l1"`` or ``"l2"``), then fine-tune.

    ``round_to`` > 1 keeps a multiple of that many channels per layer (see :func:`prune_channels`).

    Order semantics: PD — D distils from the pruned model; PE — heads are trained on the pruned
    body; EP — body and exit heads are pruned together (every head is traced), exit classifiers
    whole; QP — quantized layers are pruned like float ones. Batch-norm statistics are
    re-estimated after pruning and after fine-tuning (``recalibrate_bn``).
    """

    letter = "P"
    LADDERS = {"ratio": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)}
    ratio: float = 0.5
    importance: str = "l1"
    round_to: int = 1
    recalibrate_bn: bool = field(default=True, kw_only=True)

    def check(self) -> None:
        super().check()
        check_ratio(self.ratio)
        check_importance(self.importance)
        checks.integer("round_to", self.round_to, 1)

    def check_model(self, model: nn.Module, context) -> None:
        super().check_model(model, context)
        check_prunable(model, context.example_input, context.output)

    def prepare(self, model: nn.Module, context) -> Prepared:
        """Prunes ``model`` in place; the phases fine-tune it. Layers that never run are reported."""
        before = sum(channel_counts(model).values())
        prune_channels(model, self.ratio, context.example_input, self.importance, output=context.output,
                       round_to=self.round_to)
        after = sum(channel_counts(model).values())
        info = {"channels_before": before, "channels_after": after,
                "removed_fraction": 1 - after / before if before else math.nan,
                "unused_layers": unused_layers(model, context.example_input)}
        return Prepared(model, self.finetune_phases(context), info)
