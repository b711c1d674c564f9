"""The probe every run passes before any training: the model, the data and the run directory.

:func:`check_run` looks at what a run was given, cheaply, before anything is trained or
written: the model's weights are finite; every loader yields batches in a form ordercomp reads
(:func:`ordercomp.data.unpack`), with finite floating-point inputs whose channels and size the
model runs on, and large enough for its downsampling (:func:`check_input_size`); every label is an
integer class index of the model (all of them when the
dataset's labels can be read without loading images, else batch by batch as training and
evaluation meet them, before the batch is used); the run directory can be written. Each failure
is one typed error naming the argument, what was expected and what was found.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import checkpoint, data
from ..checks import describe
from ..data.datasets import labels_of
from ..errors import ArgumentTypeError, ConfigError, DataError, ModelError, OrdercompError, RunDirError, reason
from ..nn import Output
from ..nn.introspect import final_logits

__all__ = ["check_inputs", "check_loaders", "check_run", "check_weights", "check_iterable", "check_loader", "check_writable", "check_input_size",
           "check_probe_cache"]


def check_weights(model, name: str = "model") -> nn.Module:
    """``model`` if it is an ``nn.Module`` whose floating-point parameters and buffers are all finite."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for key, t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                nan = int(torch.isnan(t).sum())
                raise ModelError(f"{name}: {kind} {key!r} must be finite, found {nan} NaN and "
                                 f"{int((~torch.isfinite(t)).sum()) - nan} infinite values")
    return model


def _first_layer(model: nn.Module) -> Optional[nn.Module]:
    """The first convolution or linear layer in module order (what the input meets first in a CNN)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return m
    return None


def _check_inputs(x, model: nn.Module, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name}: inputs must be a tensor, got {describe(x)}")
    if not x.is_floating_point():
        raise DataError(f"{name}: inputs must be a floating-point tensor (normalised images), got {x.dtype}")
    if len(x) == 0:
        raise DataError(f"{name}: the first batch holds no inputs (shape {tuple(x.shape)})")
    data.check_finite(x, name)
    first = _first_layer(model)
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = next(d for kind, d in ((nn.Conv1d, 3), (nn.Conv2d, 4), (nn.Conv3d, 5)) if isinstance(first, kind))
        if x.dim() != dims:
            layout = {3: "[batch, channels, length]", 4: "[batch, channels, height, width]",
                      5: "[batch, channels, depth, height, width]"}[dims]
            raise DataError(f"{name}: inputs must be {layout} for the model's first convolution, "
                            f"got shape {tuple(x.shape)}")
        if x.shape[1] != first.in_channels:
            raise DataError(f"{name}: inputs must have {first.in_channels} channel(s), as the model's first "
                            f"convolution expects; got {x.shape[1]} (shape {tuple(x.shape)})")
    return x


def check_iterable(loader, name: str):
    """``loader`` if it can be iterated (without starting it)."""
    if not (hasattr(type(loader), "__iter__") or hasattr(type(loader), "__getitem__")) or isinstance(loader, (str, bytes)):
        raise ArgumentTypeError(f"{name} must be an iterable of batches (e.g. a DataLoader), "
                                f"got {type(loader).__name__}")
    return loader


def check_loader(loader, name: str, model: nn.Module, output: Output = None, classes: Optional[int] = None) -> int:
    """Checks the first batch of ``loader`` against ``model`` and every readable label; the
    model's number of classes. ``classes``: the data's class count, when known; a model with
    another is refused. Otherwise a warning says when the readable labels leave the model's last
    classes unused (a 100-class model on 10-class data scores near 0 % without being wrong in form)."""
    batches = iter(check_iterable(loader, name))
    first = next(batches, None)
    if first is None:
        raise DataError(f"{name} yielded no batches")
    x, y, _ = data.unpack(first, name)
    x = _check_inputs(x, model, name)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        logits = final_logits(model, x[:2].to(device), output)
    except OrdercompError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise DataError(f"{name}: the model cannot run on its inputs of shape {tuple(x.shape)}: {reason(exc)}") from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"model must return logits [batch, classes], got shape {shape}")
    found = int(logits.shape[1])
    if x.dim() == 4:
        check_input_size(model, x[:1].to(device), name, output)
    data.check_labels(y, found, name)
    labels = _readable_labels(loader)
    if labels is not None:
        data.check_labels(labels, found, f"{name} (its dataset's labels)")
    if classes is not None and found != classes:
        raise DataError(f"the model has {found} classes but the data has {classes}: give a model made for this data")
    if labels is not None:
        used = int(labels.max()) + 1 if labels.numel() else 0
        if classes is None and 0 < used < found:
            warnings.warn(f"{name}: the labels use classes 0..{used - 1} but the model has {found} outputs; "
                          "is the model made for this data?", stacklevel=2)
    return found


def _downsampling(model: nn.Module, x: torch.Tensor, output: Output) -> List[Tuple[str, int, int, int]]:
    """``(layer, smaller side of its input, stride, kernel)`` of every strided 2-D convolution or
    pooling ``model`` runs on ``x`` (one eval-mode pass)."""
    seen, hooks = [], []
    for layer_name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride, kernel = (_pair(m.stride or m.kernel_size), _pair(m.kernel_size))
            if max(stride) > 1:
                hooks.append(m.register_forward_hook(
                    lambda mod, args, out, n=layer_name, st=max(stride), k=max(kernel):
                    seen.append((n, min(args[0].shape[-2:]), st, k))))
    try:
        final_logits(model, x, output)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def check_input_size(model: nn.Module, x: torch.Tensor, name: str, output: Output = None) -> None:
    """Refuses inputs so small that a strided layer of ``model`` gets a map smaller than its stride
    (it downsamples a single pixel), and warns when one gets a map smaller than its kernel (the
    model sees little of each image); both say the smallest input size that avoids it."""
    def first(size: int, rule) -> Optional[Tuple[str, int, int, int]]:
        try:
            seen = _downsampling(model, x.new_zeros(1, x.shape[1], size, size), output)
        except (RuntimeError, ValueError, IndexError, TypeError):
            return ("", 0, 1, 1)  # the model cannot run at this size at all
        return next((s for s in seen if rule(s)), None)

    def smallest(rule) -> Optional[int]:
        hi = min(x.shape[-2:])
        while first(hi, rule) is not None:
            if hi >= 4096:
                return None
            hi *= 2
        lo = max(1, hi // 2)
        while lo < hi:  # first(hi) passes
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if first(mid, rule) is None else (mid + 1, hi)
        return hi

    h, w = x.shape[-2:]
    seen = _downsampling(model, x, output)
    for rule, fatal in ((lambda s: s[1] < s[2], True), (lambda s: s[1] < s[3], False)):
        hit = next((s for s in seen if rule(s)), None)
        if hit is None:
            continue
        layer, side, stride, kernel = hit
        size = smallest(rule)
        what = (f"{name}: inputs of {h}x{w} are too small for the model: its layer {layer!r} (stride {stride}, "
                f"kernel {kernel}) gets a map of {side} pixel(s) across")
        fix = f"the smallest input size that avoids it is {size}x{size}" if size else "no input size avoids it"
        if fatal:
            raise DataError(f"{what}, smaller than its stride; {fix} (resize the images, or give a model made for them)")
        warnings.warn(f"{what.split(': ', 1)[1]}, smaller than its kernel, so it sees little of each image; {fix}",
                      stacklevel=3)  # said once for all loaders
        return


def _readable_labels(loader) -> Optional[torch.Tensor]:
    dataset = getattr(loader, "dataset", None)
    try:
        return labels_of(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset has no length
        return None


def check_writable(path, name: str = "out") -> None:
    """Refuses a run directory that cannot be created or written, before anything runs."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{name}: {path} is a file, not a directory")
    checkpoint.check_creatable(path, name, RunDirError)


def check_probe_cache(path, config) -> None:
    """``probe_cache`` (:class:`~.probes.SharedProbes`): for budgeted runs, a directory that can be written."""
    if path is None:
        return
    if not config.target_loss:
        raise ConfigError("probe_cache shares the probes of budgeted runs: it needs config.target_loss (an "
                          "accuracy budget)")
    check_writable(path, "probe_cache")


def check_run(model: nn.Module, loaders: Dict[str, object], *, output: Output = None, out=None,
              others: Optional[Dict[str, Optional[nn.Module]]] = None, classes: Optional[int] = None) -> int:
    """The probe before any training: ``model`` (and ``others``, e.g. the reference and the
    student) finite, each of ``loaders`` (``{"train_loader": ..., ...}``, None entries skipped)
    fit for the model (with ``classes`` classes, when the data's count is known), ``out``
    writable. Returns the model's number of classes."""
    for name, loader in loaders.items():
        if loader is not None:
            check_iterable(loader, name)
    check_weights(model)
    for name, other in (others or {}).items():
        if other is not None:
            check_weights(other, name)
    check_writable(out)
    found = None
    for name, loader in loaders.items():
        if loader is not None:
            found = check_loader(loader, name, model, output, classes)
    return found


def check_inputs(model: nn.Module, loaders: Dict[str, Any], config, *, reference=None, metric=None,
                 out=None, classes: Optional[int] = None, data_label: Optional[str] = None) -> None:
    """The pre-flight check of a run, coded once (:meth:`ordercomp.pipeline.Run.open`,
    :func:`ordercomp.search_order`): the metric, the models (``model``, ``reference``, a given
    student) finite, every loader fit for the model, in the order given (a training split carved
    from ``train_loader`` later is part of it), ``out`` writable. A data error names
    ``data_label`` when given."""
    if metric is not None and not callable(metric):
        raise ArgumentTypeError(f"metric must be a callable (model, loader) -> float, got {type(metric).__name__}")
    student = config.distill.student if isinstance(config.distill.student, nn.Module) else None
    with _naming(data_label):
        check_run(model, loaders, output=config.output, out=out,
                  others={"reference": reference, "distill.student": student}, classes=classes)


def check_loaders(model: nn.Module, loaders: Dict[str, Any], config, *, classes: Optional[int] = None,
                  data_label: Optional[str] = None) -> None:
    """The loaders' part of :func:`check_inputs` alone (e.g. the training data, checked last)."""
    with _naming(data_label):
        for name, loader in loaders.items():
            if loader is not None:
                check_loader(loader, name, model, config.output, classes)


@contextlib.contextmanager
def _naming(data_label: Optional[str]):
    """Data errors of the block name ``data_label`` first, when given."""
    try:
        yield
    except DataError as e:
        if data_label is None:
            raise
        raise DataError(f"{data_label}: {e}") from e
