"""What makes a run's data the same data: restarting its random streams, a fingerprint of its
content, and the :func:`load` settings that rebuild a loader.

A compression run calls :func:`reseed` on its loaders before every stage, so a stage's shuffling
and augmentation depend on (seed, stage) alone and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .datasets import labels_of

__all__ = ["reseed", "fingerprint", "origin", "set_origin"]

_ORIGIN = "_ordercomp_origin"


def reseed(loader, seed: int) -> None:
    """Restarts the random streams behind ``loader`` from ``seed``: its shuffling generator (the
    loader's or its sampler's) and the augmentation of its dataset (a ``transform`` with a
    ``reseed(seed)`` method, such as ordercomp's; found through ``dataset`` / ``datasets``
    wrappers such as ``Subset``). A loader shuffling from the global random state (no generator)
    follows ``torch.manual_seed``. Workers kept alive between passes (``persistent_workers``) keep
    their own augmentation state, and a transform without ``reseed`` drawing from a generator of
    its own keeps its stream: neither is restarted."""
    generators = {id(g): g for g in (getattr(loader, "generator", None),
                                     getattr(getattr(loader, "sampler", None), "generator", None),
                                     getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                                             "generator", None))
                  if isinstance(g, torch.Generator)}
    for g in generators.values():
        g.manual_seed(seed)
    seen, pending = set(), [getattr(loader, "dataset", None)]
    while pending:
        dataset = pending.pop()
        if dataset is None or id(dataset) in seen:
            continue
        seen.add(id(dataset))
        for name in ("transform", "target_transform", "transforms"):
            transform = getattr(dataset, name, None)
            if callable(getattr(transform, "reseed", None)):
                transform.reseed(seed)
        pending.append(getattr(dataset, "dataset", None))
        pending.extend(getattr(dataset, "datasets", None) or [])


def fingerprint(loader, samples: int = 16) -> Dict[str, Any]:
    """``{"size", "hash"}`` of ``loader``'s data: the number of samples (None for a loader without
    a sized map-style dataset) and a hash of its labels (when the dataset has them as an attribute)
    and of ``samples`` evenly spaced samples, read with the random streams restarted (see
    :func:`reseed`); a loader without a sized dataset is hashed by its first batch. Other data, or
    the same data with other augmentation, gives another hash. Transforms drawing from the global
    random states (torchvision's, numpy's) draw from seed 0 here; those states are restored after."""
    with _global_states_seeded(0):
        return _fingerprint(loader, samples)


def _fingerprint(loader, samples: int) -> Dict[str, Any]:
    reseed(loader, 0)
    h = hashlib.sha256()
    dataset = getattr(loader, "dataset", None)
    try:
        size = None if isinstance(dataset, IterableDataset) else len(dataset)
    except TypeError:
        size = None
    if size is not None:
        labels = labels_of(dataset)
        if labels is not None:
            _update(h, labels)
        for i in sorted({round(k * (size - 1) / max(1, samples - 1)) for k in range(min(samples, size))}):
            _update(h, dataset[i])
    else:
        _update(h, next(iter(loader), None))
    return {"size": size, "hash": h.hexdigest()[:16]}


@contextlib.contextmanager
def _global_states_seeded(seed: int) -> Iterator[None]:
    """Seeds torch's (CPU), Python's and numpy's global random states for the block, then restores them."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _update(h, item) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    elif isinstance(item, dict):
        for key in sorted(item, key=str):
            h.update(str(key).encode())
            _update(h, item[key])
    elif isinstance(item, (tuple, list)):
        h.update(f"[{len(item)}".encode())
        for x in item:
            _update(h, x)
    elif item is None or isinstance(item, (bool, int, float, str, bytes)):
        h.update(repr(item).encode())
    elif hasattr(item, "__array__"):
        _update(h, torch.as_tensor(item.__array__()))
    else:
        h.update(type(item).__qualname__.encode())


def set_origin(loader, settings: Dict[str, Any], which: str) -> None:
    """Records on ``loader`` the :func:`load` settings and the bundle attribute it came from."""
    setattr(loader, _ORIGIN, {"settings": dict(settings), "loader": which})


def origin(loader) -> Optional[Dict[str, Any]]:
    """``{"settings": load(...) keyword arguments, "loader": "val_loader" | ...}`` for a loader
    :func:`ordercomp.data.load` made (with ``root`` made absolute), else None."""
    value = getattr(loader, _ORIGIN, None)
    return {"settings": dict(value["settings"]), "loader": value["loader"]} if value else None
