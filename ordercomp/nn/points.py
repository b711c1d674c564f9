"""Where a backbone can be cut for an exit head: :func:`candidate_points` and :func:`find_exit_points`.

A candidate exit point is a place in the forward through which the whole state passes: in the
torch.fx graph, a node that every path from the input to the output goes through (no value
computed before it is used after it, apart from the node itself), such as a block's output
after its residual add or a downsampling. Only points giving image features ``[B, C, H, W]``
after at least one conv and with at least one conv or linear layer between them and the final
classifier count. Each is named by the outermost module
whose last operation it is (``layer2``, ``blocks.3``), else by its fx node (``add_4``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from .. import checks
from ..errors import ModelError
from .modes import evaluating
from .outputs import Output, select_logits
from .quant import QuantLayer

__all__ = ["ExitPoint", "trace", "candidate_points", "choose_points", "find_exit_points", "DEFAULT_NUM_POINTS"]

DEFAULT_NUM_POINTS = 3


# normalization layers are kept whole even when a library subclasses them (timm's BatchNormAct2d,
# torchvision's LayerNorm2d): traced into, a batch norm is cut into segments as F.batch_norm in eval
# form, frozen when its segment trains, and its tensors are attributes no result file can resize
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps quantized layers, normalization layers (``_NORMS``) and the modules in
    ``leaves`` whole (their forward calls ops that cannot be traced); ``failed_in`` names the
    innermost module whose forward failed to trace."""

    def __init__(self, leaves: Sequence[str] = ()):
        super().__init__()
        self.leaves = set(leaves)
        self.failed_in: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, (QuantLayer, *_NORMS))
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = next((path for path, mod in self.root.named_modules() if mod is m), None)
            raise


def trace(model: nn.Module) -> torch.fx.Graph:
    """The torch.fx graph of ``model``'s forward in eval mode (train-only branches, such as
    auxiliary heads, are left out); ModelError saying why when it cannot be traced.

    A submodule whose own forward cannot be traced (``int(x.size(1))``, data-dependent control
    flow) is kept whole, as one call, and the trace goes on around it: exit points then lie at
    that module's boundaries. Only code in ``model``'s own forward must be traceable.
    """
    leaves: List[str] = []
    with evaluating(model):
        while True:
            tracer = _Tracer(leaves)
            try:
                return tracer.trace(model)
            except Exception as e:
                if tracer.failed_in is None or tracer.failed_in in leaves:
                    raise ModelError(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e})") from e
                leaves.append(tracer.failed_in)


def module_paths(node: torch.fx.Node) -> List[str]:
    """Qualified names of the modules whose forward created ``node`` (outermost first)."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


@dataclass
class ExitPoint:
    """A candidate exit point: its ``name`` (a module or fx node), the fx ``node`` it cuts after,
    the share of the backbone's MACs computed before it (``macs_fraction``) and the feature shape."""

    name: str
    node: str
    macs_fraction: float
    shape: Tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} ({100 * self.macs_fraction:.0f}% of MACs, {list(self.shape)})"


def cut_positions(nodes: Sequence[torch.fx.Node]) -> List[int]:
    """Positions i such that node i is the only value computed at or before i and used after i."""
    position = {n: i for i, n in enumerate(nodes)}
    crossing = [0] * (len(nodes) + 1)
    crosses = [False] * len(nodes)
    for i, n in enumerate(nodes):
        if n.op in ("get_attr", "output") or not n.users:
            continue
        last = max(position[u] for u in n.users)
        if last > i:  # n is live across the boundaries i .. last - 1
            crossing[i] += 1
            crossing[last] -= 1
            crosses[i] = True
    out, live = [], 0
    for i in range(len(nodes)):
        live += crossing[i]
        if live == 1 and crosses[i]:
            out.append(i)
    return out


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    per_input = out[0].numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        return per_input * (module.in_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
    return per_input * module.in_features


class _Measure(torch.fx.Interpreter):
    """Runs the graph once, keeping each node's output shape and each conv / linear layer's MACs."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.shapes: Dict[torch.fx.Node, Optional[Tuple[int, ...]]] = {}
        self.macs: Dict[torch.fx.Node, int] = {}

    def run_node(self, n: torch.fx.Node):
        layers = []
        if n.op == "call_module":  # a layer, or a module kept whole (its layers counted as they run)
            m = self.module.get_submodule(n.target)
            layers = [x for x in m.modules() if isinstance(x, (nn.modules.conv._ConvNd, nn.Linear))]
        macs = []
        handles = [x.register_forward_hook(lambda mod, args, y: macs.append(_layer_macs(mod, y))) for x in layers]
        try:
            out = super().run_node(n)
        finally:
            for h in handles:
                h.remove()
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if macs:
            self.macs[n] = sum(macs)
        return out


def _name(nodes: Sequence[torch.fx.Node], i: int) -> str:
    """The outermost module whose last operation (running once) node i is, else the node's name."""
    for path in module_paths(nodes[i]):
        inside = [j for j, n in enumerate(nodes) if path in module_paths(n)]
        if inside[-1] == i and inside[-1] - inside[0] + 1 == len(inside):
            return path
    return nodes[i].name


def candidate_points(model: nn.Module, example_input: torch.Tensor, output: Output = None) -> List[ExitPoint]:
    """Every candidate exit point of ``model`` (see the module docstring), in execution order.

    Of the candidates between two MAC-counting layers only the last is kept (after the
    activation, pooling or residual add rather than before). The model runs once on
    ``example_input`` in eval mode; ``output`` says where its logits are.
    """
    graph = trace(model)
    nodes = list(graph.nodes)
    gm = torch.fx.GraphModule(model, graph)
    measure = _Measure(gm)
    try:
        with evaluating(gm), torch.no_grad():
            select_logits(measure.run(example_input), output)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{type(model).__name__} failed on the example input while looking for exit points "
                         f"({type(e).__name__}: {e})") from e
    total = sum(measure.macs.values())
    last = [n for n in nodes if n in measure.macs][-1:]  # the final classifier
    body = total - (measure.macs[last[0]] if last else 0)
    cumulative, running = [], 0
    for n in nodes:
        running += measure.macs.get(n, 0)
        cumulative.append(running)
    found: Dict[int, ExitPoint] = {}
    batch = example_input.shape[0]
    for i in cut_positions(nodes):
        shape = measure.shapes.get(nodes[i])
        if nodes[i].op == "placeholder" or shape is None or len(shape) != 4 or shape[0] != batch:
            continue
        if not 0 < cumulative[i] < body:
            continue
        found[cumulative[i]] = ExitPoint(_name(nodes, i), nodes[i].name, cumulative[i] / total, shape[1:])
    return list(found.values())


def choose_points(candidates: Sequence[ExitPoint], count: int = DEFAULT_NUM_POINTS) -> List[ExitPoint]:
    """``count`` candidates spread by cumulative MACs: the nearest to 1/(count+1), 2/(count+1), ...
    of the backbone, each after the previous one (all of them when there are fewer)."""
    checks.integer("count", count, 1)
    if len(candidates) <= count:
        return list(candidates)
    chosen: List[ExitPoint] = []
    start = 0
    for k in range(count):
        target = (k + 1) / (count + 1)
        left = count - k - 1  # later targets each need a candidate after this one
        window = range(start, len(candidates) - left)
        best = min(window, key=lambda j: abs(candidates[j].macs_fraction - target))
        chosen.append(candidates[best])
        start = best + 1
    return chosen


def find_exit_points(model: nn.Module, example_input: torch.Tensor, count: int = DEFAULT_NUM_POINTS,
                     output: Output = None) -> List[str]:
    """The names of ``count`` exit points of ``model`` chosen by :func:`choose_points`; ModelError
    listing what was found when there is none."""
    candidates = candidate_points(model, example_input, output)
    if not candidates:
        raise ModelError(
            f"{type(model).__name__} has no candidate exit point: a point is a module or fx node whose "
            "output, image features [B, C, H, W] after a conv and before the last layer ahead of the "
            "classifier, is the only value the rest of the forward needs"
        )
    return [p.name for p in choose_points(candidates, count)]
