"""The Dataset classes the readers return, and the wrapper that adds sample indices.

Every dataset yields ``(transform(image), label)`` with the image as uint8 [C, H, W] before the
transform; :class:`IndexedDataset` turns that into ``(x, y, index)`` for contrastive distillation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from ..errors import ConfigError, DataError, MissingDependencyError, MissingFileError
from .batches import unpack
from .image_transforms import Transform

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

__all__ = ["PathLike", "IMAGE_EXTENSIONS", "ArrayDataset", "ImageFolder", "IndexedDataset", "with_indices", "labels_of"]


class ArrayDataset(Dataset):
    """Images held in memory as uint8 [N, C, H, W] with int64 labels; yields ``(transform(image), label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Transform] = None):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"need images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise MissingDependencyError("reading image files needs Pillow: pip install pillow") from e
    return Image


def _pil_to_tensor(image) -> torch.Tensor:
    """A PIL image as uint8 [C, H, W]: grayscale keeps one channel, everything else becomes RGB."""
    if image.mode != "L":
        image = image.convert("RGB")
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Images in class folders (``root/<class>/**/*.png|jpg|...``), read with PIL as uint8 RGB [3, H, W].

    ``classes`` fixes the class order (pass the training classes when reading a validation folder);
    by default it is the sorted folder names.
    """

    def __init__(self, root: PathLike, transform: Optional[Transform] = None, classes: Optional[Sequence[str]] = None):
        root = Path(root)
        if not root.is_dir():
            raise MissingFileError(f"imagefolder: expected class folders <root>/<class>/*.jpg|png; not found: {root}")
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DataError(f"{root}: class folders {unknown} are not among the classes {self.classes}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (p, index[c])
            for c in found
            for p in sorted((root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]
        if not self.samples:
            raise MissingFileError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
        self.labels = torch.tensor([label for _, label in self.samples])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with _pil().open(path) as image:
                x = _pil_to_tensor(image.convert("RGB"))
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        return (self.transform(x) if self.transform else x), label


class _TorchvisionDataset(Dataset):
    """A torchvision dataset with PIL images turned into uint8 tensors (RGB when ``rgb``)."""

    def __init__(self, dataset, rgb: bool, transform: Optional[Transform] = None):
        self.dataset, self.rgb, self.transform = dataset, rgb, transform
        labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels)).long()
        if hasattr(dataset, "classes"):
            self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        x = _pil_to_tensor(image.convert("RGB") if self.rgb else image)
        return (self.transform(x) if self.transform else x), int(label)


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` (or a dict form, see :func:`~ordercomp.data.batches.unpack`)
    so that it yields ``(x, y, index)`` (CRD needs the index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y, _ = unpack(self.dataset[i], "the training dataset")
        return x, y, i


def with_indices(loader: DataLoader) -> DataLoader:
    """The same loader over :class:`IndexedDataset` (batch size, shuffling, workers kept)."""
    if isinstance(loader.dataset, IndexedDataset):
        return loader
    if loader.batch_size is None:
        raise ConfigError("the training loader must batch with batch_size to add sample indices")
    return DataLoader(
        IndexedDataset(loader.dataset),
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        generator=loader.generator,
    )


def labels_of(dataset: Dataset) -> Optional[torch.Tensor]:
    """The labels of ``dataset`` when they can be read without loading a sample (a ``labels`` or
    ``targets`` attribute, a ``TensorDataset``'s second tensor, through ``Subset`` s), else None."""
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, IndexedDataset):
        return labels_of(dataset.dataset)
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1] if len(dataset.tensors) >= 2 else None
    else:
        labels = getattr(dataset, "labels", getattr(dataset, "targets", None))
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    return labels if labels.dim() == 1 and len(labels) == len(dataset) else None
