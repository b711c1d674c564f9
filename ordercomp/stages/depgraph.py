"""How the pruner traces a model: in train mode, and cut at every channel shuffle.

Torch-Pruning (DepGraph) traces the model's autograd graph in eval mode, so layers that only
run in ``train()`` mode (auxiliary heads) would be left at their old width and break training;
:func:`pruner_arguments` gives it a ``forward_fn`` that runs the model in train mode (batch
norm in eval mode, so its statistics do not move).

A channel shuffle (ShuffleNet: ``x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)``)
reorders channels in a way DepGraph does not model: it takes the transpose for an element-wise
op and the views for flattening, and then prunes the wrong channels, inflates its index lists
or fails. Every shuffle is found while the model runs (:func:`find_channel_shuffles`); the
traced graph is cut there (the shuffled tensor becomes a new leaf, its input an extra output),
and every layer whose pruning would change the channel count on either side of a cut is left
whole. The rest of the model is pruned as usual.

Guards against Torch-Pruning's failure modes on real models: :func:`time_limit` on building the
graph, :func:`bounded_groups` against a group that never stops growing, :func:`unrankable_groups`
for the groups whose channels cannot be ranked, :class:`TiedImportance` for channels that can only
be pruned together.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from ..nn.introspect import recording

__all__ = ["find_channel_shuffles", "pruner_arguments", "running", "time_limit", "TimeUp", "bounded_groups", "GroupTooLarge",
           "unrankable_groups", "TiedImportance", "coupled_channels"]

_VIEWS = {"view", "reshape", "unflatten"}
_PERMUTES = {"transpose", "swapaxes", "swapdims", "permute", "movedim"}
_LAYERS = (nn.Conv2d, nn.Linear)


def _moves_groups(name: str, args, kwargs) -> bool:
    """Whether a transpose / permute of a 5-D ``[N, g, C/g, H, W]`` tensor moves dim 1 or 2."""
    if name == "movedim":
        return True
    if name == "permute":
        dims = args[1] if isinstance(args[1], (list, tuple)) else args[1:]
        dims = [d % 5 for d in dims]
        return dims[1] != 1 or dims[2] != 2
    d0, d1 = (list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
    return d0 % 5 != d1 % 5 and bool({d0 % 5, d1 % 5} & {1, 2})


class _ShuffleSpy(TorchFunctionMode):
    """Notes every channel shuffle (the module it ran in); with ``cut`` the transpose reads a
    detached copy, so the autograd graph stops there, and the shuffle's input is kept in ``roots``."""

    def __init__(self, cut: bool = False):
        super().__init__()
        self.cut = cut
        self.split: Dict[int, tuple] = {}  # id of a [N, g, C/g, H, W] view -> (view, its [N, C, H, W] source)
        self.where: List[str] = []
        self.roots: List[torch.Tensor] = []
        self.leaves: List[torch.Tensor] = []
        self.stack: List[nn.Module] = []  # the modules under way (see :func:`running`)
        self.names: Dict[nn.Module, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        entry = self.split.get(id(args[0])) if args else None
        if name in _PERMUTES and entry is not None and entry[0] is args[0] and _moves_groups(name, args, kwargs):
            self.where.append(self.names[self.stack[-1]] if self.stack else "")
            if self.cut:
                self.roots.append(entry[1])
                leaf = args[0].detach().requires_grad_(True)
                self.leaves.append(leaf)
                args = (leaf, *args[1:])
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if name in _VIEWS and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if (x.dim() == 4 and out.dim() == 5 and out.shape[0] == x.shape[0]
                    and out.shape[1] * out.shape[2] == x.shape[1] and out.shape[3:] == x.shape[2:]):
                self.split[id(out)] = (out, x)
        return out


@contextlib.contextmanager
def running(model: nn.Module) -> Iterator[List[nn.Module]]:
    """Inside the block, the list given holds the modules of ``model`` whose forward is under way,
    innermost last (after an error: those it was raised in)."""
    stack: List[nn.Module] = []

    def enter(module, args) -> None:
        stack.append(module)

    def leave(module, args, out) -> None:
        stack.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        yield stack
    finally:
        for h in hooks:
            h.remove()


def _run(model: nn.Module, x, spy: _ShuffleSpy):
    """``model(x)`` under ``spy``, which learns the name of the module each op runs in."""
    spy.names = {m: n for n, m in model.named_modules()}
    with running(model) as spy.stack, spy:
        return model(x)


def find_channel_shuffles(model: nn.Module, example_input: torch.Tensor) -> List[str]:
    """The names of the (innermost) modules whose forward shuffles channels; ``""`` is the model itself."""
    spy = _ShuffleSpy()
    with recording(model, train=True):
        _run(model, example_input, spy)
    return sorted(set(spy.where))


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    """Train mode, batch norm excepted (see :func:`~ordercomp.nn.introspect.recording`); eval mode
    afterwards, as DepGraph expects."""
    with recording(model, train=True):
        yield
    model.eval()


def _forward(cut: bool, spies: List[_ShuffleSpy]) -> Callable:
    def forward_fn(model: nn.Module, x):
        spy = _ShuffleSpy(cut=cut)
        with _train_mode(model):
            out = _run(model, x, spy)
        spies.append(spy)
        return [out, *spy.roots]  # the shuffles' inputs are outputs of the cut graph

    return forward_fn


def _across_shuffles(model: nn.Module, example_input, forward_fn: Callable, spy_of: List[_ShuffleSpy],
                     ignored: Sequence[nn.Module]) -> List[nn.Module]:
    """The layers whose pruning would change the channels on either side of a cut shuffle."""
    graph = tp.DependencyGraph().build_dependency(model, example_input, forward_fn=forward_fn, verbose=False)
    spy = spy_of[-1]
    roots = {r.grad_fn for r in spy.roots}
    leaves = {id(leaf) for leaf in spy.leaves}

    def touches_cut(node, handler) -> bool:
        if node.grad_fn in roots and graph.is_out_channel_pruning_fn(handler):
            return True  # it would shrink a shuffle's input
        following = getattr(node.grad_fn, "next_functions", ())
        return any(f is not None and id(getattr(f, "variable", None)) in leaves for f, _ in following)

    out: List[nn.Module] = []
    for module in list(graph.module2node):
        if not isinstance(module, _LAYERS) or module in ignored or module in out:
            continue
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                        list(range(pruner.get_out_channels(module))))
        if any(touches_cut(dep.target, dep.handler) for dep, _ in group):
            out += [dep.target.module for dep, _ in group
                    if isinstance(dep.target.module, _LAYERS) and graph.is_out_channel_pruning_fn(dep.handler)]
    return out


def pruner_arguments(model: nn.Module, example_input, ignored: Sequence[nn.Module]) -> dict:
    """``forward_fn`` and ``ignored_layers`` for ``tp.pruner.MetaPruner``: the model traced in train
    mode, cut at every channel shuffle, with ``ignored`` and the layers around the shuffles kept whole."""
    shuffles = find_channel_shuffles(model, example_input)
    spies: List[_ShuffleSpy] = []
    forward_fn = _forward(bool(shuffles), spies)
    ignored = list(ignored)
    if shuffles:
        ignored += _across_shuffles(model, example_input, forward_fn, spies, ignored)
    return {"forward_fn": forward_fn, "ignored_layers": list(dict.fromkeys(ignored))}


class TimeUp(BaseException):
    """Raised by :func:`time_limit` (a BaseException, so that no library code catches it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises :class:`TimeUp` in the block after ``seconds`` (in the main thread on Unix; else no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TimeUp()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def unrankable_groups(pruner) -> List[Tuple[nn.Module, List[nn.Module], Exception]]:
    """``(root layer, the layers whose outputs its group prunes, the error)`` for each group of ``pruner``
    whose channels Torch-Pruning cannot rank (its index mapping fails on some cross-stage splits
    and concatenations, e.g. an IndexError in a CSP block). Skipping such a group alone would
    prune the groups coupled to it inconsistently: its layers must be left whole when the
    pruner is built."""
    failing = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        try:
            pruner.estimate_importance(group)
        except (IndexError, RuntimeError) as e:
            layers = [dep.target.module for dep, _ in group  # the layers whose outputs the group prunes
                      if isinstance(dep.target.module, _LAYERS) and pruner.DG.is_out_channel_pruning_fn(dep.handler)]
            failing.append((group[0].dep.target.module, layers, e))
    return failing


class GroupTooLarge(Exception):
    """A dependency group outgrew any real one (see :func:`bounded_groups`): ``root`` is the layer
    it was built for, ``layers`` the conv / linear layers it had reached."""

    def __init__(self, root: nn.Module, layers: List[nn.Module]):
        super().__init__(f"the dependency group of a {type(root).__name__} keeps growing")
        self.root, self.layers = root, layers


GROUP_GROWTH = 4  # a real group holds fewer entries than the graph has nodes; a runaway one passes this many times


@contextlib.contextmanager
def bounded_groups() -> Iterator[None]:
    """Inside the block, Torch-Pruning's dependency groups raise :class:`GroupTooLarge` once they
    hold more than ``GROUP_GROWTH`` times the graph's node count of entries. Channel slices inside a
    residual (ReXNet's partial shortcut) send its index mapping round a cycle that adds ever new
    index sets to one group: quadratic in the entries, it runs for hours and looks like a hang."""
    get, add = tp.DependencyGraph.get_pruning_group, tp.dependency.Group.add_dep
    state: dict = {}

    def bounded_get(graph, module, *args, **kwargs):
        state.update(root=module, count=0, limit=GROUP_GROWTH * len(graph.module2node) + 64, layers=[])
        return get(graph, module, *args, **kwargs)

    def bounded_add(group, dep, idxs):
        if state:
            state["count"] += 1
            if isinstance(dep.target.module, _LAYERS):
                state["layers"].append(dep.target.module)
            if state["count"] > state["limit"]:
                raise GroupTooLarge(state["root"], list(dict.fromkeys(state["layers"])))
        return add(group, dep, idxs)

    tp.DependencyGraph.get_pruning_group, tp.dependency.Group.add_dep = bounded_get, bounded_add
    try:
        yield
    finally:
        tp.DependencyGraph.get_pruning_group, tp.dependency.Group.add_dep = get, add


def coupled_channels(graph, root: nn.Module, handler, channels: int) -> List[List[int]]:
    """The sets of more than one of ``root``'s ``channels`` that Torch-Pruning prunes together: pruning
    one prunes the others (each probed alone; one probe per set)."""
    together: List[List[int]] = []
    seen = set()
    for i in range(channels):
        if i in seen:
            continue
        found = sorted({int(j) for j in graph.get_pruning_group(root, handler, [i])[0].idxs} | {i})
        seen.update(found)
        if len(found) > 1:
            together.append(found)
    return together


class TiedImportance(tp.importance.MagnitudeImportance):
    """Magnitude importance that ranks channels pruned together as one (their mean).

    A root channel may pull other channels of the same root into its group: GhostNet concatenates a
    conv's output with a depthwise conv of it, so channels ``k`` and ``k + C`` of the concatenation
    are one. Ranked apart, the pruner picks half of the channels, their partners add the other
    half, and it drops the group as one that would remove every channel: the layers stay whole.
    Tied, it picks whole sets. ``graph``: the pruner's dependency graph, set once it is built."""

    def __init__(self, p: int):
        super().__init__(p=p)
        self.graph = None
        self._tied: Dict[tuple, List[List[int]]] = {}

    def __call__(self, group):
        imp = super().__call__(group)
        if imp is None or self.graph is None:
            return imp
        dep = group[0].dep
        key = (dep.target.module, dep.handler, len(imp))
        if key not in self._tied:
            self._tied[key] = coupled_channels(self.graph, dep.target.module, dep.handler, len(imp))
        for channels in self._tied[key]:
            imp[channels] = imp[channels].mean()
        return imp
