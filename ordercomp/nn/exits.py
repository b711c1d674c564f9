"""Exit heads, :class:`ExitNet` and dynamic early-exit inference.

An ``ExitNet`` is a backbone cut into K+1 ``segments`` (the last one ends with the final
classifier) plus K exit ``heads``; head i reads the output of segment i. ``forward`` runs every
segment and every head (training needs all logits, and the pruner must see every head in its
traced forward); :meth:`ExitNet.infer` is the dynamic inference that drops inputs from the
batch as soon as a head is confident enough, so later segments really run on fewer rows.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import nn

from .. import ops
from .quant import QuantLayer

__all__ = ["PoolHead", "ConvHead", "HEADS", "ExitNet", "ExitResult", "attach_exits"]


class PoolHead(nn.Sequential):
    """Exit head: global average pool -> flatten -> linear (the cheapest head)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_channels, num_classes))
        )


class ConvHead(nn.Sequential):
    """Exit head: 1x1 conv -> BN -> ReLU -> average pool to a ``grid`` x ``grid`` map -> linear.

    Keeps some spatial information, which helps heads placed early in the backbone.
    ``width`` (default: ``in_channels``) is the number of 1x1 conv filters.
    """

    def __init__(self, in_channels: int, num_classes: int, width: Optional[int] = None, grid: int = 2):
        width = in_channels if width is None else width
        if width < 1 or grid < 1:
            raise ValueError(f"width and grid must be >= 1, got width={width}, grid={grid}")
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, width, 1, bias=False),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU(),
                pool=nn.AdaptiveAvgPool2d(grid),
                flatten=nn.Flatten(),
                fc=nn.Linear(width * grid * grid, num_classes),
            )
        )


HEADS = {"pool": PoolHead, "conv": ConvHead}

Costs = Tuple[Sequence[float], Sequence[float]]


@dataclass
class ExitResult:
    """Outcome of :meth:`ExitNet.infer` for a batch of B inputs, in the batch's order.

    ``logits`` [B, C] come from the exit each input left at; ``exit_index`` [B] is that exit
    (0..K-1 for the heads, K for the final classifier); ``bitops`` [B] float64 is what each input
    paid (segments it ran plus heads it evaluated), when costs were given.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    num_exits: int
    bitops: Optional[torch.Tensor] = None

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    def exit_counts(self) -> torch.Tensor:
        """Number of inputs that left at each of the K+1 exits."""
        return torch.bincount(self.exit_index, minlength=self.num_exits)

    @property
    def expected_bitops(self) -> float:
        """Mean BitOps per input of this batch."""
        if self.bitops is None:
            raise ValueError("no costs were given to infer(), so no BitOps were counted")
        return float(self.bitops.mean()) if self.bitops.numel() else 0.0


def _check_threshold(value, allow_none: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value) or value < 0:
        what = "None or a number" if allow_none else "a number"
        raise ValueError(
            f"threshold must be {what} >= 0 (in [0, 1] to allow early exits, > 1 for none), got {value!r}"
        )
    return float(value)


def _check_criterion(value) -> str:
    if value not in ops.CRITERIA:
        raise ValueError(f"criterion must be one of {ops.CRITERIA}, got {value!r}")
    return value


def _is_plain(value) -> bool:
    """True for values JSON can hold exactly: None, bool, int, finite float, str, lists and str-keyed dicts."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _last_layer(module: nn.Module) -> Optional[nn.Module]:
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1] if layers else None


class ExitNet(nn.Module):
    """A backbone in K+1 ``segments`` with K exit ``heads``; head i reads segment i's output.

    The segments share their modules with the model they were cut from (nothing is copied).
    The net owns its exit settings, kept in ``state_dict`` as plain values (see
    :meth:`get_extra_state`): ``threshold`` (None until chosen; > 1 means no exit),
    ``criterion``, and how the heads were made (``head_kind``: ``pool``, ``conv`` or
    ``custom``; ``head_kwargs``; ``points``, the exit points, [] when built from segments),
    so that a saved net can be rebuilt and run without outside bookkeeping.
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        threshold: Optional[float] = None,
        criterion: str = "maxprob",
        head_kind: str = "custom",
        head_kwargs: Optional[dict] = None,
        points: Optional[Sequence[Union[int, str]]] = None,
    ):
        super().__init__()
        if len(segments) != len(heads) + 1:
            raise ValueError(f"need one more segment than heads, got {len(segments)} segments and {len(heads)} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.backbone_frozen = False
        self.threshold = threshold
        self.criterion = criterion
        self.set_extra_state(
            {"head_kind": head_kind, "head_kwargs": head_kwargs or {}, "points": [] if points is None else points}
        )

    @property
    def threshold(self) -> Optional[float]:
        """Confidence at which inputs leave (see :meth:`infer`); None until chosen."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: Optional[float]) -> None:
        self._threshold = None if value is None else _check_threshold(value, allow_none=True)

    @property
    def criterion(self) -> str:
        """Confidence measure of the exits, one of ``ops.CRITERIA``."""
        return self._criterion

    @criterion.setter
    def criterion(self, value: str) -> None:
        self._criterion = _check_criterion(value)

    def get_extra_state(self) -> dict:
        """The exit settings as plain Python values (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "threshold": self.threshold,
            "criterion": self.criterion,
            "head_kind": self.head_kind,
            "head_kwargs": copy.deepcopy(self.head_kwargs),
            "points": list(self.points),
        }

    def set_extra_state(self, state: dict) -> None:
        """Restores (and validates) settings written by :meth:`get_extra_state`; absent keys are kept."""
        if not isinstance(state, dict):
            raise ValueError(f"ExitNet extra state must be a dict, got {type(state).__name__}")
        unknown = sorted(set(state) - {"threshold", "criterion", "head_kind", "head_kwargs", "points"})
        if unknown:
            raise ValueError(f"ExitNet extra state has unknown keys {unknown}")
        if "threshold" in state:
            self.threshold = state["threshold"]
        if "criterion" in state:
            self.criterion = state["criterion"]
        if "head_kind" in state:
            kind = state["head_kind"]
            if kind not in (*HEADS, "custom"):
                raise ValueError(f"head_kind must be one of {(*HEADS, 'custom')}, got {kind!r}")
            self.head_kind = kind
        if "head_kwargs" in state:
            kwargs = state["head_kwargs"]
            if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs) and _is_plain(kwargs)):
                raise ValueError(f"head_kwargs must be a dict of plain (JSON) values, got {kwargs!r}")
            self.head_kwargs = copy.deepcopy(kwargs)
        if "points" in state:
            points = state["points"]
            if not isinstance(points, (list, tuple)) or not all(
                isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool)) for p in points
            ):
                raise ValueError(f"points must be a list of feature indices (int) or names (str), got {points!r}")
            self.points = list(points)

    @property
    def num_exits(self) -> int:
        """K + 1: the heads and the final classifier."""
        return len(self.segments)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every exit, ``[head_0, ..., head_{K-1}, final]`` (all heads run)."""
        outs = []
        for segment, head in zip(self.segments, self.heads):
            x = segment(x)
            outs.append(head(x))
        outs.append(self.segments[-1](x))
        return outs

    def classifiers(self) -> List[nn.Module]:
        """The layer producing each exit's logits (last conv / linear of each head, then of the backbone).

        These are the layers the pruner must keep whole and the quantizer treats as "last".
        """
        return [_last_layer(m) for m in [*self.heads, self.segments[-1]]]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.segments.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.heads.parameters()

    def freeze_backbone(self, frozen: bool = True) -> "ExitNet":
        """Freezes (or unfreezes) the segments so that only the heads train.

        Frozen segments get ``requires_grad=False`` and stay in eval mode through ``train()``,
        so their BatchNorm statistics do not move either. Unfreeze before pruning: the pruner
        traces the autograd graph, which frozen layers do not record.
        """
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        self.backbone_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ExitNet":
        super().train(mode)
        if self.backbone_frozen:
            self.segments.eval()
        return self

    def _resolve_costs(self, bitops) -> Tuple[List[float], List[float]]:
        costs = bitops(self) if callable(bitops) else bitops
        k = len(self.heads)
        try:
            segment_costs, head_costs = (list(map(float, c)) for c in costs)
        except (TypeError, ValueError):
            raise ValueError(
                f"bitops must be a pair (segment costs [{k + 1}], head costs [{k}]) or a callable returning one, "
                f"got {costs!r}"
            ) from None
        if len(segment_costs) != k + 1 or len(head_costs) != k:
            raise ValueError(
                f"bitops must give {k + 1} segment costs and {k} head costs, "
                f"got {len(segment_costs)} and {len(head_costs)}"
            )
        return segment_costs, head_costs

    @torch.no_grad()
    def infer(
        self,
        x: torch.Tensor,
        threshold: Optional[float] = None,
        criterion: Optional[str] = None,
        bitops: Union[None, Costs, Callable[["ExitNet"], Costs]] = None,
    ) -> ExitResult:
        """Dynamic inference: each input leaves at the first head confident enough.

        After segment i, head i runs on the inputs still in the batch; ``ops.exit_check`` marks
        those whose confidence (``criterion``: ``maxprob`` or ``entropy``) is >= ``threshold``;
        they are removed, and segment i+1 runs on the smaller batch. ``threshold`` in [0, 1]
        makes exits possible; a threshold above 1 means nobody can exit, so the heads are not
        evaluated at all and cost nothing (the plain backbone). ``None`` uses the net's own
        ``threshold`` / ``criterion``.

        ``bitops`` = ``(segment_costs, head_costs)`` (K+1 and K numbers) or a callable mapping
        this ExitNet to them: every input is charged each segment it ran and each head it
        evaluated (the one it left at included), accumulated with ``ops.accumulate_bitops``.
        Call ``eval()`` first: BatchNorm in training mode would see shrinking batches.
        """
        if threshold is None:
            if self.threshold is None:
                raise ValueError("threshold must be given: this ExitNet has no threshold chosen yet")
            threshold = self.threshold
        threshold = _check_threshold(threshold, allow_none=False)
        criterion = self.criterion if criterion is None else _check_criterion(criterion)
        segment_costs, head_costs = self._resolve_costs(bitops) if bitops is not None else (None, None)
        batch, k = x.shape[0], len(self.heads)
        rows = torch.arange(batch, device=x.device)
        exit_index = torch.full((batch,), k, dtype=torch.int64, device=x.device)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
        counter = torch.zeros(batch, dtype=torch.float64, device=x.device) if bitops is not None else None
        out: Optional[torch.Tensor] = None

        def place(out, where, logits):
            if out is None:
                out = logits.new_empty((batch, logits.shape[1]))
            elif logits.shape[1] != out.shape[1]:
                raise ValueError(f"exits disagree on the number of classes: {out.shape[1]} vs {logits.shape[1]}")
            out[where] = logits
            return out

        h = x
        for i, segment in enumerate(self.segments):
            h = segment(h)
            if counter is not None:
                ops.accumulate_bitops(counter, active, segment_costs[i])
            if i == k:
                out = place(out, rows, h)
                break
            if threshold > 1:
                continue
            logits = self.heads[i](h)
            if counter is not None:
                ops.accumulate_bitops(counter, active, head_costs[i])
            _, _, leave = ops.exit_check(logits, float(threshold), criterion)
            if bool(leave.any()):
                gone = rows[leave]
                out = place(out, gone, logits[leave])
                exit_index[gone] = i
                active[gone] = False
                stay = ~leave
                rows, h = rows[stay], h[stay]
                if rows.numel() == 0:
                    break
        return ExitResult(logits=out, exit_index=exit_index, num_exits=k + 1, bitops=counter)


# --------------------------------------------------------------------------- splitting a backbone


def _split_features(model: nn.Module, points: Sequence[int]) -> List[nn.Module]:
    """Segments of a zoo-style model (``classifier(features(x))``) cut after ``features[p]``."""
    if not (isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "classifier")):
        raise ValueError(
            f"integer exit points need a model with `features` (nn.Sequential) and `classifier`; "
            f"{type(model).__name__} has none, so give module or node names (split with torch.fx)"
        )
    n = len(model.features)
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n:
            raise ValueError(f"exit point must be a feature index in 0..{n - 1}, got {p!r}")
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"exit points must be strictly increasing, got {list(points)}")
    bounds = [0, *(p + 1 for p in points)]
    segments: List[nn.Module] = [model.features[a:b] for a, b in zip(bounds, bounds[1:])]
    segments.append(nn.Sequential(OrderedDict(features=model.features[bounds[-1]:], classifier=model.classifier)))
    return segments


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps quantized layers whole (their forward calls ops that cannot be traced)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def _module_paths(node: torch.fx.Node) -> List[str]:
    """Qualified names of the modules whose forward created ``node`` (outermost first)."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _find_point(nodes: List[torch.fx.Node], point: str) -> torch.fx.Node:
    """The node after which to cut: the last node computed inside module ``point``, or the node so named."""
    inside = [i for i, n in enumerate(nodes) if point in _module_paths(n)]
    if inside:
        if inside[-1] - inside[0] + 1 != len(inside):
            calls = [nodes[i].name for i in inside]
            raise ValueError(f"exit point {point!r} is a module that runs more than once; name a node instead: {calls}")
        return nodes[inside[-1]]
    named = [n for n in nodes if n.name == point and n.op not in ("placeholder", "output")]
    if named:
        return named[0]
    modules = sorted({path for n in nodes for path in _module_paths(n)})
    raise ValueError(f"exit point {point!r} is neither a module nor a node of the traced model; modules: {modules}")


def _split_fx(model: nn.Module, points: Sequence[str]) -> List[nn.Module]:
    """Cuts any fx-traceable single-input model into sequential ``GraphModule`` segments.

    A cut is only possible where a single value carries everything later code needs: a point
    inside a residual block (whose skip connection crosses it) is refused with the reason.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise ValueError(
            f"cannot split {type(model).__name__} at {list(points)}: torch.fx cannot trace it "
            f"({type(e).__name__}: {e}); give the model `features` and `classifier`, or build ExitNet(segments, heads)"
        ) from e
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"cannot split {type(model).__name__}: its forward must take one input, takes {len(inputs)}")
    cuts = [_find_point(nodes, p) for p in points]
    position = {n: i for i, n in enumerate(nodes)}
    for (pa, a), (pb, b) in zip(zip(points, cuts), zip(points[1:], cuts[1:])):
        if position[b] <= position[a]:
            raise ValueError(f"exit points must follow execution order, but {pb!r} does not come after {pa!r}")

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
                    raise ValueError(
                        f"cannot split at exit point {user!r}: {a.name!r}, computed before it, is used after it "
                        f"(e.g. a skip connection crosses the point)"
                    )
                env[a] = g.node_copy(a)
            return env[a]

        for n in nodes:
            if segment_of.get(n) != j:
                continue
            if n.op == "output":
                g.output(torch.fx.map_arg(n.args[0], lookup))
            else:
                env[n] = g.node_copy(n, lookup)
        if j + 1 < len(bounds):
            g.output(lookup(bounds[j + 1]))
        segments.append(torch.fx.GraphModule(model, g, class_name=f"Segment{j}"))
    return segments


# --------------------------------------------------------------------------- attaching heads


def _make_head(head, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    if callable(head) and not isinstance(head, str):
        return head(in_channels, num_classes, **kwargs)
    if head not in HEADS:
        raise ValueError(f"head must be one of {tuple(HEADS)} or a callable(in_channels, num_classes), got {head!r}")
    return HEADS[head](in_channels, num_classes, **kwargs)


def attach_exits(
    model: nn.Module,
    points: Optional[Sequence[Union[int, str]]] = None,
    head: Union[str, Callable[..., nn.Module]] = "pool",
    *,
    example_input: Optional[torch.Tensor] = None,
    input_size: Optional[Sequence[int]] = None,
    **head_kwargs,
) -> ExitNet:
    """Cuts ``model`` at ``points`` and puts an exit head after each cut.

    ``points``: for models with ``features`` (nn.Sequential) and ``classifier`` whose forward is
    ``classifier(features(x))``, indices into ``features`` after which heads go (default:
    ``model.default_exit_points()``); for any other model, names of modules (the cut follows
    the module's last operation) or of torch.fx nodes, split with torch.fx. ``head``:
    ``"pool"`` (:class:`PoolHead`), ``"conv"`` (:class:`ConvHead`, ``head_kwargs`` go to it) or a
    callable ``(in_channels, num_classes, **head_kwargs) -> nn.Module``. Head sizes and the
    number of classes come from running ``example_input`` (or random data of ``input_size``,
    without the batch dimension) through the segments; the cut model is checked to compute
    the same logits as ``model``. The segments share ``model``'s modules. The net records
    ``points`` (resolved), ``head_kind`` (``"custom"`` for a callable) and ``head_kwargs``
    (for a callable only when they are plain JSON values), so it can be rebuilt from a recipe.
    """
    if isinstance(model, ExitNet):
        raise ValueError("model is already an ExitNet; attach exits to its backbone instead")
    if example_input is None:
        if input_size is None:
            raise ValueError("attach_exits needs example_input or input_size to size the heads")
        ref = next(model.parameters(), None)
        example_input = torch.randn(2, *input_size, device=None if ref is None else ref.device)
    if points is None:
        if not hasattr(model, "default_exit_points"):
            raise ValueError(f"points must be given: {type(model).__name__} has no default_exit_points()")
        points = model.default_exit_points()
    points = list(points)
    if not points:
        raise ValueError("points must name at least one exit point")
    if all(isinstance(p, str) for p in points):
        segments = _split_fx(model, points)
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in points):
        segments = _split_features(model, points)
    else:
        raise TypeError(f"points must be all feature indices (int) or all module/node names (str), got {points!r}")

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            expected = model(example_input)
            h, features = example_input, []
            for segment in segments:
                h = segment(h)
                features.append(h)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not (isinstance(expected, torch.Tensor) and h.shape == expected.shape and torch.allclose(h, expected, atol=1e-5)):
        raise ValueError(
            f"the segments cut at {points} do not reproduce {type(model).__name__}'s output; "
            "its forward must be classifier(features(x)) (integer points) or traceable as-is (names)"
        )
    if h.dim() != 2:
        raise ValueError(f"the model must return logits [batch, classes], got shape {tuple(h.shape)}")
    num_classes = h.shape[1]
    heads = []
    for p, f in zip(points, features):
        if f.dim() != 4:
            raise ValueError(f"exit point {p!r} gives features of shape {tuple(f.shape)}; heads need [B, C, H, W]")
        heads.append(_make_head(head, f.shape[1], num_classes, **head_kwargs))
    kind = head if isinstance(head, str) else "custom"
    recorded = head_kwargs if kind != "custom" or _is_plain(head_kwargs) else {}
    net = ExitNet(
        segments,
        [hd.to(device=f.device, dtype=f.dtype) for f, hd in zip(features, heads)],
        head_kind=kind,
        head_kwargs=recorded,
        points=points,
    )
    return net.train(model.training)
