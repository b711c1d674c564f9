"""The one runner of stages: validate -> prepare -> fit each phase -> finalize -> choose exits -> measure.

Every training of a compression run happens here (``Trainer.fit`` is called by
:func:`fit_phase` only); stages just say what to train. Each phase ends on the calibration
signal (``context.calibration``). After any stage that leaves a model with exits the
threshold is chosen again on the calibration data (:func:`ordercomp.stages.choose_threshold`),
since their accuracy has changed; every accuracy a stage reports is measured on the validation data.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import bitops, results
from ..errors import ConfigError
from ..nn import ExitNet
from ..stages import Context, EarlyExit, Phase, Stage, StageResult, SweepPoint, choose_threshold, plan_order, sweep
from ..train import FitResult, Monitor, Trainer

__all__ = ["fit_phase", "phase_monitor", "run_stage", "run_plan", "run_order", "Lineage", "spec_of",
           "exit_correct", "stage_calibration_accuracy"]


def spec_of(architecture: Dict[str, Any]) -> Optional[Tuple[str, dict]]:
    """The zoo ``(name, kwargs)`` of an architecture description, or None for any other model."""
    if "zoo" not in architecture:
        return None
    return architecture["zoo"], dict(architecture.get("kwargs") or {})


def fit_phase(trainer: Trainer, model: nn.Module, loader, phase: Phase, desc: str,
              monitor: Optional[Monitor] = None) -> FitResult:
    """Trains ``model`` through one phase (after its ``setup``); the phase's objective is closed
    afterwards (hooks removed). ``monitor``: the calibration signal that ends it early."""
    if phase.setup is not None:
        phase.setup(model)
    try:
        return trainer.fit(model, loader, phase.objective, params=phase.params, lr_scale=phase.lr_scale,
                           finetune=phase.lr_scale is None, epochs=phase.epochs, frozen=phase.frozen, desc=desc,
                           monitor=monitor)
    finally:
        close = getattr(phase.objective, "close", None)
        if callable(close):
            close()


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
    def of(cls, model: nn.Module, spec=None) -> "Lineage":
        arch = results.architecture(model, spec)
        return cls(arch, dict(arch))


def run_stage(stage: Stage, model: nn.Module, context: Context, *, exit_settings: Optional[EarlyExit] = None,
              lineage: Optional[Lineage] = None) -> StageResult:
    """Runs one stage on ``model``: validate, prepare, fit every phase (each ends on the calibration
    signal), finalize, re-choose the exit threshold on the calibration data (``exit_settings``:
    the sweep's settings, default the stage's own when it is an :class:`EarlyExit`, else the
    defaults), evaluate on the validation data and count costs. An E whose exits do not pay
    off gives back the model it got, without heads. ``lineage`` is updated when the stage
    builds a new architecture, and so is ``context.spec``."""
    start = time.perf_counter()
    stage.validate(model, context)
    given = model
    prepared = stage.prepare(model, context)
    model, info = prepared.model, dict(prepared.info)
    phases = prepared.phases if prepared.phases is not None else [Phase("finetune")]
    trainer = context.trainer
    if stage.recalibrate_bn:
        trainer.recalibrate_bn(model, context.train_loader)
    for phase in phases:
        fit = fit_phase(trainer, model, context.train_loader, phase, f"{stage.letter} {phase.name}",
                        phase_monitor(trainer, context, phase))
        info[f"{phase.name}_loss"] = fit.epoch_losses
        info[f"{phase.name}_epochs"] = fit.epochs
        if fit.monitored:
            info[f"{phase.name}_calibration"] = fit.monitored
    if stage.recalibrate_bn and phases:
        trainer.recalibrate_bn(model, context.train_loader)
    info.update(stage.finalize(model, context) or {})
    if prepared.architecture is not None:
        context.spec = spec_of(prepared.architecture)
        if lineage is not None:
            lineage.base = dict(prepared.architecture)
    model, expected, correct, calibration_correct = _measure(stage, given, model, context, info, exit_settings)
    profile = bitops.profile(model, context.example_input)
    ratios = bitops.compression_ratios(context.teacher_profile, profile, expected_bitops=expected)
    return StageResult(
        stage.letter, model, 100.0 * float(correct.double().mean()), time.perf_counter() - start,
        macs=profile.macs, params=profile.params, bitops=ratios["compressed_bitops"], bitops_cr=ratios["bitops_cr"],
        cr=ratios["cr"], info=info, profile=profile, correct=correct, calibration_correct=calibration_correct,
    )


def exit_correct(model: ExitNet, context: Context, loader) -> SweepPoint:
    """Dynamic inference of ``model`` at its threshold over ``loader``, with per-input correctness."""
    return sweep(model, loader, [model.threshold], context.example_input, model.criterion, context.device,
                 per_input=True)[0]


def stage_calibration_accuracy(result: StageResult) -> float:
    """The calibration accuracy (%) of a stage's model (at its exit threshold when it has exits)."""
    if result.info.get("calibration_accuracy") is not None:
        return float(result.info["calibration_accuracy"])
    return float(result.info["exit"]["accuracy"])


def _measure(stage: Stage, given: nn.Module, model: nn.Module, context: Context, info: Dict[str, Any],
             exit_settings: Optional[EarlyExit]):
    """``(model, expected BitOps or None, per-input correctness on the validation data, the same on
    the calibration data)``; for a model with exits the threshold is chosen first (on calibration
    data), and an E whose exits do not pay off is undone. A run whose validation data is the
    calibration data (a probe) evaluates it once."""
    same = context.val_loader is context.calibration
    if isinstance(model, ExitNet):
        settings = exit_settings or (stage if isinstance(stage, EarlyExit) else None)
        info["exit"] = choose_threshold(model, context, settings)
        if isinstance(stage, EarlyExit) and not isinstance(given, ExitNet) and not info["exit"]["pays_off"]:
            info["heads_dropped"] = True  # no exit pays off: the heads would only cost storage
            model = given
        else:
            calibration = exit_correct(model, context, context.calibration)
            val = calibration if same else exit_correct(model, context, context.val_loader)
            info["exit"]["validation"] = val.to_dict()
            return model, val.expected_bitops, val.correct, calibration.correct
    calibration = context.trainer.correct(model, context.calibration, desc="calibration")[-1]
    info["calibration_accuracy"] = 100.0 * float(calibration.double().mean())
    correct = calibration if same else context.trainer.correct(model, context.val_loader,
                                                               desc=f"{stage.letter} eval")[-1]
    return model, None, correct, calibration


def exit_settings_at(plan: Sequence[Stage], step: int) -> Optional[EarlyExit]:
    """The settings the exit threshold is chosen with after ``plan[step]``: the latest E up to
    it, else the first E of the plan, else None (the defaults)."""
    earlier = [s for s in plan[: step + 1] if isinstance(s, EarlyExit)]
    if earlier:
        return earlier[-1]
    return next((s for s in plan if isinstance(s, EarlyExit)), None)


def run_plan(model: nn.Module, plan: Sequence[Stage], context: Context, start: int = 0,
             before: Optional[Callable[[int], None]] = None,
             lineage: Optional[Lineage] = None) -> Iterator[Tuple[int, StageResult, nn.Module]]:
    """Runs ``plan[start:]`` on ``model`` one stage after the other, yielding ``(step, result, model)``
    after each; ``before(step)`` is called before each stage (e.g. to seed it)."""
    current = model
    for step in range(start, len(plan)):
        if before is not None:
            before(step)
        result = run_stage(plan[step], current, context, exit_settings=exit_settings_at(plan, step),
                           lineage=lineage)
        current = result.model
        yield step, result, current


def run_order(
    model: nn.Module,
    order: str,
    stages=None,
    context: Optional[Context] = None,
    copy_model: bool = True,
) -> Tuple[nn.Module, List[StageResult]]:
    """Runs the stages of ``order`` one after the other, each followed by its training phases;
    returns the compressed model and one :class:`StageResult` per stage.

    Everything that can be checked is checked before any training: the order letters, every
    stage's settings, and each stage against the input model (the pruner can trace it, a given
    student has the right number of classes, ...). With ``copy_model`` the input model is
    left untouched (``context.teacher`` stays the original).
    """
    plan = plan_order(order, stages)
    if context is None:
        raise ConfigError("context must be given (see ordercomp.stages.Context.create)")
    for stage in plan:
        stage.validate(model, context)
    current = copy.deepcopy(model) if copy_model else model
    out, spec = [], context.spec
    try:
        for _, result, current in run_plan(current, plan, context):
            out.append(result)
    finally:
        context.spec = spec
    return current, out
