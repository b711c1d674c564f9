"""Which part of a model's output is the logits: :func:`select_logits`.

Models return their logits in many forms: a tensor, a tuple whose first element is the logits
(often with auxiliary outputs in ``train()`` mode only), a dict with a ``"logits"`` key, or
something of their own. An ``output`` setting says where the logits are: None (the rules
above), a key, an index, or (from Python only) a callable ``output(model_output) -> logits``.
A tensor is always taken as the logits, whatever the setting, so one setting serves a model
and its students alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Union

import torch

from .. import checks
from ..errors import ArgumentTypeError, ModelError

__all__ = ["Output", "check_output", "select_logits", "pick"]

Output = Union[None, str, int, Callable[[Any], torch.Tensor]]

_HOW = "set output to a key, an index or (from Python) a callable that returns the logits"


def check_output(output) -> Output:
    """``output`` must be None, a key (str), an index (int) or a callable."""
    if output is None or isinstance(output, str) or checks.is_int(output) or callable(output):
        return output
    raise ArgumentTypeError(
        f"output must be None, a key (str), an index (int) or a callable, got {type(output).__name__} {output!r}"
    )


def pick(out, output: Output):
    """The part of model output ``out`` that ``output`` names (a tensor is not special here)."""
    if callable(output):
        return output(out)
    if output is None:
        if isinstance(out, (tuple, list)) and out:
            return out[0]
        if isinstance(out, Mapping) and "logits" in out:
            return out["logits"]
        raise ModelError(f"cannot tell the logits in the model's output, {checks.describe(out)}: {_HOW}")
    if isinstance(output, str):
        if isinstance(out, Mapping):
            if output not in out:
                raise ModelError(f"output {output!r} is not a key of the model's output, {checks.describe(out)}")
            return out[output]
        if hasattr(out, output):
            return getattr(out, output)
        raise ModelError(f"output {output!r} is a key, but the model returns {checks.describe(out)}")
    if isinstance(out, (tuple, list)):
        if not -len(out) <= output < len(out):
            raise ModelError(f"output {output} is out of range for the model's output, {checks.describe(out)}")
        return out[output]
    raise ModelError(f"output {output} is an index, but the model returns {checks.describe(out)}")


def select_logits(out, output: Output = None) -> torch.Tensor:
    """The logits in model output ``out`` (see the module docstring for ``output``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = pick(out, check_output(output))
    if not isinstance(logits, torch.Tensor):
        raise ModelError(
            f"the model's output gives {checks.describe(logits)} as logits, not a tensor "
            f"(from {checks.describe(out)}); {_HOW}"
        )
    return logits
