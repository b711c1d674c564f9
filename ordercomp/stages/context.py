"""The context every stage works with: data, the original model, where to run, how to train."""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import bitops, models
from ..data import unpack
from ..errors import DataError, ModelError
from ..nn import Output, check_output
from ..nn.introspect import final_logits
from ..train import OptimizerFactory, TrainConfig, Trainer

__all__ = ["Context"]


@dataclass
class Context:
    """What every stage works with: data, the original model, where to run, how to train.

    ``teacher`` is the original (uncompressed) model: the accuracy and cost reference, and the
    teacher for optional KD during fine-tuning. Stages change the models they get in place, so
    :meth:`create` keeps a copy of the original here. ``example_input`` is a small batch used for
    tracing, calibration and cost counting. ``num_classes`` and ``example_input`` are inferred
    by :meth:`create`. ``zoo_spec`` is the zoo ``(name, kwargs)`` of the architecture being
    compressed (None for any other model); the runner updates it when a stage builds a new
    architecture (D's student). ``optimizer`` and ``ddp`` go to every :class:`~ordercomp.train.Trainer`,
    and so does ``output``: where a plain model's logits are in its output (see
    :func:`ordercomp.nn.select_logits`; every stage, objective and evaluation reads them so).
    ``calibration_loader``: the data every choice is made on (exit thresholds, when a training
    phase stops), never trained on; None makes the choices on ``val_loader`` (see :attr:`calibration`).
    ``reference_correct``: per input of :attr:`calibration`, whether ``teacher`` gets it right
    (what bounds against the original are paired over; None: measured when first needed, see
    :meth:`teacher_correct`).
    ``exit_speedups``: ``(net, thresholds) -> {threshold: measured speed-up}``, when exits are chosen
    by measured latency (the accuracy budget's ``cost="latency"``); None: by expected BitOps.
    """

    train_loader: DataLoader
    val_loader: DataLoader
    teacher: nn.Module
    example_input: torch.Tensor
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train: TrainConfig = field(default_factory=TrainConfig)
    zoo_spec: Optional[Tuple[str, dict]] = None
    optimizer: Optional[OptimizerFactory] = None
    ddp: bool = False
    output: Output = None
    calibration_loader: Optional[DataLoader] = None
    reference_correct: Optional[torch.Tensor] = None
    exit_speedups: Optional[Callable[[nn.Module, Sequence[float]], Dict[float, float]]] = None

    @property
    def calibration(self) -> DataLoader:
        """The loader choices are made on: ``calibration_loader``, else ``val_loader``."""
        return self.calibration_loader if self.calibration_loader is not None else self.val_loader

    @property
    def spec(self) -> Optional[Tuple[str, dict]]:
        """Deprecated name of :attr:`zoo_spec`."""
        warnings.warn("Context.spec is now Context.zoo_spec", DeprecationWarning, stacklevel=2)
        return self.zoo_spec

    @spec.setter
    def spec(self, value: Optional[Tuple[str, dict]]) -> None:
        warnings.warn("Context.spec is now Context.zoo_spec", DeprecationWarning, stacklevel=2)
        self.zoo_spec = value

    def teacher_correct(self) -> torch.Tensor:
        """Per input of :attr:`calibration`, in its order: whether the original (``teacher``) gets
        it right; ``reference_correct``, measured and kept there when not given."""
        if self.reference_correct is None:
            self.reference_correct = self.trainer.correct(self.teacher, self.calibration, desc="original")[-1]
        return self.reference_correct

    @functools.cached_property
    def teacher_profile(self) -> bitops.Profile:
        """Costs of the original model on ``example_input`` (the reference of every compression ratio)."""
        return bitops.profile(self.teacher, self.example_input)

    @property
    def progress(self) -> bool:
        return self.train.progress

    @property
    def trainer(self) -> Trainer:
        return Trainer(self.train, self.device, optimizer=self.optimizer, ddp=self.ddp, output=self.output,
                       num_classes=self.num_classes)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader,
        train: Optional[TrainConfig] = None,
        device: Union[str, torch.device, None] = None,
        example_batch: int = 2,
        *,
        optimizer: Optional[OptimizerFactory] = None,
        ddp: bool = False,
        output: Output = None,
        calibration_loader: Optional[DataLoader] = None,
    ) -> "Context":
        """Builds a context; ``example_input`` is the first ``example_batch`` inputs of ``val_loader``.

        The model is run on it once (in eval mode) to find the number of classes: its logits
        (taken from its output as ``output`` says) must be ``[batch, classes]``.
        """
        check_output(output)
        device = torch.device(device) if device is not None else torch.device("cpu")
        first = next(iter(val_loader), None)
        if first is None:
            raise DataError("val_loader yielded no batches")
        example = unpack(first, "val_loader")[0][:example_batch].to(device)
        out = final_logits(model.to(device), example, output)
        if out.dim() != 2:
            raise ModelError(f"model must return logits [batch, classes], got shape {tuple(out.shape)}")
        teacher = copy.deepcopy(model).eval()
        return cls(train_loader, val_loader, teacher, example, int(out.shape[1]), device, train or TrainConfig(),
                   zoo_spec=models.identify(model), optimizer=optimizer, ddp=ddp, output=output,
                   calibration_loader=calibration_loader)
