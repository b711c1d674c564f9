"""Model zoo: the CIFAR-style networks of the paper, by name.

Every model has ``features`` (an ``nn.Sequential`` of stages), ``classifier`` (pool, flatten,
[dropout], linear) with ``forward(x) = classifier(features(x))``, and ``default_exit_points()``
(indices into ``features`` after which exit heads go). All take ``num_classes`` and
``in_channels`` and run on 28x28 and 32x32 inputs.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import checks
from ..errors import ConfigError
from .mobilenetv2 import MobileNetV2
from .resnet import BasicBlock, ResNet
from .vgg import CONFIGS as VGG_CONFIGS
from .vgg import VGG

__all__ = ["create", "names", "family", "student_of", "student_ladder", "identify", "ResNet", "BasicBlock", "VGG", "MobileNetV2"]

_CIFAR_RESNET = (16, 32, 64)

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "resnet8": partial(ResNet, [1, 1, 1], _CIFAR_RESNET),
    "resnet20": partial(ResNet, [3, 3, 3], _CIFAR_RESNET),
    "resnet32": partial(ResNet, [5, 5, 5], _CIFAR_RESNET),
    "resnet56": partial(ResNet, [9, 9, 9], _CIFAR_RESNET),
    "resnet10": partial(ResNet, [1, 1, 1, 1]),
    "resnet18": partial(ResNet, [2, 2, 2, 2]),
    "resnet34": partial(ResNet, [3, 4, 6, 3]),
    **{name: partial(VGG, stages) for name, stages in VGG_CONFIGS.items()},
    "mobilenetv2": MobileNetV2,
}

# Families, smallest member first.
_FAMILIES: Dict[str, List[str]] = {
    "resnet": ["resnet10", "resnet18", "resnet34"],
    "resnet_cifar": ["resnet8", "resnet20", "resnet32", "resnet56"],
    "vgg": ["vgg11", "vgg13", "vgg16", "vgg19"],
    "mobilenetv2": ["mobilenetv2"],
}

# Which shallower member a teacher distils into (VGG goes straight to the smallest, as in the paper).
_STUDENTS = {
    "resnet34": "resnet18",
    "resnet18": "resnet10",
    "resnet56": "resnet20",
    "resnet32": "resnet8",
    "resnet20": "resnet8",
    "vgg19": "vgg11",
    "vgg16": "vgg11",
    "vgg13": "vgg11",
}


def names() -> List[str]:
    """Names accepted by :func:`create`."""
    return list(_BUILDERS)


def _check_name(name: str) -> str:
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model name {name!r}; known names: {', '.join(_BUILDERS)}")
    return name


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Builds zoo model ``name`` (see :func:`names`); ``kwargs`` go to its class.

    ``dropout`` is accepted by every model, ``width_mult`` by ``mobilenetv2``.
    """
    _check_name(name)
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        checks.integer(arg, value, 1)
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def family(name: str) -> str:
    """The family of zoo model ``name``: ``resnet``, ``resnet_cifar``, ``vgg`` or ``mobilenetv2``."""
    _check_name(name)
    return next(f for f, members in _FAMILIES.items() if name in members)


def student_of(name: str, **kwargs) -> Optional[Tuple[str, dict]]:
    """The distillation student of zoo model ``name`` built with ``kwargs``: ``(name, kwargs)`` for :func:`create`.

    A shallower member of the same family (resnet34 -> resnet18 -> resnet10, resnet56/32 ->
    resnet20/8, vgg13/16/19 -> vgg11), or for ``mobilenetv2`` the same network at half its
    ``width_mult``. ``None`` for the smallest members (resnet10, resnet8, vgg11): derive a
    thinner copy instead.
    """
    _check_name(name)
    kwargs = dict(kwargs)
    if name == "mobilenetv2":
        kwargs["width_mult"] = kwargs.get("width_mult", 1.0) / 2
        return name, kwargs
    student = _STUDENTS.get(name)
    return None if student is None else (student, kwargs)


def student_ladder(name: str) -> List[str]:
    """The zoo students teacher ``name`` can distil into, weakest first: the teacher's own
    architecture, then each shallower member :func:`student_of` leads to (resnet56 -> resnet56,
    resnet20, resnet8). Just ``[name]`` for the smallest members and ``mobilenetv2`` (its
    student is the same network, thinner)."""
    ladder = [_check_name(name)]
    while name != "mobilenetv2" and (name := _STUDENTS.get(name)) is not None:
        ladder.append(name)
    return ladder


# Non-default kwargs under which identify() also recognises a model (derived students).
_VARIANTS: Dict[str, List[dict]] = {"mobilenetv2": [{"width_mult": 0.5}]}


def _io_sizes(model: nn.Module) -> Optional[Tuple[int, int]]:
    """``(num_classes, in_channels)``: out_features of the last ``nn.Linear``, in_channels of the first conv."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not (linears and convs):
        return None
    return linears[-1].out_features, convs[0].in_channels


def _layout(model: nn.Module) -> Tuple[list, list]:
    """Module types by name and state shapes by name: what must match for two models to be the same network."""
    modules = [(name, type(m)) for name, m in model.named_modules()]
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)]
    return modules, shapes


def identify(model: nn.Module) -> Optional[Tuple[str, dict]]:
    """``(name, kwargs)`` when ``model`` is an unmodified zoo model (``create(name, **kwargs)`` remakes it), else None.

    A match has the class of ``create(name)`` and exactly its modules and state shapes, built
    on the meta device (no memory) with the model's ``num_classes`` and ``in_channels``.
    Besides the defaults, ``mobilenetv2`` at ``width_mult=0.5`` (the derived student) is
    tried; a dropout layer in the classifier is reported as ``dropout``. Pruned, quantized or
    user models give None.
    """
    sizes = _io_sizes(model)
    if sizes is None:
        return None
    num_classes, in_channels = sizes
    extra = {}
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if len(dropouts) == 1:
        extra["dropout"] = dropouts[0].p
    layout = _layout(model)
    for name, builder in _BUILDERS.items():
        if getattr(builder, "func", builder) is not type(model):
            continue
        for variant in [{}, *_VARIANTS.get(name, [])]:
            kwargs = {**variant, **extra}
            with torch.device("meta"):
                candidate = create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
            if _layout(candidate) == layout:
                return name, kwargs
    return None
