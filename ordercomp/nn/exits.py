""":class:`ExitNet` and dynamic early-exit inference.

An ``ExitNet`` is a backbone cut into K+1 ``segments`` (the last one ends with the final
classifier) plus K exit ``heads``; head i reads the output of segment i. ``forward`` runs every
segment and every head (training needs all logits, and the pruner must see every head in its
traced forward); :meth:`ExitNet.infer` is the dynamic inference that drops inputs from the
batch as soon as a head is confident enough, so later segments really run on fewer rows.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import checks, ops
from ..errors import ConfigError, ModelError
from .heads import HEADS

__all__ = ["ExitNet", "ExitResult", "is_plain"]


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
            raise ConfigError("no costs were given to infer(), so no BitOps were counted")
        return float(self.bitops.mean()) if self.bitops.numel() else 0.0


def _check_threshold(value, allow_none: bool) -> float:
    if not checks.is_real(value) or math.isnan(value) or value < 0:
        what = "None or a number" if allow_none else "a number"
        raise ConfigError(
            f"threshold must be {what} >= 0 (in [0, 1] to allow early exits, > 1 for none), got {value!r}"
        )
    return float(value)


def _check_criterion(value) -> str:
    return checks.one_of("criterion", value, ops.CRITERIA)


def is_plain(value) -> bool:
    """True for values JSON can hold exactly: None, bool, int, finite float, str, lists and str-keyed dicts."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
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
    ``custom``; ``head_kwargs``; ``points``, the exit points, [] when built from segments;
    ``output``, where the cut model's logits were in its output: None, a key or an index), so that a saved net can be rebuilt and run without outside bookkeeping.
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
        output: Union[None, str, int] = None,
    ):
        super().__init__()
        if len(segments) != len(heads) + 1:
            raise ModelError(f"need one more segment than heads, got {len(segments)} segments and {len(heads)} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.backbone_frozen = False
        self.threshold = threshold
        self.criterion = criterion
        self.set_extra_state({"head_kind": head_kind, "head_kwargs": head_kwargs or {},
                              "points": [] if points is None else points, "output": output})

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
            "output": self.output,
        }

    def set_extra_state(self, state: dict) -> None:
        """Restores (and validates) settings written by :meth:`get_extra_state`; absent keys are kept."""
        if not isinstance(state, dict):
            raise ModelError(f"ExitNet extra state must be a dict, got {type(state).__name__}")
        unknown = sorted(set(state) - {"threshold", "criterion", "head_kind", "head_kwargs", "points", "output"})
        if unknown:
            raise ModelError(f"ExitNet extra state has unknown keys {unknown}")
        if "threshold" in state:
            self.threshold = state["threshold"]
        if "criterion" in state:
            self.criterion = state["criterion"]
        if "head_kind" in state:
            kind = state["head_kind"]
            if kind not in (*HEADS, "custom"):
                raise ConfigError(f"head_kind must be one of {(*HEADS, 'custom')}, got {kind!r}")
            self.head_kind = kind
        if "head_kwargs" in state:
            kwargs = state["head_kwargs"]
            if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs) and is_plain(kwargs)):
                raise ConfigError(f"head_kwargs must be a dict of plain (JSON) values, got {kwargs!r}")
            self.head_kwargs = copy.deepcopy(kwargs)
        if "points" in state:
            points = state["points"]
            if not isinstance(points, (list, tuple)) or not all(
                isinstance(p, str) or checks.is_int(p) for p in points
            ):
                raise ConfigError(f"points must be a list of feature indices (int) or names (str), got {points!r}")
            self.points = list(points)
        if "output" in state:
            output = state["output"]
            if not (output is None or isinstance(output, str) or checks.is_int(output)):
                raise ConfigError(f"output must be None, a key (str) or an index (int), got {output!r}")
            self.output = output

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
            raise ConfigError(
                f"bitops must be a pair (segment costs [{k + 1}], head costs [{k}]) or a callable returning one, "
                f"got {costs!r}"
            ) from None
        if len(segment_costs) != k + 1 or len(head_costs) != k:
            raise ConfigError(
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
                raise ConfigError("threshold must be given: this ExitNet has no threshold chosen yet")
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
                raise ModelError(f"exits disagree on the number of classes: {out.shape[1]} vs {logits.shape[1]}")
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
