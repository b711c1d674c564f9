"""Model introspection: the layers producing the logits, the final classifier's input features, and the
logits of every exit."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from ..errors import ModelError
from .exits import ExitNet
from .outputs import Output, select_logits

__all__ = ["final_classifier", "final_logits", "logit_layers", "recording", "PenultimateFeatures", "exit_outputs"]


_LAYERS = (nn.Linear, nn.Conv2d)


@contextlib.contextmanager
def recording(model: nn.Module, train: bool = False) -> Iterator[None]:
    """Every parameter records autograd history, in eval mode (``train``: in train mode, but batch
    norm in eval mode, so that its statistics do not move); modes and flags restored after."""
    modes = {m: m.training for m in model.modules()}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    model.train(train)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, mode in modes.items():
            m.training = mode


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def logit_layers(model: nn.Module, example_input: torch.Tensor, output: Output = None,
                 every_output: bool = False) -> List[nn.Module]:
    """The conv / linear layers that produce ``model``'s logits, found on the autograd graph.

    Runs ``example_input`` once (eval mode) and walks back from the logits (taken from the
    output as ``output`` says) until a conv or linear layer's output is reached: the layers
    found are those whose output reaches the logits through no other such layer (a linear
    classifier, or a 1x1 conv followed by pooling), in execution order. ``every_output``: run in
    train mode instead (see :func:`recording`) and walk back from every tensor the model
    returns too (auxiliary heads, returned features). An ExitNet's are its
    :meth:`~ordercomp.nn.ExitNet.classifiers`.
    """
    if isinstance(model, ExitNet):
        return [m for m in model.classifiers() if m is not None]
    produced_by: Dict[object, nn.Module] = {}
    order: Dict[nn.Module, int] = {}

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            produced_by[out.grad_fn] = module
            order.setdefault(module, len(order))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    try:
        with recording(model, train=every_output):
            out = model(example_input)
            roots = [select_logits(out, output), *(_tensors(out) if every_output else [])]
    finally:
        for h in handles:
            h.remove()
    found, seen, stack = set(), set(), [t.grad_fn for t in roots]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced_by:
            found.add(produced_by[fn])
            continue
        stack.extend(child for child, _ in fn.next_functions)
    if not found:
        raise ModelError(f"no conv or linear layer of {type(model).__name__} produces its logits")
    return sorted(found, key=order.__getitem__)


def final_classifier(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                     output: Output = None) -> nn.Module:
    """The layer producing the model's final logits: a linear layer or a (1x1) conv.

    ExitNet: the final exit's classifier. With ``example_input``: the last of
    :func:`logit_layers`. Without: a model's ``classifier`` attribute's last ``nn.Linear``, or
    the last ``nn.Linear`` registered in the model.
    """
    if isinstance(model, ExitNet):
        layer = model.classifiers()[-1]
    elif example_input is not None:
        layer = logit_layers(model, example_input, output)[-1]
    else:
        scope = model.classifier if isinstance(getattr(model, "classifier", None), nn.Module) else model
        layers = [m for m in scope.modules() if isinstance(m, nn.Linear)]
        layer = layers[-1] if layers else None
    if not isinstance(layer, _LAYERS):
        raise ModelError(f"{type(model).__name__} has no final nn.Linear classifier to take features from")
    return layer


class PenultimateFeatures:
    """Captures the input of a model's final classifier on every forward (a forward pre-hook).

    The features are ``[B, dim]``: flattened for a linear classifier, averaged over space for
    a conv classifier. ``example_input`` / ``output``: see :func:`final_classifier`.
    """

    def __init__(self, model: nn.Module, example_input: Optional[torch.Tensor] = None, output: Output = None):
        self.layer = final_classifier(model, example_input, output)
        self.features: Optional[torch.Tensor] = None
        self._handle = self.layer.register_forward_pre_hook(self._hook)

    @property
    def dim(self) -> int:
        return self.layer.in_features if isinstance(self.layer, nn.Linear) else self.layer.in_channels

    def _hook(self, module, args) -> None:
        x = args[0]
        self.features = x.flatten(1) if isinstance(module, nn.Linear) else x.flatten(2).mean(dim=2)

    def remove(self) -> None:
        self._handle.remove()


def exit_outputs(
    model: nn.Module, x: torch.Tensor, detach_heads: bool = True, final: bool = True, output: Output = None
) -> List[torch.Tensor]:
    """Logits of every exit, ``[head_0, ..., final]``; a plain model gives ``[logits]``, taken from
    its output as ``output`` says (see :func:`~ordercomp.nn.outputs.select_logits`).

    With ``detach_heads`` the heads read detached backbone features: their losses train the
    heads only, so the backbone keeps serving the final classifier (heads are always trained
    on a fixed body, as in the early-exit stage). ``final=False`` skips the last segment of an
    ExitNet (head-only training does not need it).
    """
    if not isinstance(model, ExitNet):
        return [select_logits(model(x), output)]
    outs = []
    for segment, head in zip(model.segments, model.heads):
        x = segment(x)
        outs.append(head(x.detach() if detach_heads else x))
    if final:
        outs.append(model.segments[-1](x))
    return outs


def final_logits(model: nn.Module, x: torch.Tensor, output: Output = None) -> torch.Tensor:
    """The final exit's logits on ``x``, in eval mode without gradients (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return exit_outputs(model, x, output=output)[-1]
    finally:
        model.train(was_training)
