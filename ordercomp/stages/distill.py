"""D: knowledge distillation from the model the stage receives into a smaller student."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import bitops, models
from ..losses import CRDLoss, DistillObjective, check_distill_weights, exit_outputs, final_classifier
from ..nn import ExitNet, QuantLayer, attach_exits, quantize_model
from .base import Stage, StageInfo
from .prune import check_prunable, prune_channels

__all__ = ["Distill", "derive_student", "thinner_copy", "zoo_spec"]


def zoo_spec(model: nn.Module) -> Optional[Tuple[str, dict]]:
    """``(name, kwargs)`` of the zoo model ``model`` is (for ``models.create``), or None.

    Read from the ``zoo_spec`` attribute when the model carries one (compressed models and
    ExitNets keep the spec of the network they came from); otherwise a model is recognised as
    zoo model ``name`` when it has the same class and exactly the same parameter names and
    shapes as ``models.create(name)`` (built on the meta device, so this costs no memory).
    """
    spec = getattr(model, "zoo_spec", None)
    if spec is not None or isinstance(model, ExitNet):
        return spec
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        num_classes = final_classifier(model).out_features
    except ValueError:
        return None
    if not convs:
        return None
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for name in models.names():
        with torch.device("meta"):
            candidate = models.create(name, num_classes=num_classes, in_channels=convs[0].in_channels)
        if type(candidate) is type(model) and [(n, tuple(p.shape)) for n, p in candidate.named_parameters()] == shapes:
            return name, {}
    return None


def _reset(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def thinner_copy(model: nn.Module, width: float, example_input: torch.Tensor) -> nn.Module:
    """A float copy of ``model`` keeping ``width`` of every layer's channels, re-initialised.

    Channels are removed with the dependency-aware pruner (so any traceable model works);
    quantized layers are set back to float (32w32a) and exit heads are kept, made thinner too.
    """
    student = copy.deepcopy(model)
    if any(isinstance(m, QuantLayer) for m in student.modules()):
        student, _ = quantize_model(student, 32, 32, policy="all")
    prune_channels(student, 1.0 - width, example_input)
    student.zoo_spec = None
    return _reset(student)


def _num_outputs(model: nn.Module, example_input: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = exit_outputs(model, example_input)[-1]
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def derive_student(teacher: nn.Module, example_input: torch.Tensor, width: float = 0.5) -> nn.Module:
    """The default student of ``teacher``: a float network, with exits iff the teacher has them.

    Zoo models: the shallower member of the family (``models.student_of``), at full width.
    Anything else, and the smallest zoo members: :func:`thinner_copy` of the teacher.
    """
    spec = zoo_spec(teacher)
    spec = models.student_of(spec[0], **spec[1]) if spec else None
    if spec is None:
        return thinner_copy(teacher, width, example_input)
    return _create(spec, _num_outputs(teacher, example_input), example_input)


def _create(spec: Tuple[str, dict], num_classes: int, example_input: torch.Tensor) -> nn.Module:
    """A fresh zoo model that remembers its spec."""
    name, kwargs = spec
    model = models.create(name, num_classes=num_classes, in_channels=example_input.shape[1], **kwargs)
    model.zoo_spec = (name, dict(kwargs))
    return model.to(example_input.device)


@dataclass
class Distill(Stage):
    """Distil the model this stage receives (the teacher) into a student, trained with
    ``gamma * CE + alpha * KD(T) + beta * CRD`` (CRD only when ``crd``).

    ``student``: a module (copied, then trained), a zoo name, or None to derive one
    (:func:`derive_student`; ``width`` is the channel share of a thinner copy). The student is
    trained at the initial learning rate for the configured epochs; this training is the stage's
    fine-tuning, so ``finetune`` is off by default.

    Order semantics: the teacher is always the current model, so PD distils from the pruned
    teacher and QD from the quantized one (the student itself is a fresh float network). ED is
    exit-aware: the teacher's trained exits teach the student's exits (the student gets heads
    at its default points, of the teacher's head kind), KD + CE per exit, each student head on
    detached features, and the student's threshold is chosen again. DD distils the first
    student into a second, smaller one.
    """

    letter = "D"
    student: Union[None, str, nn.Module] = None
    width: float = 0.5
    alpha: float = 0.9
    beta: float = 0.8
    gamma: float = 0.1
    T: float = 4.0
    crd: bool = False
    crd_dim: int = 128
    crd_negatives: int = 16384
    finetune: bool = field(default=False, kw_only=True)

    def check(self) -> None:
        super().check()
        check_distill_weights(self.alpha, self.beta, self.gamma, self.T)
        if not self.crd and not (self.alpha or self.gamma):
            raise ValueError("alpha and gamma must not both be 0 without crd")
        if isinstance(self.width, bool) or not isinstance(self.width, Real) or not 0 < self.width < 1:
            raise ValueError(f"width must be a number in (0, 1), got {self.width!r}")
        if not isinstance(self.crd, bool):
            raise ValueError(f"crd must be True or False, got {self.crd!r}")
        for name in ("crd_dim", "crd_negatives"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.student, str) and self.student not in models.names():
            names = ", ".join(models.names())
            raise ValueError(f"student must be a zoo name ({names}), a module or None, got {self.student!r}")
        if self.student is not None and not isinstance(self.student, (str, nn.Module)):
            raise ValueError(f"student must be a zoo name, an nn.Module or None, got {type(self.student).__name__}")

    def validate(self, model: nn.Module, context) -> None:
        super().validate(model, context)
        spec = zoo_spec(model)
        if self.student is None and (spec is None or models.student_of(spec[0], **spec[1]) is None):
            check_prunable(model, context.example_input)  # the student will be a thinner copy
        if isinstance(self.student, nn.Module):
            n = _num_outputs(self.student.to(context.device), context.example_input)
            if n != context.num_classes:
                raise ValueError(f"student has {n} output classes but the teacher has {context.num_classes}")

    def build_student(self, teacher: nn.Module, context) -> nn.Module:
        """The student for ``teacher``, with exits attached when the teacher has exits."""
        x = context.example_input
        if isinstance(self.student, nn.Module):
            student = copy.deepcopy(self.student).to(context.device)
        elif isinstance(self.student, str):
            student = _create((self.student, {}), context.num_classes, x)
        else:
            student = derive_student(teacher, x, self.width)
        if isinstance(teacher, ExitNet) and not isinstance(student, ExitNet):
            config = getattr(teacher, "exit_config", None)
            spec = zoo_spec(student)
            student = attach_exits(student, None, getattr(config, "head", "pool"), example_input=x)
            student.zoo_spec = spec
            student.exit_config = config
        return student

    def transform(self, model: nn.Module, context) -> StageInfo:
        teacher = model.to(context.device)
        student = self.build_student(teacher, context)
        crd = None
        if self.crd:
            dims = [final_classifier(m).in_features for m in (student, teacher)]
            crd = CRDLoss(dims[0], dims[1], len(context.train_loader.dataset),
                          feat_dim=self.crd_dim, num_negatives=self.crd_negatives)
        objective = DistillObjective(teacher, self.alpha, self.beta if self.crd else 0.0, self.gamma, self.T,
                                     crd=crd, student=student)
        try:
            fit = context.trainer.fit(student, context.train_loader, objective, desc="D distill")
        finally:
            objective.close()
        exits = [m.num_exits if isinstance(m, ExitNet) else 0 for m in (teacher, student)]
        exit_aware = exits[0] > 0 and exits[0] == exits[1]
        return StageInfo(student, {
            "student": (zoo_spec(student) or (type(student).__name__,))[0],
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "teacher_bitops": bitops.profile(teacher, context.example_input).bitops,
            "exit_aware": exit_aware,
            "train_loss": fit.epoch_losses,
        })
