"""Cutting a backbone into segments and attaching exit heads: :func:`attach_exits`.

Zoo-style models (``classifier(features(x))``) are cut after ``features[p]``; any other model is
traced with torch.fx and cut after the named modules or nodes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn

from .. import checks
from ..errors import ArgumentTypeError, ConfigError, ModelError
from .exits import ExitNet, is_plain
from .heads import make_head
from .modes import evaluating
from .outputs import Output, check_output, pick, select_logits
from .points import DEFAULT_NUM_POINTS, find_exit_points, module_paths, trace

__all__ = ["attach_exits"]

# --------------------------------------------------------------------------- splitting a backbone


def _split_features(model: nn.Module, points: Sequence[int]) -> List[nn.Module]:
    """Segments of a zoo-style model (``classifier(features(x))``) cut after ``features[p]``."""
    if not (isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "classifier")):
        raise ModelError(
            f"integer exit points need a model with `features` (nn.Sequential) and `classifier`; "
            f"{type(model).__name__} has none, so give module or node names (split with torch.fx)"
        )
    n = len(model.features)
    for p in points:
        if not checks.is_int(p) or not 0 <= p < n:
            raise ConfigError(f"exit point must be a feature index in 0..{n - 1}, got {p!r}")
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ConfigError(f"exit points must be strictly increasing, got {list(points)}")
    bounds = [0, *(p + 1 for p in points)]
    segments: List[nn.Module] = [model.features[a:b] for a, b in zip(bounds, bounds[1:])]
    segments.append(nn.Sequential(OrderedDict(features=model.features[bounds[-1]:], classifier=model.classifier)))
    return segments


def _find_point(nodes: List[torch.fx.Node], point: str) -> torch.fx.Node:
    """The node after which to cut: the last node computed inside module ``point``, or the node so named."""
    inside = [i for i, n in enumerate(nodes) if point in module_paths(n)]
    named = [n for n in nodes if n.name == point and n.op not in ("placeholder", "output")]
    if inside:
        if inside[-1] - inside[0] + 1 != len(inside):
            if named:  # fx names a module's first call after the module: the node is what the name means
                return named[0]
            calls = [nodes[i].name for i in inside]
            raise ConfigError(f"exit point {point!r} is a module that runs more than once; name a node instead: {calls}")
        return nodes[inside[-1]]
    if named:
        return named[0]
    modules = sorted({path for n in nodes for path in module_paths(n)})
    raise ConfigError(f"exit point {point!r} is neither a module nor a node of the traced model; modules: {modules}")


def _final_value(g: torch.fx.Graph, result, output: Output) -> torch.fx.Node:
    """The node of the last segment's graph ``g`` holding the logits of the traced ``result``."""
    tracer = torch.fx.proxy.GraphAppendingTracer(g)
    value = torch.fx.map_arg(result, lambda n: torch.fx.Proxy(n, tracer))
    if callable(output):
        value = output(value)
    elif isinstance(value, torch.fx.Proxy):
        value = value if output is None else value[output]
    else:
        value = pick(value, output)
    if not isinstance(value, torch.fx.Proxy):
        raise ModelError(f"the logits selected by output={output!r} are not a value computed by the model")
    return value.node


def _split_fx(model: nn.Module, points: Sequence[str], output: Output = None) -> List[nn.Module]:
    """Cuts any fx-traceable single-input model into sequential ``GraphModule`` segments; the last
    one returns the logits (taken from the model's output as ``output`` says).

    The model is traced in eval mode. A cut is only possible where a single value carries
    everything later code needs: a point inside a residual block (whose skip connection
    crosses it) is refused with the reason.
    """
    try:
        graph = trace(model)
    except ModelError as e:
        raise ModelError(
            f"cannot split {type(model).__name__} at {list(points)}: {e}; give the model `features` and "
            "`classifier`, or build ExitNet(segments, heads)"
        ) from e
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelError(f"cannot split {type(model).__name__}: its forward must take one input, takes {len(inputs)}")
    cuts = [_find_point(nodes, p) for p in points]
    position = {n: i for i, n in enumerate(nodes)}
    for (pa, a), (pb, b) in zip(zip(points, cuts), zip(points[1:], cuts[1:])):
        if position[b] <= position[a]:
            raise ConfigError(f"exit points must follow execution order, but {pb!r} does not come after {pa!r}")

    bounds = [inputs[0], *cuts]
    segment_of = {}
    for j, start in enumerate(bounds):
        end = position[bounds[j + 1]] if j + 1 < len(bounds) else len(nodes) - 1
        for n in nodes[position[start] + 1 : end + 1]:
            segment_of[n] = j

    segments: List[nn.Module] = []
    for j, start in enumerate(bounds):
        g = torch.fx.Graph()
        env = {start: g.placeholder("x")}

        def lookup(a: torch.fx.Node, j=j, g=g, env=env) -> torch.fx.Node:
            if a not in env:
                if a.op != "get_attr":
                    user = points[segment_of.get(a, 0)] if a.op != "placeholder" else points[0]
                    raise ConfigError(
                        f"cannot split at exit point {user!r}: {a.name!r}, computed before it, is used after it "
                        f"(e.g. a skip connection crosses the point)"
                    )
                env[a] = g.node_copy(a)
            return env[a]

        for n in nodes:
            if segment_of.get(n) != j:
                continue
            if n.op == "output":
                g.output(_final_value(g, torch.fx.map_arg(n.args[0], lookup), output))
            else:
                env[n] = g.node_copy(n, lookup)
        if j + 1 < len(bounds):
            g.output(lookup(bounds[j + 1]))
        segments.append(torch.fx.GraphModule(model, g, class_name=f"Segment{j}"))
    return segments


# --------------------------------------------------------------------------- attaching heads


def _segment_outputs(model: nn.Module, segments: Sequence[nn.Module], points: Sequence, example_input: torch.Tensor,
                     output: Output) -> List[torch.Tensor]:
    """Each segment's output on ``example_input`` (eval mode), checked to end in ``model``'s logits."""
    with evaluating(model), torch.no_grad():
        expected = select_logits(model(example_input), output)
        h, features = example_input, []
        for segment in segments:
            h = segment(h)
            features.append(h)
    if not (isinstance(h, torch.Tensor) and h.shape == expected.shape and torch.allclose(h, expected, atol=1e-5)):
        raise ModelError(
            f"the segments cut at {points} do not reproduce {type(model).__name__}'s output; "
            "its forward must be classifier(features(x)) (integer points) or traceable as-is (names)"
        )
    if h.dim() != 2:
        raise ModelError(f"the model must return logits [batch, classes], got shape {tuple(h.shape)}")
    return features


def attach_exits(
    model: nn.Module,
    points: Optional[Sequence[Union[int, str]]] = None,
    head: Union[str, Callable[..., nn.Module]] = "pool",
    *,
    example_input: Optional[torch.Tensor] = None,
    input_size: Optional[Sequence[int]] = None,
    output: Output = None,
    num_points: int = DEFAULT_NUM_POINTS,
    **head_kwargs,
) -> ExitNet:
    """Cuts ``model`` at ``points`` and puts an exit head after each cut.

    ``points``: for models with ``features`` (nn.Sequential) and ``classifier`` whose forward is
    ``classifier(features(x))``, indices into ``features`` after which heads go (default:
    ``model.default_exit_points()``); for any other model, names of modules (the cut follows
    the module's last operation) or of torch.fx nodes, split with torch.fx (default:
    ``num_points`` points found by :func:`~ordercomp.nn.points.find_exit_points`). ``output``:
    where the logits are in the model's output (see :func:`~ordercomp.nn.outputs.select_logits`);
    the net's last segment returns them. ``head``:
    ``"pool"`` (:class:`PoolHead`), ``"conv"`` (:class:`ConvHead`, ``head_kwargs`` go to it) or a
    callable ``(in_channels, num_classes, **head_kwargs) -> nn.Module``. Head sizes and the
    number of classes come from running ``example_input`` (or random data of ``input_size``,
    without the batch dimension) through the segments; the cut model is checked to compute
    the same logits as ``model``. The segments share ``model``'s modules. The net records
    ``points`` (resolved), ``head_kind`` (``"custom"`` for a callable), ``head_kwargs`` (for a
    callable only when they are plain JSON values) and ``output`` (None for a callable), so it
    can be rebuilt from a recipe.
    """
    if isinstance(model, ExitNet):
        raise ConfigError("model is already an ExitNet; attach exits to its backbone instead")
    if example_input is None:
        if input_size is None:
            raise ConfigError("attach_exits needs example_input or input_size to size the heads")
        ref = next(model.parameters(), None)
        example_input = torch.randn(2, *input_size, device=None if ref is None else ref.device)
    check_output(output)
    if points is None:
        if hasattr(model, "default_exit_points"):
            points = model.default_exit_points()
        else:
            points = find_exit_points(model, example_input, num_points, output)
    points = list(points)
    if not points:
        raise ConfigError("points must name at least one exit point")
    if all(isinstance(p, str) for p in points):
        segments = _split_fx(model, points, output)
    elif all(checks.is_int(p) for p in points):
        segments = _split_features(model, points)
    else:
        raise ArgumentTypeError(f"points must be all feature indices (int) or all module/node names (str), got {points!r}")

    features = _segment_outputs(model, segments, points, example_input, output)
    num_classes = features[-1].shape[1]
    heads = []
    for p, f in zip(points, features):
        if f.dim() != 4:
            raise ModelError(f"exit point {p!r} gives features of shape {tuple(f.shape)}; heads need [B, C, H, W]")
        heads.append(make_head(head, f.shape[1], num_classes, **head_kwargs))
    kind = head if isinstance(head, str) else "custom"
    recorded = head_kwargs if kind != "custom" or is_plain(head_kwargs) else {}
    net = ExitNet(
        segments,
        [hd.to(device=f.device, dtype=f.dtype) for f, hd in zip(features, heads)],
        head_kind=kind,
        head_kwargs=recorded,
        points=points,
        output=output if output is None or isinstance(output, (str, int)) else None,
    )
    return net.train(model.training)
