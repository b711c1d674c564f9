"""What every stage shares: config checks, transform, fine-tuning, exit recalibration, evaluation.

A stage is a small config dataclass. :meth:`Stage.run` does, in this order: ``validate``
(everything that can fail, before any training), ``transform`` (the compression itself, with
any training it needs), fine-tuning at the fine-tuning learning rate (``finetune``), choosing
the early-exit threshold again when the model has exits (their accuracy has changed), and
evaluation. Stages may change the model they are given in place.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any, ClassVar, Dict

from torch import nn

from .. import bitops
from ..losses import DistillObjective
from ..nn import ExitNet

__all__ = ["Stage", "StageInfo", "StageResult"]


@dataclass
class StageInfo:
    """What a stage's ``transform`` returns: the new model and facts worth reporting."""

    model: nn.Module
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """The outcome of one stage: the model, its top-1 accuracy (%) on the validation data, and details.

    For an ExitNet the accuracy is that of dynamic inference at the chosen threshold.

    ``info`` holds the stage's own facts (channels removed, bits, the threshold sweep, ...) and
    the training losses (``train_loss`` / ``finetune_loss``: mean loss per epoch).
    """

    stage: str
    model: nn.Module
    accuracy: float
    seconds: float
    macs: float
    params: int
    bitops: float
    bitops_cr: float
    cr: float
    info: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Everything but the model, as plain values."""
        return {k: v for k, v in asdict(self).items() if k != "model"}


@dataclass
class Stage:
    """Base of the stages; these two settings are keyword-only.

    ``finetune``: fine-tune after the transform at ``lr * finetune_lr_scale`` for the configured
    epochs. ``kd_alpha`` > 0: fine-tuning distils from the original model (``context.teacher``)
    with loss ``(1 - kd_alpha) * CE + kd_alpha * KD``.
    """

    letter: ClassVar[str] = "?"
    finetune: bool = field(default=True, kw_only=True)
    kd_alpha: float = field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validates the settings alone (no model needed)."""
        if not isinstance(self.finetune, bool):
            raise ValueError(f"finetune must be True or False, got {self.finetune!r}")
        a = self.kd_alpha
        if isinstance(a, bool) or not isinstance(a, Real) or math.isnan(a) or not 0 <= a <= 1:
            raise ValueError(f"kd_alpha must be a number in [0, 1], got {a!r}")

    def validate(self, model: nn.Module, context) -> None:
        """Checks that need the model; raises before any training. Subclasses extend it."""
        self.check()

    def transform(self, model: nn.Module, context) -> StageInfo:
        raise NotImplementedError

    def objective(self, context):
        """The fine-tuning objective: task loss, or KD from the original model when ``kd_alpha`` > 0."""
        if not self.kd_alpha:
            return None
        return DistillObjective(context.teacher, alpha=self.kd_alpha, gamma=1.0 - self.kd_alpha)

    def run(self, model: nn.Module, context) -> StageResult:
        """validate -> transform -> fine-tune -> re-choose the exit threshold -> evaluate."""
        start = time.perf_counter()
        self.validate(model, context)
        out = self.transform(model, context)
        model, info = out.model, dict(out.info)
        trainer = context.trainer
        if self.finetune:
            fit = trainer.fit(model, context.train_loader, self.objective(context), finetune=True,
                              desc=f"{self.letter} fine-tune")
            info["finetune_loss"] = fit.epoch_losses
        expected = None
        if isinstance(model, ExitNet):
            from .early_exit import EarlyExit

            config = getattr(model, "exit_config", None) or EarlyExit()
            info["exit"] = config.calibrate(model, context)
            accuracy, expected = info["exit"]["accuracy"], info["exit"]["expected_bitops"]
        else:
            accuracy = trainer.evaluate(model, context.val_loader, desc=f"{self.letter} eval")
        profile = bitops.profile(model, context.example_input)
        ratios = bitops.compression_ratios(context.teacher_profile, profile, expected_bitops=expected)
        return StageResult(
            self.letter, model, accuracy, time.perf_counter() - start, macs=profile.macs, params=profile.params,
            bitops=ratios["compressed_bitops"], bitops_cr=ratios["bitops_cr"], cr=ratios["cr"], info=info,
        )

    def apply(self, model: nn.Module, context) -> nn.Module:
        """Runs the stage (see :meth:`run`) and returns the compressed, fine-tuned model."""
        return self.run(model, context).model
