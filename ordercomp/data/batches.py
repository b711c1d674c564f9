"""What a batch (or a sample) may look like, and the checks of what it holds.

A loader yields ``(input, label)`` or ``(input, label, index)`` tuples (or lists), or dicts with
one input key (:data:`INPUT_KEYS`, e.g. ``"input"`` or ``"pixel_values"``), one label key
(:data:`LABEL_KEYS`, e.g. ``"label"`` or ``"labels"``) and optionally ``"index"``. Every part of
ordercomp reads batches through :func:`unpack`, so each form works everywhere and anything else
is refused with one error that names the loader and what it yielded.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..checks import describe
from ..errors import DataError

__all__ = ["INPUT_KEYS", "LABEL_KEYS", "unpack", "check_labels", "check_finite"]

INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_FORMS = (f"(input, label) or (input, label, index) tuples, or dicts with an input key ({', '.join(INPUT_KEYS)}) "
          f"and a label key ({', '.join(LABEL_KEYS)})")


def _key(batch: dict, keys: Tuple[str, ...], what: str, where: str) -> Any:
    found = [k for k in keys if k in batch]
    if len(found) != 1:
        raise DataError(f"{where} must yield {_FORMS}; got {describe(batch)} "
                        f"({'no' if not found else 'more than one'} {what} key)")
    return batch[found[0]]


def unpack(batch: Any, where: str = "loader") -> Tuple[Any, Any, Optional[Any]]:
    """``(input, label, index or None)`` of a batch or a sample in one of the accepted forms;
    :class:`~ordercomp.errors.DataError` naming ``where`` (e.g. ``"train_loader"``) otherwise."""
    if isinstance(batch, dict):
        return _key(batch, INPUT_KEYS, "input", where), _key(batch, LABEL_KEYS, "label", where), batch.get("index")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise DataError(f"{where} must yield {_FORMS}; got {describe(batch)}")


def check_labels(labels: Any, num_classes: Optional[int], where: str) -> None:
    """Refuses labels that are not integers in ``[0, num_classes)`` (only ``>= 0`` when the class
    count is unknown), naming ``where``, the first bad value and how many there are."""
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{where}: labels must be a tensor of integer class indices, got {describe(labels)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{where}: labels must be integer class indices, got {labels.dtype} labels "
                        "(one-hot or soft labels are not supported)")
    if labels.dim() > 1:
        raise DataError(f"{where}: labels must be one class index per input (shape [batch]), "
                        f"got shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        return
    bad = (labels < 0) if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        first = int(labels[bad].flatten()[0])
        allowed = ">= 0" if num_classes is None else f"in [0, {num_classes})"
        extra = "" if num_classes is None else f": the model has {num_classes} classes"
        raise DataError(f"{where}: labels must be integers {allowed}{extra}; found {first} "
                        f"({int(bad.sum())} of {labels.numel()} labels outside)")


def check_finite(inputs: Any, where: str) -> None:
    """Refuses a floating-point input tensor holding NaN or infinity, naming ``where``."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        finite = torch.isfinite(inputs)
        if not bool(finite.all()):
            nan = int(torch.isnan(inputs).sum())
            inf = int((~finite).sum()) - nan
            raise DataError(f"{where}: inputs must be finite, found {nan} NaN and {inf} infinite values "
                            f"in a batch of shape {tuple(inputs.shape)}")
