"""A stage session: one stage on one model, step by step, for :func:`ordercomp.pipeline.run_stage` or
a training loop of your own.

``session = stage.begin(model, context)`` validates and prepares (the model gets its fresh
batch-norm statistics when the stage asks for them); ``session.phases`` say what to train, each
a context manager that sets up its phase (``Phase.setup``: e.g. lowering bits; frozen modules
kept as they are; the random state seeded from ``context.train.seed``, as a fit is) and tears it
down after (frozen modules thawed, the objective's hooks removed, the caller's random state
back); ``session.end()`` re-estimates batch norm, finalizes, chooses the exit threshold on the
calibration data and measures: a :class:`~ordercomp.stages.StageResult`. Driven by any loop that
does what :meth:`ordercomp.train.Trainer.fit` does with the same settings (see the README's
own-loop recipe), it gives the model ``compress`` gives, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import bitops
from ..data import reseed
from ..errors import ConfigError
from ..losses import TaskObjective
from ..nn import ExitNet
from ..train import _frozen, _num_batches, _own_rng, planned_epochs
from .base import Phase, Stage, StageResult
from .context import Context
from .early_exit import EarlyExit, SweepPoint, choose_threshold, sweep

__all__ = ["StageSession", "SessionPhase", "seed_everything", "exit_correct", "zoo_spec_of"]


def seed_everything(seed: int, context: Optional[Context] = None) -> None:
    """Seeds Python's, NumPy's and torch's global random states and restarts the random streams of
    ``context``'s loaders (shuffling, augmentation: :func:`ordercomp.data.reseed`), so what follows
    depends on ``seed`` alone; ``compress`` does this before each stage with ``train.seed + step``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if context is not None:
        for loader in (context.train_loader, context.val_loader, context.calibration_loader):
            if loader is not None:
                reseed(loader, seed)


class SessionPhase:
    """One training phase of a session (see the module text). Inside ``with phase:`` train
    :meth:`parameters` on :meth:`loss` with the model in :meth:`train` mode, at :attr:`lr`
    (the phase's rate under ``context.train``), then say how many epochs ran with :meth:`done`."""

    def __init__(self, session: "StageSession", phase: Phase):
        self.session, self.phase = session, phase
        self.objective = phase.objective if phase.objective is not None else TaskObjective(
            output=session.context.output)
        self._held: Optional[contextlib.ExitStack] = None

    @property
    def name(self) -> str:
        return self.phase.name

    @property
    def model(self) -> nn.Module:
        return self.session.model

    @property
    def lr(self) -> float:
        """The phase's learning rate: ``lr * lr_scale``, or the fine-tuning rate when it has no scale."""
        config = self.session.context.train
        return config.lr * (self.phase.lr_scale if self.phase.lr_scale is not None else config.finetune_lr_scale)

    @property
    def epochs(self) -> int:
        """The epochs the phase plans for: its own or ``context.train.epochs``, stretched to
        ``train.min_steps`` steps over ``context.train_loader`` as a fit is
        (:func:`ordercomp.train.planned_epochs`)."""
        context = self.session.context
        config = context.train if self.phase.epochs is None else dataclasses.replace(context.train,
                                                                                     epochs=self.phase.epochs)
        return planned_epochs(config, _num_batches(context.train_loader, config.max_batches))

    def __enter__(self) -> "SessionPhase":
        if self.phase.setup is not None:
            self.phase.setup(self.model)
        context = self.session.context
        self._held = contextlib.ExitStack()  # the trainer's own pieces: a fit does the same
        self._held.enter_context(_own_rng(context.train.seed, context.device))
        self._held.enter_context(_frozen(list(self.phase.frozen)))
        if isinstance(self.objective, nn.Module):
            self.objective.to(context.device)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._held.__exit__(*exc)
        finally:
            close = getattr(self.objective, "close", None)
            if callable(close):
                close()

    def parameters(self) -> List[nn.Parameter]:
        """What the phase trains: its ``params``, else every parameter of the model and of the
        objective (e.g. CRD projections), less the frozen ones; call it inside ``with phase:``."""
        params = self.phase.params
        if params is None:
            params = list(self.model.parameters())
            if isinstance(self.objective, nn.Module):
                params += list(self.objective.parameters())
        params = [p for p in dict.fromkeys(params) if p.requires_grad]
        if not params:
            raise ConfigError(f"phase {self.name!r}: nothing to train, no parameter requires grad")
        return params

    def train(self) -> None:
        """Training mode for the model, its frozen modules kept in eval mode (their batch-norm statistics stay)."""
        self.model.train()
        for m in self.phase.frozen:
            m.eval()

    def loss(self, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The phase's loss on a batch (``index``: the samples' dataset indices, for objectives that need them)."""
        if getattr(self.objective, "needs_index", False) and index is None:
            raise ConfigError(f"phase {self.name!r}: its objective needs each sample's index: give loss(x, y, index) "
                              f"batches of (x, y, index), e.g. from ordercomp.data.with_indices(loader)")
        return self.objective(self.model, x, y, index)

    def done(self, epochs: int, losses: Optional[List[float]] = None,
             calibration: Optional[List[float]] = None) -> None:
        """Records what the phase ran (the report's ``<name>_epochs``, ``<name>_loss``, ``<name>_calibration``)."""
        info = self.session.info
        info[f"{self.name}_loss"] = list(losses or [])
        info[f"{self.name}_epochs"] = int(epochs)
        if calibration:
            info[f"{self.name}_calibration"] = list(calibration)


class StageSession:
    """``stage`` on ``model`` (see the module text). ``exit_settings``: the settings the exit
    threshold is chosen with at the end (default the stage's own when it is an
    :class:`EarlyExit`, else the defaults); ``lineage``: updated when the stage builds a new
    architecture (D's student), and so is ``context.zoo_spec``."""

    def __init__(self, stage: Stage, model: nn.Module, context: Context, *,
                 exit_settings: Optional[EarlyExit] = None, lineage=None):
        self.started = time.perf_counter()
        stage.check_model(model, context)
        self.stage, self.context, self.given = stage, context, model
        self.exit_settings, self.lineage = exit_settings, lineage
        prepared = stage.prepare(model, context)
        self.model, self.info = prepared.model, dict(prepared.info)
        self.architecture = prepared.architecture
        phases = prepared.phases if prepared.phases is not None else [Phase("finetune")]
        self.phases = [SessionPhase(self, p) for p in phases]
        if stage.recalibrate_bn:
            context.trainer.recalibrate_bn(self.model, context.train_loader)

    def end(self) -> StageResult:
        """Batch norm re-estimated (when the stage asks for it and it trained), finalize, the exit
        threshold chosen on the calibration data, the model measured on the validation data and
        its costs counted. An E whose exits do not pay off gives back the model it got, without heads."""
        stage, context, info = self.stage, self.context, self.info
        if stage.recalibrate_bn and self.phases:
            context.trainer.recalibrate_bn(self.model, context.train_loader)
        info.update(stage.finalize(self.model, context) or {})
        if self.architecture is not None:
            context.zoo_spec = zoo_spec_of(self.architecture)
            if self.lineage is not None:
                self.lineage.base = dict(self.architecture)
        model, expected, correct, calibration_correct = self._evaluate()
        profile = bitops.profile(model, context.example_input)
        ratios = bitops.compression_ratios(context.teacher_profile, profile, expected_bitops=expected)
        return StageResult(
            stage.letter, model, 100.0 * float(correct.double().mean()), time.perf_counter() - self.started,
            macs=profile.macs, params=profile.params, bitops=ratios["compressed_bitops"],
            bitops_cr=ratios["bitops_cr"], cr=ratios["cr"], info=info, profile=profile, correct=correct,
            calibration_correct=calibration_correct,
        )

    def _evaluate(self):
        """``(model, expected BitOps or None, per-input correctness on the validation data, the same
        on the calibration data)``; a run whose validation data is the calibration data (a budget
        probe) evaluates it once."""
        stage, context, info, model = self.stage, self.context, self.info, self.model
        same = context.val_loader is context.calibration
        if isinstance(model, ExitNet):
            settings = self.exit_settings or (stage if isinstance(stage, EarlyExit) else None)
            info["exit"] = choose_threshold(model, context, settings)
            if isinstance(stage, EarlyExit) and not isinstance(self.given, ExitNet) and not info["exit"]["pays_off"]:
                info["heads_dropped"] = True  # no exit pays off: the heads would only cost storage
                model = self.given
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


def exit_correct(model: ExitNet, context: Context, loader) -> SweepPoint:
    """Dynamic inference of ``model`` at its threshold over ``loader``, with per-input correctness."""
    return sweep(model, loader, [model.threshold], context.example_input, model.criterion, context.device,
                 per_input=True)[0]


def zoo_spec_of(architecture: Dict[str, Any]) -> Optional[Tuple[str, dict]]:
    """The zoo ``(name, kwargs)`` of an architecture description, or None for any other model."""
    if "zoo" not in architecture:
        return None
    return architecture["zoo"], dict(architecture.get("kwargs") or {})
