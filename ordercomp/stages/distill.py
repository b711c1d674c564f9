"""D: knowledge distillation from the model the stage receives into a smaller student."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import bitops, models, results
from .. import checks
from ..errors import ConfigError, ModelError
from ..losses import CRDLoss, DistillObjective, check_distill_weights
from ..nn import Output, PenultimateFeatures
from ..nn.introspect import final_logits
from ..nn import HEADS, ExitNet, QuantLayer, attach_exits, quantize_model
from .base import Phase, Prepared, Stage
from .prune import check_layer_names, check_prunable, prune_channels

__all__ = ["Distill", "derive_student", "thinner_copy", "inherit", "INITS"]

INITS = ("teacher", "random")


def _reset(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def thinner_copy(model: nn.Module, width: float, example_input: torch.Tensor, output: Output = None,
                 reset: bool = True, ignored_layers: Sequence[str] = ()) -> nn.Module:
    """A float copy of ``model`` keeping ``width`` of every layer's channels, re-initialised
    (``reset=False``: keeping the weights of the channels kept).

    Channels are removed with the dependency-aware pruner (so any traceable model works;
    ``output`` says where its logits are; ``ignored_layers``, names or patterns, keep theirs);
    quantized layers are set back to float (32w32a) and exit heads are kept, made thinner too.
    """
    student = copy.deepcopy(model)
    if any(isinstance(m, QuantLayer) for m in student.modules()):
        student, _ = quantize_model(student, 32, 32, policy="all")
    if width < 1.0:
        prune_channels(student, 1.0 - width, example_input, ignored_layers=ignored_layers, output=output,
                       setting="distill.ignored_layers")
    return _reset(student) if reset else student


def inherit(student: nn.Module, teacher: nn.Module) -> int:
    """Copies into ``student`` every parameter and buffer of ``teacher`` with the same name and
    shape (a shallower member of a ResNet family gets the stem, the first blocks of each stage and
    the classifier: DistilBERT's initialisation, one layer of several kept); returns how many."""
    theirs = teacher.state_dict()
    mine = student.state_dict()
    shared = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape and mine[k].dtype == v.dtype}
    student.load_state_dict(shared, strict=False)
    return len(shared)


def _num_outputs(model: nn.Module, example_input: torch.Tensor, output: Output = None) -> int:
    return int(final_logits(model, example_input, output).shape[-1])


def student_spec(zoo_spec: Optional[Tuple[str, dict]]) -> Optional[Tuple[str, dict]]:
    """The zoo ``(name, kwargs)`` of the default student of zoo model ``zoo_spec``, or None (a thinner copy)."""
    return models.student_of(zoo_spec[0], **zoo_spec[1]) if zoo_spec else None


def derive_student(teacher: nn.Module, example_input: torch.Tensor, width: float = 0.5,
                   zoo_spec: Optional[Tuple[str, dict]] = None, output: Output = None) -> nn.Module:
    """The default student of ``teacher``: a float network (a thinner copy keeps the teacher's exits).

    ``zoo_spec``: the teacher's zoo ``(name, kwargs)`` (default: ``models.identify(teacher)``). Zoo
    models: the shallower member of the family (``models.student_of``), at full width. Anything
    else, and the smallest zoo members: :func:`thinner_copy` of the teacher. ``output``: where
    the teacher's logits are.
    """
    zoo_spec = student_spec(zoo_spec if zoo_spec is not None else models.identify(teacher))
    if zoo_spec is None:
        return thinner_copy(teacher, width, example_input, output)
    return _create(zoo_spec, _num_outputs(teacher, example_input, output), example_input)


def _create(zoo_spec: Tuple[str, dict], num_classes: int, example_input: torch.Tensor) -> nn.Module:
    name, kwargs = zoo_spec
    model = models.create(name, num_classes=num_classes, in_channels=example_input.shape[1], **kwargs)
    return model.to(example_input.device)


@dataclass
class Distill(Stage):
    """Distil the model this stage receives (the teacher) into a student, trained with
    ``gamma * CE + alpha * KD(T) + beta * CRD`` (CRD only when ``crd``).

    ``student``: a module (copied, then trained), a zoo name, or None to derive one
    (:func:`derive_student`). ``width``: the share of channels the student keeps (a thinner copy,
    see :func:`thinner_copy`, started as ``init`` says): of the teacher when the student is derived as a thinner
    copy (default 0.5), else of the zoo or given student (default 1.0, as built). The student is
    trained at the initial learning rate for the configured epochs, then fine-tuned like every
    other stage (the paper's recipe; ``finetune=False`` skips it). ``init``: where the student's
    weights start: ``"teacher"`` (default) copies every teacher tensor whose name and shape the
    student shares (a shallower zoo member gets the stem, the first blocks of each stage and the
    classifier; a thinner copy keeps the weights of the channels it keeps, chosen by magnitude),
    so on small data the student starts from what the teacher learned instead of from nothing;
    ``"random"``: a fresh initialisation (the paper's). A student given as a module keeps its own weights.

    Strength: ``student`` (the zoo teacher's own architecture down its family, see
    :func:`ordercomp.models.student_ladder`, when the student is derived or a zoo name and the
    teacher a zoo model), then ``width`` (1, 0.75, 0.5, 0.375, 0.25 of the channels).
    ``ignored_layers``: names (or patterns) of layers a thinner copy keeps at full width (see
    :class:`~ordercomp.stages.Prune`).

    Order semantics: the teacher is always the current model, so PD distils from the pruned
    teacher and QD from the quantized one (the student itself is a fresh float network). ED is
    exit-aware: the teacher's trained exits teach the student's exits (the student gets heads
    at its default points, of the teacher's head kind), KD + CE per exit, each student head on
    detached features, and the student's threshold is chosen again. DD distils the first
    student into a second, smaller one.

    Phases: ``train`` (the student against the teacher, at the initial learning rate), then
    ``finetune`` (at the fine-tuning rate, with the task loss or ``kd_alpha`` KD from the original).
    """

    letter = "D"
    LADDERS = {"student": (), "width": (1.0, 0.75, 0.5, 0.375, 0.25)}  # student: from the teacher (strengths)
    student: Union[None, str, nn.Module] = None
    width: Optional[float] = None
    alpha: float = 0.9
    beta: float = 0.8
    gamma: float = 0.1
    T: float = 4.0
    init: str = "teacher"
    crd: bool = False
    crd_dim: int = 128
    crd_negatives: int = 16384
    ignored_layers: Tuple[str, ...] = ()

    def check(self) -> None:
        super().check()
        self.ignored_layers = check_layer_names("distill.ignored_layers", self.ignored_layers)
        check_distill_weights(self.alpha, self.beta, self.gamma, self.T)
        if not self.crd and not (self.alpha or self.gamma):
            raise ConfigError("alpha and gamma must not both be 0 without crd")
        checks.number("width", self.width, low=0, high=1, low_open=True, optional=True)
        checks.flag("crd", self.crd)
        checks.one_of("init", self.init, INITS)
        for name in ("crd_dim", "crd_negatives"):
            checks.integer(name, getattr(self, name), 1)
        if isinstance(self.student, str) and self.student not in models.names():
            names = ", ".join(models.names())
            raise ConfigError(f"student must be a zoo name ({names}), a module or None, got {self.student!r}")
        if self.student is not None and not isinstance(self.student, (str, nn.Module)):
            raise ConfigError(f"student must be a zoo name, an nn.Module or None, got {type(self.student).__name__}")

    def student_width(self, zoo_spec: Optional[Tuple[str, dict]]) -> float:
        """``width``, or its default: 0.5 for a thinner copy of a teacher with zoo ``zoo_spec`` (None:
        not from the zoo), 1.0 for a zoo or given student."""
        if self.width is not None:
            return float(self.width)
        return 0.5 if self.student is None and student_spec(zoo_spec) is None else 1.0

    def strengths(self, context=None) -> Dict[str, Tuple]:
        """The student ladder first (when there is one with more than one member), then the width."""
        ladders = super().strengths(context)
        students = ladders["student"] or self.student_ladder(context)
        return ({"student": students} if len(students) > 1 else {}) | {"width": ladders["width"]}

    def student_ladder(self, context=None) -> Tuple[str, ...]:
        """The zoo teacher's own architecture down its family, when the student is derived (or a
        zoo name in that family) and the teacher (``context.zoo_spec``) a zoo model with a shallower
        member; else ()."""
        zoo_spec = getattr(context, "zoo_spec", None)
        if zoo_spec is None or isinstance(self.student, nn.Module):
            return ()
        if self.student is None and models.student_of(zoo_spec[0], **zoo_spec[1]) is None:
            return ()
        ladder = tuple(models.student_ladder(zoo_spec[0]))
        return ladder if self.student is None or self.student in ladder else ()

    def strength(self, context=None) -> Dict[str, Any]:
        """The student this config builds (the derived one's zoo name) and its width."""
        zoo_spec = getattr(context, "zoo_spec", None)
        out = {}
        for name in self.strengths(context):
            if name == "width":
                out[name] = self.student_width(zoo_spec)
            elif name == "student" and self.student is None:
                out[name] = models.student_of(zoo_spec[0], **zoo_spec[1])[0]
            else:
                out[name] = getattr(self, name)
        return out

    def probing(self) -> "Distill":
        return dataclasses.replace(self, finetune=False)  # its training phase says enough

    def check_model(self, model: nn.Module, context) -> None:
        super().check_model(model, context)
        if self.student is None and student_spec(context.zoo_spec) is None:
            check_prunable(model, context.example_input, context.output, self.ignored_layers,  # a thinner copy
                           "distill.ignored_layers")
        if isinstance(self.student, nn.Module):
            n = _num_outputs(self.student.to(context.device), context.example_input, context.output)
            if n != context.num_classes:
                raise ModelError(f"student has {n} output classes but the teacher has {context.num_classes}")

    def build_student(self, teacher: nn.Module, context) -> Tuple[nn.Module, Optional[Dict]]:
        """The student for ``teacher`` (with exits when the teacher has them) and its architecture
        (None for a thinner copy, which keeps the teacher's)."""
        x = context.example_input
        from_teacher = self.init == "teacher" and not isinstance(self.student, nn.Module)  # yours stays as given
        if isinstance(self.student, nn.Module):
            student = copy.deepcopy(self.student).to(context.device)
            zoo_spec = models.identify(student)
        else:
            zoo_spec = (self.student, {}) if isinstance(self.student, str) else student_spec(context.zoo_spec)
            if zoo_spec is None:
                return thinner_copy(teacher, self.student_width(context.zoo_spec), x, context.output,
                                    reset=not from_teacher, ignored_layers=self.ignored_layers), None
            student = _create(zoo_spec, context.num_classes if isinstance(self.student, str) else
                              _num_outputs(teacher, x, context.output), x)
        architecture = results.architecture(student, zoo_spec)
        if from_teacher:
            inherit(student, teacher)
        if self.student_width(context.zoo_spec) < 1.0:
            student = thinner_copy(student, self.width, x, context.output, reset=not from_teacher,
                                   ignored_layers=self.ignored_layers)
        if isinstance(teacher, ExitNet) and not isinstance(student, ExitNet):
            head = teacher.head_kind if teacher.head_kind in HEADS else "pool"
            student = attach_exits(student, None, head, example_input=x, output=context.output,
                                   **teacher.head_kwargs)
            student.criterion = teacher.criterion
        return student, architecture

    def prepare(self, model: nn.Module, context) -> Prepared:
        """Builds the student; the phases train it against ``model`` (the teacher)."""
        teacher, x = model.to(context.device), context.example_input
        student, architecture = self.build_student(teacher, context)
        crd = None
        if self.crd:
            dims = [PenultimateFeatures(m, x, context.output) for m in (student, teacher)]
            for d in dims:
                d.remove()
            crd = CRDLoss(dims[0].dim, dims[1].dim, len(context.train_loader.dataset),
                          feat_dim=self.crd_dim, num_negatives=self.crd_negatives)
        objective = DistillObjective(teacher, self.alpha, self.beta if self.crd else 0.0, self.gamma, self.T,
                                     crd=crd, student=student, output=context.output, example_input=x,
                                     mixup=self.mixup)
        exits = [m.num_exits if isinstance(m, ExitNet) else 0 for m in (teacher, student)]
        zoo_spec = (architecture or {}).get("zoo")
        info = {
            "student": zoo_spec or type(student).__name__,
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "teacher_bitops": bitops.profile(teacher, context.example_input).bitops,
            "exit_aware": exits[0] > 0 and exits[0] == exits[1],
        }
        phases = [Phase("train", objective, lr_scale=1.0)] + self.finetune_phases(context)
        return Prepared(student, phases, info, architecture)
