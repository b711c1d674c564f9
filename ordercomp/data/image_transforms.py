"""Image transforms as plain torch tensor ops (no torchvision), and the standard train/eval pipelines.

The random transforms of one pipeline share an :class:`Rng`, so augmentation is reproducible given
a seed, in the main process and in DataLoader workers alike. A transform with randomness has
``reseed(seed)`` (:class:`Compose` passes it on), which :func:`ordercomp.data.reseed` calls to
restart the stream.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from ..errors import ConfigError, DataError

Transform = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "Transform", "Rng", "Compose", "ToFloat", "Normalize", "Resize", "CenterCrop",
    "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop", "transforms",
]


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

    def reseed(self, seed: int) -> None:
        """Restarts the main process's stream from ``seed``."""
        self.generator.manual_seed(seed)
        self._worker_seed = None

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

    def reseed(self, seed: int) -> None:
        """Restarts the random stream of every transform that has one."""
        for t in self.transforms:
            if callable(getattr(t, "reseed", None)):
                t.reseed(seed)


class _Random:
    """A transform drawing from ``self.rng``."""

    rng: Rng

    def reseed(self, seed: int) -> None:
        self.rng.reseed(seed)


class ToFloat:
    """uint8 images in 0..255 -> float32 in [0, 1]; other dtypes are only cast to float32."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


class Normalize:
    """Per-channel ``(x - mean) / std`` on a float [C, H, W] image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or min(std) <= 0:
            raise ConfigError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != len(self.mean):
            raise DataError(f"Normalize has {len(self.mean)} channel(s) but the image has shape {tuple(x.shape)}")
        return (x - self.mean) / self.std


def _pair(size) -> Tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ConfigError(f"size must be positive, got {size}")
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
            raise DataError(f"CenterCrop{self.size} is larger than the image {tuple(x.shape[-2:])}")
        top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top:top + th, left:left + tw]


class RandomCrop(_Random):
    """Zero-pads ``padding`` pixels on every side, then crops back to the input size at a random offset."""

    def __init__(self, padding: int, rng: Optional[Rng] = None):
        if padding < 0:
            raise ConfigError(f"padding must be >= 0, got {padding}")
        self.padding, self.rng = padding, rng or Rng()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p == 0:
            return x
        h, w = x.shape[-2:]
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=self.rng()).tolist()
        return F.pad(x, (p, p, p, p))[..., top:top + h, left:left + w]


class RandomHorizontalFlip(_Random):
    """Mirrors the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, rng: Optional[Rng] = None):
        if not 0 <= p <= 1:
            raise ConfigError(f"p must be in [0, 1], got {p}")
        self.p, self.rng = p, rng or Rng()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand((), generator=self.rng()).item() < self.p else x


class RandomResizedCrop(_Random):
    """Inception-style crop: a random area fraction and aspect ratio, resized to ``size`` (ImageNet training)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng: Optional[Rng] = None):
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(
                f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}"
            )
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
            raise ConfigError("resized_crop needs image_size")
        evaluate = Compose(ToFloat(), Resize(round(image_size / 0.875)), CenterCrop(image_size), norm)
        train = Compose(ToFloat(), RandomResizedCrop(image_size, rng=rng), RandomHorizontalFlip(rng=rng), norm)
    else:
        resize = (Resize((image_size, image_size)),) if image_size else ()
        evaluate = Compose(ToFloat(), *resize, norm)
        mirror = (RandomHorizontalFlip(rng=rng),) if flip else ()
        train = Compose(ToFloat(), *resize, RandomCrop(padding, rng=rng), *mirror, norm)
    return (train if augment else evaluate), evaluate
