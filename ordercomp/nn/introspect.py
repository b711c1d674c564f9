"""Model introspection: the final classifier, its input features, and the logits of every exit."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..errors import ModelError
from .exits import ExitNet

__all__ = ["final_classifier", "PenultimateFeatures", "exit_outputs"]


def final_classifier(model: nn.Module) -> nn.Linear:
    """The linear layer producing the model's final logits.

    ExitNet: the final exit's classifier; a model with a ``classifier`` attribute: its last
    ``nn.Linear``; otherwise the last ``nn.Linear`` registered in the model.
    """
    if isinstance(model, ExitNet):
        layer = model.classifiers()[-1]
    else:
        scope = model.classifier if isinstance(getattr(model, "classifier", None), nn.Module) else model
        layers = [m for m in scope.modules() if isinstance(m, nn.Linear)]
        layer = layers[-1] if layers else None
    if not isinstance(layer, nn.Linear):
        raise ModelError(f"{type(model).__name__} has no final nn.Linear classifier to take features from")
    return layer


class PenultimateFeatures:
    """Captures the input of a model's final classifier on every forward (a forward pre-hook)."""

    def __init__(self, model: nn.Module):
        self.layer = final_classifier(model)
        self.features: Optional[torch.Tensor] = None
        self._handle = self.layer.register_forward_pre_hook(self._hook)

    @property
    def dim(self) -> int:
        return self.layer.in_features

    def _hook(self, module, args) -> None:
        self.features = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


def exit_outputs(
    model: nn.Module, x: torch.Tensor, detach_heads: bool = True, final: bool = True
) -> List[torch.Tensor]:
    """Logits of every exit, ``[head_0, ..., final]``; a plain model gives ``[logits]``.

    With ``detach_heads`` the heads read detached backbone features: their losses train the
    heads only, so the backbone keeps serving the final classifier (heads are always trained
    on a fixed body, as in the early-exit stage). ``final=False`` skips the last segment of an
    ExitNet (head-only training does not need it).
    """
    if not isinstance(model, ExitNet):
        out = model(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    outs = []
    for segment, head in zip(model.segments, model.heads):
        x = segment(x)
        outs.append(head(x.detach() if detach_heads else x))
    if final:
        outs.append(model.segments[-1](x))
    return outs
