"""P: dependency-aware channel pruning at a uniform ratio per layer (Torch-Pruning's DepGraph).

Channels are physically removed (the layers get smaller), coupled layers (residual adds,
BatchNorm, depthwise convs) are pruned together, and the classifier that produces each exit's
logits is never pruned. Quantized layers are ``nn.Conv2d`` / ``nn.Linear`` subclasses, so QP
works unchanged. On an :class:`~ordercomp.nn.ExitNet` the traced forward runs every head, so
body and heads are pruned together (EP).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch_pruning as tp
from torch import nn

from .. import checks
from ..errors import ConfigError, ModelError, reason
from ..nn import ExitNet, Output, logit_layers
from ..nn.introspect import recording
from .base import Prepared, Stage
from .depgraph import (GroupTooLarge, TiedImportance, TimeUp, bounded_groups, pruner_arguments, running, time_limit,
                       unrankable_groups)

__all__ = ["Prune", "prune_channels", "protected_layers", "unused_layers", "ignored_modules", "IMPORTANCES"]

IMPORTANCES = ("l1", "l2")
SLOW_SETUP = 60.0  # seconds of building the dependency graph past which a run says so
SETUP_LIMIT = 900.0  # ... and past which it stops (a graph Torch-Pruning cannot finish looks like a hang)


def check_ratio(ratio) -> float:
    """A pruning ratio must lie strictly between 0 and 1."""
    return checks.number("ratio", ratio, low=0, high=1, low_open=True, high_open=True)


def check_rounding(round_to, round_up_to) -> Tuple[int, bool]:
    """``(multiple, rounded up)`` of the channel multiple settings: at most one of them above 1."""
    round_to, round_up_to = checks.integer("round_to", round_to, 1), checks.integer("round_up_to", round_up_to, 1)
    if round_to > 1 and round_up_to > 1:
        raise ConfigError(f"round_to ({round_to}) rounds the kept channels down and round_up_to ({round_up_to}) "
                          "up: set one of them, the other to 1")
    return (round_up_to, True) if round_up_to > 1 else (round_to, False)


def check_importance(importance) -> str:
    return checks.one_of("importance", importance, IMPORTANCES)


def check_layer_names(name: str, value) -> Tuple[str, ...]:
    """A list of layer names or patterns (a single string is one name)."""
    value = (value,) if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of layer names or patterns, e.g. ['layer1.0.se.*'], got {value!r}")
    return tuple(value)


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


def ignored_modules(model: nn.Module, names: Sequence[Union[str, nn.Module]], setting: str = "ignored_layers"
                    ) -> List[nn.Module]:
    """The conv / linear layers ``names`` picks: modules as given, or names (``fnmatch`` patterns)
    matched against each layer's qualified name or its tail (``layer1.0.se.*`` also finds
    ``segments.0.layer1.0.se.fc1`` in an ExitNet); ConfigError for a name matching no layer."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    picked: List[nn.Module] = []
    for entry in names:
        if isinstance(entry, nn.Module):
            picked.append(entry)
            continue
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"{setting}: entries must be layer names (or patterns), got {entry!r}")
        found = [m for n, m in layers if fnmatch.fnmatchcase(n, entry) or fnmatch.fnmatchcase(n, "*." + entry)]
        if not found:
            close = difflib.get_close_matches(entry, [n for n, _ in layers], n=3, cutoff=0.5)
            raise ConfigError(f"{setting}: {entry!r} names no conv or linear layer of {type(model).__name__}"
                              + (f"; did you mean {close}?" if close else ""))
        picked += found
    return list(dict.fromkeys(picked))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


class _Pruner(tp.pruner.MetaPruner):
    """Torch-Pruning's pruner, except that ``round_to`` never rounds a group's kept channels down
    to none (Torch-Pruning then refuses the group and leaves it whole: a stronger ratio gave a
    wider layer); it keeps ``round_to`` channels there, or the whole group when it has fewer.
    With ``round_up`` the kept channels are rounded up to the multiple instead (at most all)."""

    round_up = False

    def _round_to(self, n_pruned, current_channels, round_to):
        kept = current_channels - n_pruned
        if self.round_up:
            kept = min(-(-kept // round_to) * round_to, current_channels)
        else:
            kept = max(kept - kept % round_to, min(round_to, current_channels))
        return current_channels - kept


def _build_pruner(model: nn.Module, ratio: float, example_input, importance: str, ignored: Sequence[nn.Module],
                  round_to: int = 1, setting: str = "prune.ignored_layers", round_up: bool = False):
    """A one-step DepGraph pruner, traced in train mode (auxiliary heads are pruned with the body)
    and cut at channel shuffles (see :mod:`.depgraph`). Raises naming every conv / linear layer
    that runs but the trace did not reach; layers that never run are left alone. The layers of a
    dependency group that never stops growing are left whole (``pruner.whole``: ``(layer, why)``),
    as are groups whose channels cannot be ranked (see :func:`~.depgraph.unrankable_groups`)."""
    start = time.perf_counter()
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    logging.getLogger("ordercomp.prune").info("building the pruner's dependency graph of %s (%d conv / linear layers)",
                                              type(model).__name__, layers)
    ignored, whole = list(ignored), []
    for _ in range(layers + 1):
        try:
            ranking = TiedImportance(p=1 if importance == "l1" else 2)
            with recording(model), time_limit(SETUP_LIMIT), bounded_groups():
                pruner = _Pruner(
                    model,
                    example_input,
                    importance=ranking,
                    pruning_ratio=ratio,
                    global_pruning=False,
                    round_to=round_to if round_to > 1 else None,
                    **pruner_arguments(model, example_input, ignored),
                )
            ranking.graph = pruner.DG
            pruner.round_up = round_up
            with bounded_groups():
                failing = unrankable_groups(pruner)
            if not failing:
                break
            for root, group, e in failing:  # leave those groups whole and build again
                reached = [m for m in dict.fromkeys([root, *group]) if m not in ignored]
                ignored += reached
                whole += [(m, reason(e)) for m in reached]
        except GroupTooLarge as e:  # leave that group whole and build again
            reached = [m for m in dict.fromkeys([e.root, *e.layers]) if m not in ignored]
            ignored += reached
            whole += [(m, "its dependency group keeps growing (channel slices inside a residual)") for m in reached]
        except TimeUp:
            raise ModelError(f"cannot prune {type(model).__name__}: building the pruner's dependency graph of its "
                             f"{layers} conv / linear layers took more than {SETUP_LIMIT:g} s; leave P out of the "
                             "order and give D a student (distill.student)") from None
        except Exception as e:
            raise ModelError(
                f"cannot prune {type(model).__name__}: Torch-Pruning failed to trace it ({type(e).__name__}: {e})"
            ) from e
    pruner.whole = whole
    seconds = time.perf_counter() - start
    if seconds > SLOW_SETUP:
        warnings.warn(f"building the pruner's dependency graph of {type(model).__name__} "
                      f"({len(pruner.DG.module2node)} nodes) took {seconds:.0f} s", stacklevel=3)
    ran = used_layers(model, example_input)
    untraced = [
        name for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m in ran and m not in pruner.DG.module2node
    ]
    if untraced:
        raise ModelError(
            f"cannot prune {type(model).__name__}: layer {untraced[0]!r} is not on the autograd path from "
            f"the input to the output (untraced: {untraced}); avoid detach/no_grad/non-torch ops in forward, "
            f"or leave it whole with {setting}={untraced[:1]}"
        )
    return pruner


def _step(model: nn.Module, pruner, setting: str) -> None:
    """One pruning step, group by group, so that a failure names the layer whose group failed."""
    with torch.no_grad(), bounded_groups():
        for group in pruner.step(interactive=True):
            root = group[0].dep.target.module
            try:
                group.prune()
            except Exception as e:
                name = _name_of(model, root)
                raise ModelError(f"cannot prune {type(model).__name__} at layer {name!r}: Torch-Pruning failed on "
                                 f"its channels ({type(e).__name__}: {e}); leave it whole with {setting}=['{name}']"
                                 ) from e


def _failure(model: nn.Module, example_input) -> Optional[Tuple[nn.Module, Exception]]:
    """Runs ``model`` in train and eval mode: None, or the innermost module running when it failed
    and the error."""
    with running(model) as stack:
        try:
            for train in (True, False):
                with recording(model, train=train), torch.no_grad():
                    model(example_input)
        except Exception as e:
            return (stack[-1] if stack else model), e
    return None


def _coupled_layers(pruner, module: nn.Module) -> List[nn.Module]:
    """The conv / linear layers inside ``module`` and those whose pruning changes its channels."""
    inside = set(module.modules())
    out = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with bounded_groups():
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            if any(dep.target.module in inside for dep, _ in group):
                out += [dep.target.module for dep, _ in group if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                        and pruner.DG.is_out_channel_pruning_fn(dep.handler)]
    return list(dict.fromkeys(out))


def _trials(model: nn.Module, ratio: float, example_input, importance: str, ignored: List[nn.Module],
            round_to: int, setting: str, round_up: bool = False) -> List[Tuple[nn.Module, str]]:
    """Prunes copies of ``model`` until one runs; returns the layers of ``model`` left whole, with
    the reason, and adds them to ``ignored``: those the pruner cannot follow (see
    :func:`_build_pruner`), and each time the pruned copy fails inside a module (a split into fixed
    sizes, MixNet's mixed convolutions), the layers coupled to that module. Raises naming the
    failure when it lies in the model's own forward, where no layer can be left whole for it."""
    whole: List[Tuple[nn.Module, str]] = []
    for _ in range(sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) + 1):
        trial = copy.deepcopy(model)
        to_trial = dict(zip(model.modules(), trial.modules()))
        back = {v: k for k, v in to_trial.items()}
        pruner = _build_pruner(trial, ratio, example_input, importance, [to_trial[m] for m in ignored], round_to, setting,
                               round_up)
        _step(trial, pruner, setting)
        failed = _failure(trial, example_input)
        if failed is None:
            left = [(back[m], why) for m, why in pruner.whole]
            ignored += [m for m, _ in left]
            return whole + left
        module, error = failed
        extra = [back[m] for m in _coupled_layers(pruner, module) if m in back and back[m] not in ignored]
        where = _name_of(trial, module)
        if module is trial or not extra:
            raise ModelError(f"cannot prune {type(model).__name__}: the pruned model fails"
                             + (f" in {where!r}" if module is not trial else "") + f" ({type(error).__name__}: "
                             f"{error}); leave its layers whole with {setting}=[...]") from error
        ignored += extra
        whole += [(m, f"the pruned model fails in {where!r}: {reason(error)}") for m in extra]
    raise ModelError(f"cannot prune {type(model).__name__}: no pruned copy of it runs")


def _ignored(model: nn.Module, example_input, output: Output, ignored_layers, setting: str) -> List[nn.Module]:
    """The layers pruning leaves whole from the start: the outputs' and ``ignored_layers``."""
    return protected_layers(model, example_input, output) + ignored_modules(model, ignored_layers or [], setting)


def check_prunable(model: nn.Module, example_input, output: Output = None, ignored_layers: Sequence = (),
                   setting: str = "prune.ignored_layers") -> None:
    """Prunes copies of ``model`` by half and runs them (see :func:`prune_channels`): raises (naming
    the layer and the setting that leaves it whole) when that fails; changes nothing."""
    _trials(model, 0.5, example_input, "l1", _ignored(model, example_input, output, ignored_layers, setting), 1,
            setting)


def prune_channels(
    model: nn.Module,
    ratio: float,
    example_input: torch.Tensor,
    importance: str = "l1",
    ignored_layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    output: Output = None,
    round_to: int = 1,
    setting: str = "ignored_layers",
    round_up_to: int = 1,
) -> nn.Module:
    """Removes ``ratio`` of the output channels of every prunable layer, in place; returns the model.

    Uniform per layer (not global): each dependency group keeps its ``1 - ratio`` share of
    channels with the largest L1 / L2 weight magnitude. The layers producing the model's
    outputs (see :func:`protected_layers`; ``output`` says where the logits are) and
    ``ignored_layers`` (modules, or names and patterns: see :func:`ignored_modules`) keep their
    outputs; layers that never run are left alone. ``round_to`` > 1 keeps a multiple of that many
    channels in each group (Torch-Pruning rounds the kept count; 8 gives widths that int8 and
    vectorised float kernels run at full speed), rounded down (a group keeps at least
    ``round_to``, or all it has); ``round_up_to`` > 1 rounds up to a multiple instead (at most
    all the group has): aligned widths that keep every channel ``ratio`` keeps. ``setting``
    names ``ignored_layers`` in errors.

    A copy is pruned first and run: where Torch-Pruning cannot follow the model (groups it cannot
    rank or that never stop growing, a pruned copy that fails inside a module), those layers stay
    whole and a warning names them; where it fails outright, ModelError names the layer to leave
    whole in ``setting``.
    """
    ratio = check_ratio(ratio)
    check_importance(importance)
    round_to, up = check_rounding(round_to, round_up_to)
    ignored = _ignored(model, example_input, output, ignored_layers, setting)
    whole = _trials(model, ratio, example_input, importance, ignored, round_to, setting, up)
    pruner = _build_pruner(model, ratio, example_input, importance, ignored, round_to, setting, up)
    _step(model, pruner, setting)
    left = whole + pruner.whole  # the trials found them all: the pruner built last leaves nothing more whole
    if left:
        names = [_name_of(model, layer) for layer, _ in left]
        warnings.warn(f"Torch-Pruning cannot prune {names} ({left[0][1]}): they stay whole ({setting}={names} "
                      "says so explicitly)", stacklevel=2)
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

    ``round_to`` > 1 keeps a multiple of that many channels per layer, rounded down;
    ``round_up_to`` > 1 rounded up (see :func:`prune_channels`). BitOps do not see a multiple but
    the clock does (in ONNX Runtime 9-19-38 channels take as long as 16-16-32, with 59 % of its
    MACs), so ``round_up_to`` is a latency strength: a budget that buys measured latency searches
    it after the ratio (``LATENCY_LADDERS``), unless ``round_to`` fixes the multiple.
    ``ignored_layers``: names (or ``fnmatch`` patterns) of layers whose outputs are left whole,
    e.g. ``["*.se.*"]`` for squeeze-excitation convs; a model the pruner fails on is refused
    before training, naming the layer to put here.

    Order semantics: PD — D distils from the pruned model; PE — heads are trained on the pruned
    body; EP — body and exit heads are pruned together (every head is traced), exit classifiers
    whole; QP — quantized layers are pruned like float ones. Batch-norm statistics are
    re-estimated after pruning and after fine-tuning (``recalibrate_bn``).
    """

    letter = "P"
    LADDERS = {"ratio": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)}
    LATENCY_LADDERS = {"round_up_to": (1, 4, 8, 16)}
    ratio: float = 0.5
    importance: str = "l1"
    round_to: int = 1
    round_up_to: int = 1
    ignored_layers: Tuple[str, ...] = ()
    recalibrate_bn: bool = field(default=True, kw_only=True)

    def check(self) -> None:
        super().check()
        check_ratio(self.ratio)
        check_importance(self.importance)
        check_rounding(self.round_to, self.round_up_to)
        self.ignored_layers = check_layer_names("prune.ignored_layers", self.ignored_layers)

    def latency_strengths(self):
        """``round_up_to``'s ladder, unless ``round_to`` > 1 fixes the multiple."""
        return {} if self.round_to > 1 else super().latency_strengths()

    def check_model(self, model: nn.Module, context) -> None:
        super().check_model(model, context)
        check_prunable(model, context.example_input, context.output, self.ignored_layers)

    def prepare(self, model: nn.Module, context) -> Prepared:
        """Prunes ``model`` in place; the phases fine-tune it. Layers that never run are reported."""
        before = sum(channel_counts(model).values())
        prune_channels(model, self.ratio, context.example_input, self.importance, self.ignored_layers,
                       output=context.output, round_to=self.round_to, setting="prune.ignored_layers",
                       round_up_to=self.round_up_to)
        after = sum(channel_counts(model).values())
        info = {"channels_before": before, "channels_after": after,
                "removed_fraction": 1 - after / before if before else math.nan,
                "unused_layers": unused_layers(model, context.example_input)}
        return Prepared(model, self.finetune_phases(context), info)
