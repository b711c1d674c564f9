"""The trainer every stage uses: SGD with momentum, a learning-rate schedule, evaluation.

Training minimises an *objective* (see :mod:`ordercomp.losses`): plain cross-entropy by
default, distillation from a teacher when one is given. Fine-tuning after a stage is the same
loop at ``lr * finetune_lr_scale`` for the same number of epochs (the paper's recipe).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Iterable, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import bitops, distributed
from .losses import TaskObjective, exit_outputs, with_indices

__all__ = ["TrainConfig", "Trainer", "FitResult", "Context", "SCHEDULES"]

SCHEDULES = ("cosine", "step", "none")
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _check_number(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value)
    bad = bad or (value <= low if low_open else value < low) or value > high
    if bad:
        bracket = "(" if low_open else "["
        upper = "inf)" if high == math.inf else f"{high}]"
        raise ValueError(f"{name} must be a number in {bracket}{low}, {upper}, got {value!r}")


def _check_count(name: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


@dataclass
class TrainConfig:
    """Trainer settings. ``max_batches`` caps the batches per epoch (None: the whole loader).

    ``schedule``: ``"cosine"`` anneals to 0 over all steps, ``"step"`` divides the learning rate
    by 10 after 50 % and 75 % of the steps, ``"none"`` keeps it. Fine-tuning runs at
    ``lr * finetune_lr_scale`` for the same epochs. ``progress`` shows tqdm bars.
    """

    epochs: int = 1
    max_batches: Optional[int] = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    finetune_lr_scale: float = 0.1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TrainConfig":
        _check_count("epochs", self.epochs, 1)
        _check_count("max_batches", self.max_batches, 1, optional=True)
        _check_number("lr", self.lr, 0.0, low_open=True)
        _check_number("momentum", self.momentum, 0.0, 1.0)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_number("finetune_lr_scale", self.finetune_lr_scale, 0.0, 1.0, low_open=True)
        _check_count("seed", self.seed, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        return self

    def finetuning(self) -> "TrainConfig":
        """The fine-tuning settings: the same, at ``lr * finetune_lr_scale``."""
        return dataclasses.replace(self, lr=self.lr * self.finetune_lr_scale)


@dataclass
class FitResult:
    """Loss and learning rate of every batch, and mean loss of every epoch, of one :meth:`Trainer.fit`."""

    batch_losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def _batches(loader: Iterable, limit: Optional[int]):
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        yield batch


def _num_batches(loader, limit: Optional[int]) -> Optional[int]:
    try:
        n = len(loader)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


class Trainer:
    """SGD + momentum with a schedule over all steps, deterministic for a given seed."""

    def __init__(self, config: Optional[TrainConfig] = None, device: Union[str, torch.device, None] = None):
        self.config = (config or TrainConfig()).validate()
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def _schedule(self, optimizer: torch.optim.Optimizer, total_steps: int):
        kind = self.config.schedule
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
        if kind == "step":
            milestones = sorted({max(1, int(total_steps * f)) for f in (0.5, 0.75)})
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return None

    def fit(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        objective: Optional[Objective] = None,
        *,
        params: Optional[Iterable[nn.Parameter]] = None,
        finetune: bool = False,
        desc: str = "train",
    ) -> FitResult:
        """Trains ``model`` in place on ``objective`` (default: :class:`~ordercomp.losses.TaskObjective`).

        ``params``: what to optimise (default: every parameter of the model and of the objective
        that requires grad). ``finetune``: use the fine-tuning learning rate. Batches are
        ``(x, y)`` or ``(x, y, index)``; an objective with ``needs_index`` gets indices, the loader
        being rebuilt over :class:`~ordercomp.losses.IndexedDataset` when it yields none.
        """
        cfg = self.config.finetuning() if finetune else self.config
        objective = TaskObjective() if objective is None else objective
        if getattr(objective, "needs_index", False):
            train_loader = with_indices(train_loader)
        model.to(self.device)
        if isinstance(objective, nn.Module):
            objective.to(self.device)
        if params is None:
            params = list(model.parameters())
            if isinstance(objective, nn.Module):
                params += list(objective.parameters())
        params = [p for p in dict.fromkeys(params) if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad")
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # Under torchrun: DistributedDataParallel over model + objective, each process on its shard.
        step = distributed.training_step(model, objective)
        train_loader = distributed.shard(train_loader, cfg.seed)
        per_epoch = _num_batches(train_loader, cfg.max_batches)
        scheduler = self._schedule(optimizer, cfg.epochs * (per_epoch or 1))
        result = FitResult()
        torch.manual_seed(cfg.seed)
        model.train()
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            distributed.set_epoch(train_loader, epoch)
            bar = tqdm(
                _batches(train_loader, cfg.max_batches), total=per_epoch, leave=False,
                desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and distributed.is_main()),
            )
            for batch in bar:
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                index = batch[2].to(self.device) if len(batch) > 2 else None
                loss = step(x, y, index)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {float(loss)} at epoch {epoch + 1}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                result.lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                value = float(loss.detach())
                result.batch_losses.append(value)
                total, count = total + value, count + 1
                bar.set_postfix(loss=f"{value:.3f}")
            if count == 0:
                raise ValueError("train_loader yielded no batches")
            result.epoch_losses.append(total / count)
        return result

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, exit: int = -1, desc: str = "eval") -> float:
        """Top-1 accuracy in percent over ``loader``.

        Models returning several outputs (an ExitNet) are scored on output ``exit``: the final
        classifier by default. Dynamic early-exit accuracy is measured by
        :func:`ordercomp.stages.early_exit.sweep`.
        """
        model.to(self.device)
        was_training = model.training
        model.eval()
        correct, seen = 0, 0
        try:
            for batch in tqdm(loader, leave=False, desc=desc, disable=not (self.config.progress and distributed.is_main())):
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                outs = exit_outputs(model, x, detach_heads=False)
                correct += int((outs[exit].argmax(dim=1) == y).sum())
                seen += y.numel()
        finally:
            model.train(was_training)
        if seen == 0:
            raise ValueError("loader yielded no samples to evaluate on")
        return 100.0 * correct / seen


@dataclass
class Context:
    """What every stage works with: data, the original model, where to run, how to train.

    ``teacher`` is the original (uncompressed) model: the accuracy and cost reference, and the
    teacher for optional KD during fine-tuning. Stages change the models they get in place, so
    :meth:`create` keeps a copy of the original here. ``example_input`` is a small batch used for
    tracing, calibration and cost counting. ``num_classes`` and ``example_input`` are inferred
    by :meth:`create`.
    """

    train_loader: DataLoader
    val_loader: DataLoader
    teacher: nn.Module
    example_input: torch.Tensor
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train: TrainConfig = field(default_factory=TrainConfig)

    @functools.cached_property
    def teacher_profile(self) -> bitops.Profile:
        """Costs of the original model on ``example_input`` (the reference of every compression ratio)."""
        return bitops.profile(self.teacher, self.example_input)

    @property
    def progress(self) -> bool:
        return self.train.progress

    @property
    def trainer(self) -> Trainer:
        return Trainer(self.train, self.device)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader,
        train: Optional[TrainConfig] = None,
        device: Union[str, torch.device, None] = None,
        example_batch: int = 2,
    ) -> "Context":
        """Builds a context; ``example_input`` is the first ``example_batch`` inputs of ``val_loader``."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        first = next(iter(val_loader), None)
        if first is None:
            raise ValueError("val_loader yielded no batches")
        example = first[0][:example_batch].to(device)
        model.to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = exit_outputs(model, example)[-1]
        model.train(was_training)
        if out.dim() != 2:
            raise ValueError(f"model must return logits [batch, classes], got shape {tuple(out.shape)}")
        teacher = copy.deepcopy(model).eval()
        return cls(train_loader, val_loader, teacher, example, int(out.shape[1]), device, train or TrainConfig())
