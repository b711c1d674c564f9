"""The trainer every stage uses: an optimizer (SGD with momentum by default), a learning-rate
schedule, evaluation.

Training minimises an *objective* (see :mod:`ordercomp.losses`): plain cross-entropy by
default, distillation from a teacher when one is given. Fine-tuning after a stage is the same
loop at ``lr * finetune_lr_scale`` (0.3; the paper uses 0.1) for at most the same number of
epochs. Given a ``monitor`` (the accuracy on calibration data, in a
compression run), a fit that has not improved for ``patience`` epochs goes back to its best
epoch's weights at a tenth of the learning rate, and stops the next time; it keeps its best
epoch's weights. A fit draws its randomness from its own seed and leaves the caller's random
state as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from . import checks
from .data import check_finite, check_labels, unpack, with_indices
from .errors import ConfigError, DataError, ModelError, TrainingError
from .losses import TaskObjective
from .nn import Output, QuantLayer, check_output, exit_outputs

__all__ = ["TrainConfig", "Trainer", "FitResult", "SCHEDULES", "sgd", "planned_epochs"]

SCHEDULES = ("cosine", "step", "none")
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
Monitor = Callable[[nn.Module], Union[float, Tuple[float, float]]]
OptimizerFactory = Callable[[List[nn.Parameter], "TrainConfig"], torch.optim.Optimizer]


@dataclass
class TrainConfig:
    """Trainer settings. ``epochs``: the most epochs of a fit; ``max_batches`` caps the batches per
    epoch (None: the whole loader). ``min_steps``: the least optimizer steps a fit may plan for
    (0: epochs as given; a compression run's default is 400, see
    :class:`~ordercomp.pipeline.CompressConfig`): on small data an epoch is a few steps (2 500
    images at batch 128: 20), so a fit of ``epochs`` epochs is stretched to
    ``ceil(min_steps / batches per epoch)`` epochs (its schedule over all of them; the calibration
    signal may still end it early). Not applied when ``max_batches`` caps the epochs (a smoke
    run) or the loader has no length.

    ``schedule``: ``"cosine"`` anneals to 0 over all steps, ``"step"`` divides the learning rate
    by 10 after 50 % and 75 % of the steps, ``"none"`` keeps it. Fine-tuning runs at
    ``lr * finetune_lr_scale`` for the same epochs. ``patience``: after this many epochs without
    a better monitored accuracy, a fit with a monitor returns to its best epoch's weights at a
    tenth of the learning rate, and the next time it stops, keeping its best epoch's weights (0:
    every epoch runs). ``tolerance``: an epoch whose monitored accuracy is within this many of its
    standard errors of the best counts as no worse (1; 0: only a strictly better one resets the
    patience). ``progress`` shows tqdm bars.
    """

    epochs: int = 1
    max_batches: Optional[int] = None
    min_steps: int = 0
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    finetune_lr_scale: float = 0.3
    seed: int = 0
    patience: int = 2
    tolerance: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        self.check()

    def validate(self) -> "TrainConfig":
        """Deprecated name of :meth:`check`."""
        warnings.warn("TrainConfig.validate() is now TrainConfig.check()", DeprecationWarning, stacklevel=2)
        return self.check()

    def check(self) -> "TrainConfig":
        """Checks the settings; raises a ConfigError naming the bad one; returns the config."""
        checks.integer("epochs", self.epochs, 1)
        checks.integer("max_batches", self.max_batches, 1, optional=True)
        checks.integer("min_steps", self.min_steps, 0)
        checks.number("lr", self.lr, low=0, low_open=True)
        checks.number("momentum", self.momentum, low=0, high=1)
        checks.number("weight_decay", self.weight_decay, low=0)
        checks.number("finetune_lr_scale", self.finetune_lr_scale, low=0, high=1, low_open=True)
        checks.integer("seed", self.seed, 0)
        checks.integer("patience", self.patience, 0)
        checks.number("tolerance", self.tolerance, low=0)
        checks.one_of("schedule", self.schedule, SCHEDULES)
        return self

    def finetuning(self) -> "TrainConfig":
        """The fine-tuning settings: the same, at ``lr * finetune_lr_scale``."""
        return dataclasses.replace(self, lr=self.lr * self.finetune_lr_scale)


@dataclass
class FitResult:
    """Loss and learning rate of every batch, mean loss of every epoch and, with a monitor, the
    monitored accuracy after every epoch, the epoch whose weights were kept and the epoch after
    which the learning rate was cut (1-based), of one :meth:`Trainer.fit`."""

    batch_losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    monitored: List[float] = field(default_factory=list)
    best_epoch: Optional[int] = None
    lr_dropped_after: Optional[int] = None

    @property
    def epochs(self) -> int:
        """Epochs that ran."""
        return len(self.epoch_losses)

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


def planned_epochs(config: "TrainConfig", per_epoch: Optional[int]) -> int:
    """The epochs a fit plans for: ``config.epochs``, stretched to at least ``config.min_steps``
    steps of ``per_epoch`` batches (not under ``max_batches``, nor for a loader of unknown length)."""
    if not config.min_steps or config.max_batches is not None or not per_epoch:
        return config.epochs
    return max(config.epochs, math.ceil(config.min_steps / per_epoch))


def _diagnose(loss: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, where: str,
              first: bool) -> None:
    """Raises the error a non-finite loss points at: non-finite inputs (the data), non-finite
    weights at the ``first`` step (the model), else divergence (the learning rate)."""
    check_finite(x, f"{where}, train_loader")
    value = float(loss.detach())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bad = sum(1 for p in params if p.is_floating_point() and not bool(torch.isfinite(p).all()))
    if bad and first:
        raise ModelError(f"{where}: {bad} parameter tensor(s) hold NaN or infinite values, so the loss is "
                         f"{value}; check the model's weights")
    raise TrainingError(f"{where}: loss became {value}; lower lr")


def sgd(params: List[nn.Parameter], config: "TrainConfig") -> torch.optim.Optimizer:
    """The default optimizer: SGD with the config's learning rate, momentum and weight decay."""
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


@contextlib.contextmanager
def _own_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the block on a random state seeded with ``seed``; the caller's state is restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Turns off the gradients of ``modules``' parameters for the block (``_fit`` also keeps the
    modules in eval mode, so their batch-norm statistics stay)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _monitored(value) -> Tuple[float, float]:
    """``(value, standard error)`` of what a monitor returned: a number (error 0), or a pair of the value
    and its standard error."""
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), 0.0


def _scale_lr(optimizer: torch.optim.Optimizer, scheduler, factor: float) -> None:
    """Multiplies the learning rate, and the rest of its schedule, by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
    if scheduler is not None:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


class Trainer:
    """An optimizer with a schedule over all steps, deterministic for a given seed.

    ``optimizer(params, config) -> torch.optim.Optimizer`` builds each fit's optimizer (default
    :func:`sgd`; the config passed is the fine-tuning one when fine-tuning). ``ddp``: wrap model
    and objective in DistributedDataParallel and shard the training data; only when asked, and
    only inside an initialised process group (the command line asks under torchrun). ``output``:
    where a plain model's logits are in its output (see :func:`ordercomp.nn.select_logits`), for
    the default objective and for evaluation. ``num_classes``: the model's class count; every
    batch's labels are then checked to be in ``[0, num_classes)`` as it comes, before it is
    trained or scored on (otherwise only to be integers >= 0).
    """

    def __init__(self, config: Optional[TrainConfig] = None, device: Union[str, torch.device, None] = None,
                 *, optimizer: Optional[OptimizerFactory] = None, ddp: bool = False, output: Output = None,
                 num_classes: Optional[int] = None):
        self.config = (config or TrainConfig()).check()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if optimizer is not None and not callable(optimizer):
            raise ConfigError(f"optimizer must be a callable (params, config) -> Optimizer, got {optimizer!r}")
        if not isinstance(ddp, bool):
            raise ConfigError(f"ddp must be True or False, got {ddp!r}")
        self.optimizer = optimizer or sgd
        self.ddp = ddp
        self.output = check_output(output)
        self.num_classes = checks.integer("num_classes", num_classes, 1, optional=True)

    def _batch(self, batch, where: str):
        """``(x, y, index or None)`` of a batch on the device, its labels checked."""
        x, y, index = unpack(batch, where)
        check_labels(y, self.num_classes, where)
        return x.to(self.device), y.to(self.device), index.to(self.device) if index is not None else None

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
        lr_scale: Optional[float] = None,
        epochs: Optional[int] = None,
        frozen: Sequence[nn.Module] = (),
        desc: str = "train",
        monitor: Optional[Monitor] = None,
    ) -> FitResult:
        """Trains ``model`` in place on ``objective`` (default: :class:`~ordercomp.losses.TaskObjective`).

        ``params``: what to optimise (default: every parameter of the model and of the objective
        that requires grad). ``finetune``: use the fine-tuning learning rate; ``lr_scale``: use
        ``lr * lr_scale`` instead. ``epochs``: instead of the config's. ``frozen``: modules that
        keep their weights and batch-norm statistics (no gradients, eval mode) during this fit.
        ``monitor(model) -> accuracy`` or ``(accuracy, standard error)``: called after every
        epoch; after ``patience`` epochs without improvement the fit goes back to the best
        weights at a tenth of the rate, the next time it stops; the best epoch's weights are
        kept. With a standard error, an epoch within it of the best counts as no worse (its
        later, longer-trained weights are kept and patience starts again): on a few hundred
        calibration inputs accuracy moves by several points from epoch to epoch by chance alone,
        and a fit that stopped on such a dip would stop before it had learned.
        Batches are ``(x, y)`` or ``(x, y, index)``; an objective with ``needs_index`` gets
        indices, the loader being rebuilt over :class:`~ordercomp.data.IndexedDataset` when it
        yields none.
        """
        cfg = self.config.finetuning() if finetune else self.config
        if lr_scale is not None:
            checks.number("lr_scale", lr_scale, low=0, low_open=True)
            cfg = dataclasses.replace(self.config, lr=self.config.lr * lr_scale)
        if epochs is not None:
            checks.integer("epochs", epochs, 1)
            cfg = dataclasses.replace(cfg, epochs=epochs)
        frozen = list(frozen)
        with _own_rng(cfg.seed, self.device), _frozen(frozen):
            return self._fit(model, train_loader, objective, params, cfg, frozen, desc, monitor)

    def _fit(self, model, train_loader, objective, params, cfg: TrainConfig, frozen: List[nn.Module],
             desc: str, monitor: Optional[Monitor]) -> FitResult:
        objective = TaskObjective(output=self.output) if objective is None else objective
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
            raise ConfigError("nothing to train: no parameter requires grad")
        optimizer = self.optimizer(params, cfg)
        # Asked for under torchrun: DistributedDataParallel over model + objective, each process on its shard.
        if self.ddp:
            train_loader = distributed.shard(train_loader, cfg.seed)
        step = distributed.training_step(model, objective, self.ddp)
        per_epoch = _num_batches(train_loader, cfg.max_batches)
        cfg = dataclasses.replace(cfg, epochs=planned_epochs(cfg, per_epoch))
        scheduler = self._schedule(optimizer, cfg.epochs * (per_epoch or 1))
        result, best, since_best = FitResult(), None, 0
        for epoch in range(cfg.epochs):
            model.train()
            for m in frozen:
                m.eval()
            distributed.set_epoch(train_loader, epoch)
            bar = tqdm(
                _batches(train_loader, cfg.max_batches), total=per_epoch, leave=False,
                desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and distributed.is_main()),
            )
            result.epoch_losses.append(self._epoch(bar, step, optimizer, scheduler, result, desc, epoch, model))
            if monitor is None:
                continue
            value, error = _monitored(monitor(model))
            noise = cfg.tolerance * error
            result.monitored.append(value)
            if best is None or value >= best[0] - noise:
                # as good as the best, within the signal's noise: the later, longer-trained weights are kept
                since_best = 0 if best is None or value > best[0] - noise else since_best + 1
                best = (max(value, best[0]) if best is not None else value, copy.deepcopy(model.state_dict()))
                result.best_epoch = epoch + 1
            else:
                since_best += 1
            if cfg.patience and since_best >= cfg.patience:
                if result.lr_dropped_after is not None:
                    break
                # no longer improving at this rate: back to the best weights, at a tenth of the rate
                result.lr_dropped_after, since_best = epoch + 1, 0
                model.load_state_dict(best[1])
                _scale_lr(optimizer, scheduler, 0.1)
        if best is not None and result.best_epoch != result.epochs:
            model.load_state_dict(best[1])
        return result

    def _epoch(self, batches, step, optimizer, scheduler, result: FitResult, desc: str, epoch: int,
               model: nn.Module) -> float:
        """One pass over ``batches``; the mean loss."""
        total, count = 0.0, 0
        for batch in batches:
            x, y, index = self._batch(batch, "train_loader")
            try:
                loss = step(x, y, index)
            except TrainingError as e:  # a learned clip diverged: say where, and in which layers
                layers = [n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.learn_alpha
                          and not bool(torch.isfinite(m.alpha.detach()).all())]
                raise TrainingError(f"{desc}: at epoch {epoch + 1}, batch {count + 1}"
                                    + (f", layer(s) {layers}" if layers else "") + f": {e}") from None
            if not torch.isfinite(loss):
                _diagnose(loss, x, optimizer, f"{desc}: at epoch {epoch + 1}, batch {count + 1}", not result.batch_losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            result.lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            value = float(loss.detach())
            result.batch_losses.append(value)
            total, count = total + value, count + 1
            batches.set_postfix(loss=f"{value:.3f}")
        if count == 0:
            raise DataError("train_loader yielded no batches")
        return total / count

    def evaluate(self, model: nn.Module, loader: DataLoader, exit: int = -1, desc: str = "eval") -> float:
        """Top-1 accuracy in percent over ``loader``.

        Models returning several outputs (an ExitNet) are scored on output ``exit``: the final
        classifier by default. Dynamic early-exit accuracy is measured by
        :func:`ordercomp.stages.early_exit.sweep`.
        """
        return 100.0 * float(self.correct(model, loader, desc)[exit].double().mean())

    def head_accuracy(self, model: nn.Module, loader: DataLoader, desc: str = "eval") -> float:
        """Mean top-1 accuracy (%) of an ExitNet's exit heads (of the final output for another model)."""
        outs = self.correct(model, loader, desc)
        heads = outs[:-1] or outs
        return 100.0 * sum(float(c.double().mean()) for c in heads) / len(heads)

    @torch.no_grad()
    def correct(self, model: nn.Module, loader: DataLoader, desc: str = "eval") -> List[torch.Tensor]:
        """Per input of ``loader``, in its order: whether each output (one per exit of an ExitNet,
        the final one last) predicts the label; one bool tensor per output, on the CPU."""
        model.to(self.device)
        was_training = model.training
        model.eval()
        hits: List[List[torch.Tensor]] = []
        try:
            for batch in tqdm(loader, leave=False, desc=desc, disable=not (self.config.progress and distributed.is_main())):
                x, y, _ = self._batch(batch, "the evaluation loader")
                outs = exit_outputs(model, x, detach_heads=False, output=self.output)
                hits.append([(o.argmax(dim=1) == y).cpu() for o in outs])
        finally:
            model.train(was_training)
        if not hits or sum(h[0].numel() for h in hits) == 0:
            raise DataError("loader yielded no samples to evaluate on")
        return [torch.cat(per_output) for per_output in zip(*hits)]

    @torch.no_grad()
    def recalibrate_bn(self, model: nn.Module, loader: DataLoader, batches: int = 50) -> int:
        """Re-estimates the running statistics of every batch-norm layer that runs, as the plain
        average over up to ``batches`` batches of ``loader`` (at most ``max_batches``), the rest
        of the model in eval mode; returns the batches used. Layers that do not run keep theirs."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return 0
        limit = min(batches, self.config.max_batches or batches)
        modes = {m: m.training for m in model.modules()}
        momenta = {m: m.momentum for m in norms}

        def first_use(module, args):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
            module.train()
            handles.pop(module).remove()

        handles = {m: m.register_forward_pre_hook(first_use) for m in norms}
        model.to(self.device).eval()
        used = 0
        try:
            for batch in _batches(loader, limit):
                model(unpack(batch, "the training loader")[0].to(self.device))
                used += 1
        finally:
            for h in handles.values():
                h.remove()
            for m, momentum in momenta.items():
                m.momentum = momentum
            for m, mode in modes.items():
                m.training = mode
        return used
