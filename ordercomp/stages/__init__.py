"""The four compression stages and :func:`run_order`, which chains them in any order.

``D`` :class:`Distill`, ``P`` :class:`Prune`, ``Q`` :class:`Quantize`, ``E`` :class:`EarlyExit`.
Every order works, repeats included; what an order means where it matters (PD, QD, ED, EP, EQ,
QE, PE) is described on each stage class.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .base import Stage, StageInfo, StageResult
from .distill import Distill, derive_student, thinner_copy, zoo_spec
from .early_exit import NO_EXIT, EarlyExit, SweepPoint, exit_costs, sweep
from .prune import Prune, channel_counts, prune_channels
from .quantize import Quantize

__all__ = [
    "Stage",
    "StageInfo",
    "StageResult",
    "Distill",
    "Prune",
    "Quantize",
    "EarlyExit",
    "STAGES",
    "parse_order",
    "plan_order",
    "run_order",
    "run_plan",
    "prune_channels",
    "channel_counts",
    "derive_student",
    "thinner_copy",
    "zoo_spec",
    "sweep",
    "SweepPoint",
    "exit_costs",
    "NO_EXIT",
]

STAGES: Dict[str, type] = {"D": Distill, "P": Prune, "Q": Quantize, "E": EarlyExit}
StageConfigs = Mapping[str, Union[Stage, Sequence[Stage]]]


def parse_order(order: str) -> str:
    """Validates an order string: one or more of the letters D, P, Q, E (case-insensitive, repeats allowed)."""
    if not isinstance(order, str) or not order:
        raise ValueError(f"order must be a non-empty string of the letters {''.join(STAGES)}, got {order!r}")
    upper = order.upper()
    unknown = sorted(set(upper) - set(STAGES))
    if unknown:
        letters, bad = "".join(STAGES), "".join(unknown)
        raise ValueError(f"order must use only the letters {letters}, got {order!r} (unknown: {bad})")
    return upper


def plan_order(order: str, stages: Optional[StageConfigs] = None) -> List[Stage]:
    """The stage configs to run for ``order``, checked.

    ``stages`` maps a letter to its config, or to a list of configs used by the letter's
    successive occurrences (the last one repeats), e.g. ``{"P": [Prune(0.3), Prune(0.5)]}`` for
    ``"PP"``. Letters without a config use the defaults.
    """
    order = parse_order(order)
    stages = dict(stages or {})
    extra = sorted(set(stages) - set(STAGES))
    if extra:
        raise ValueError(f"stages has keys {extra}; allowed: {list(STAGES)}")
    plan, seen = [], {}
    for letter in order:
        given = stages.get(letter)
        options = list(given) if isinstance(given, (list, tuple)) else [given]
        config = options[min(seen.get(letter, 0), len(options) - 1)]
        seen[letter] = seen.get(letter, 0) + 1
        config = STAGES[letter]() if config is None else config
        if not isinstance(config, STAGES[letter]):
            raise TypeError(f"stages[{letter!r}] must be a {STAGES[letter].__name__}, got {type(config).__name__}")
        config.check()
        plan.append(config)
    return plan


def run_order(
    model: nn.Module,
    order: str,
    stages: Optional[StageConfigs] = None,
    context=None,
    copy_model: bool = True,
) -> Tuple[nn.Module, List[StageResult]]:
    """Runs the stages of ``order`` one after the other, each followed by its fine-tuning; returns
    the compressed model and one :class:`StageResult` per stage.

    Everything that can be checked is checked before any training: the order letters, every
    stage's settings, and each stage against the input model (the pruner can trace it, a given
    student has the right number of classes, ...). With ``copy_model`` the input model is
    left untouched (``context.teacher`` stays the original).
    """
    plan = plan_order(order, stages)
    if context is None:
        raise ValueError("context must be given (see ordercomp.train.Context.create)")
    for stage in plan:
        stage.validate(model, context)
    current = copy.deepcopy(model) if copy_model else model
    results = []
    for _, result, current in run_plan(current, plan, context):
        results.append(result)
    return current, results


def run_plan(model: nn.Module, plan: Sequence[Stage], context, start: int = 0,
             before: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[int, StageResult, nn.Module]]:
    """Runs ``plan[start:]`` on ``model`` one stage after the other, yielding ``(step, result, model)``
    after each; ``before(step)`` is called before each stage (e.g. to seed it)."""
    current = model
    current.zoo_spec = zoo_spec(current)
    for step in range(start, len(plan)):
        if before is not None:
            before(step)
        result = plan[step].run(current, context)
        current = result.model
        yield step, result, current
