"""The one runner of stages: the default driver of a stage's session (:meth:`ordercomp.stages.Stage.begin`):
check_model -> prepare -> fit each phase -> finalize -> choose exits -> measure.

Every training of a compression run happens here (``Trainer.fit`` is called by
:func:`fit_phase` only); stages just say what to train. Each phase ends on the calibration
signal (``context.calibration``). After any stage that leaves a model with exits the
threshold is chosen again on the calibration data (:func:`ordercomp.stages.choose_threshold`),
since their accuracy has changed; every accuracy a stage reports is measured on the validation data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import results
from ..errors import ConfigError
from ..stages import Context, EarlyExit, Phase, Stage, StageResult, plan_order
from ..stages.session import SessionPhase, exit_correct, zoo_spec_of
from ..train import FitResult, Monitor, Trainer

__all__ = ["fit_phase", "phase_monitor", "run_stage", "run_plan", "run_order", "Lineage", "zoo_spec_of",
           "exit_correct", "StageRunner"]


StageRunner = Callable[..., StageResult]  # run_stage's signature: (stage, model, context, *, exit_settings, lineage)


def fit_phase(trainer: Trainer, phase: SessionPhase, context: Context, desc: str) -> FitResult:
    """Fits one phase of a session with ``trainer`` inside the phase (its setup, frozen modules and
    random state; its teardown after), ending on the calibration signal it monitors."""
    with phase:
        return trainer.fit(phase.model, context.train_loader, phase.objective, params=phase.parameters(),
                           lr_scale=phase.phase.lr_scale, finetune=phase.phase.lr_scale is None,
                           epochs=phase.phase.epochs, frozen=phase.phase.frozen, desc=desc,
                           monitor=phase_monitor(trainer, context, phase.phase))


def phase_monitor(trainer: Trainer, context: Context, phase: Phase) -> Optional[Monitor]:
    """The calibration accuracy ``phase.monitor`` names with its standard error, or None (every
    epoch runs) when the phase monitors nothing or the trainer's ``patience`` is 0."""
    if phase.monitor is None or not trainer.config.patience:
        return None
    heads = phase.monitor == "heads"

    def monitor(model: nn.Module) -> Tuple[float, float]:
        outs = trainer.correct(model, context.calibration, desc="calibration")
        hits = torch.stack(outs[:-1] if heads and len(outs) > 1 else outs[-1:]).double().mean(0)  # per input
        error = float(hits.std()) / hits.numel() ** 0.5 if hits.numel() > 1 else 0.0
        return 100.0 * float(hits.mean()), 100.0 * error

    return monitor


@dataclass
class Lineage:
    """What a result file needs beyond the tensors: the original architecture and the one the
    current model was cut from (the original, or D's student)."""

    original: Dict[str, Any]
    base: Dict[str, Any]

    @classmethod
    def of(cls, model: nn.Module, zoo_spec=None) -> "Lineage":
        arch = results.architecture(model, zoo_spec)
        return cls(arch, dict(arch))


def run_stage(stage: Stage, model: nn.Module, context: Context, *, exit_settings: Optional[EarlyExit] = None,
              lineage: Optional[Lineage] = None) -> StageResult:
    """Runs one stage on ``model``, the default driver of its session (:meth:`Stage.begin`):
    every phase fitted by the context's trainer (each ends on the calibration signal), then the
    session's end: batch norm, finalize, the exit threshold chosen again on the calibration data
    (``exit_settings``: the sweep's settings, default the stage's own when it is an
    :class:`EarlyExit`, else the defaults), the model measured on the validation data and its
    costs counted. An E whose exits do not pay off gives back the model it got, without heads.
    ``lineage`` is updated when the stage builds a new architecture, and so is ``context.zoo_spec``."""
    session = stage.begin(model, context, exit_settings=exit_settings, lineage=lineage)
    for phase in session.phases:
        fit = fit_phase(context.trainer, phase, context, f"{stage.letter} {phase.name}")
        phase.done(fit.epochs, fit.epoch_losses, fit.monitored)
    return session.end()


def exit_settings_at(plan: Sequence[Stage], step: int) -> Optional[EarlyExit]:
    """The settings the exit threshold is chosen with after ``plan[step]``: the latest E up to
    it, else the first E of the plan, else None (the defaults)."""
    earlier = [s for s in plan[: step + 1] if isinstance(s, EarlyExit)]
    if earlier:
        return earlier[-1]
    return next((s for s in plan if isinstance(s, EarlyExit)), None)


def run_plan(model: nn.Module, plan: Sequence[Stage], context: Context, start: int = 0,
             before: Optional[Callable[[int], None]] = None,
             lineage: Optional[Lineage] = None,
             runner: Optional[StageRunner] = None) -> Iterator[Tuple[int, StageResult, nn.Module]]:
    """Runs ``plan[start:]`` on ``model`` one stage after the other, yielding ``(step, result, model)``
    after each; ``before(step)`` is called before each stage (e.g. to seed it). ``runner``: what
    runs a stage (:func:`run_stage` by default; same signature)."""
    runner = runner or run_stage
    current = model
    for step in range(start, len(plan)):
        if before is not None:
            before(step)
        result = runner(plan[step], current, context, exit_settings=exit_settings_at(plan, step), lineage=lineage)
        current = result.model
        yield step, result, current


def run_order(
    model: nn.Module,
    order: str,
    stages=None,
    context: Optional[Context] = None,
    copy_model: bool = True,
    runner: Optional["StageRunner"] = None,
) -> Tuple[nn.Module, List[StageResult]]:
    """Runs the stages of ``order`` one after the other, each followed by its training phases;
    returns the compressed model and one :class:`StageResult` per stage.

    Everything that can be checked is checked before any training: the order letters, every
    stage's settings, and each stage against the input model (the pruner can trace it, a given
    student has the right number of classes, ...). With ``copy_model`` the input model is
    left untouched (``context.teacher`` stays the original). ``runner``: what runs a stage
    (:func:`run_stage` by default, e.g. one that records or wraps it).
    """
    plan = plan_order(order, stages)
    if context is None:
        raise ConfigError("context must be given (see ordercomp.stages.Context.create)")
    for stage in plan:
        stage.check_model(model, context)
    current = copy.deepcopy(model) if copy_model else model
    out, zoo_spec = [], context.zoo_spec
    try:
        for _, result, current in run_plan(current, plan, context, runner=runner):
            out.append(result)
    finally:
        context.zoo_spec = zoo_spec
    return current, out
