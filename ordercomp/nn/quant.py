"""Quantization-aware layers and the model transform that installs them.

``QuantConv2d`` and ``QuantLinear`` are drop-in subclasses of ``nn.Conv2d`` / ``nn.Linear``:
their forward fake-quantizes the input activation (``a_bits``) and the weight (``w_bits``,
DoReFa) through :mod:`ordercomp.ops`, then runs the ordinary convolution / matmul. Being
subclasses keeps every tool that understands the float layers working on them (Torch-Pruning
slices their weights, ``state_dict`` keys are unchanged apart from ``alpha``). The BitOps
counter reads exactly the integer attributes ``w_bits`` and ``a_bits``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, ops
from ..errors import ArgumentTypeError, ConfigError, TrainingError
from .exits import ExitNet
from .modes import evaluating

__all__ = [
    "QuantConv2d", "QuantLinear", "QuantLayer", "quantize_model", "quant_report", "replace_modules", "check_w_bits",
    "check_a_bits",
]

FLOAT_BITS = 32
Bits = Tuple[int, int]
Policy = Union[str, Mapping[str, Optional[Bits]], Callable[[str, nn.Module, str], Optional[Bits]]]


def check_w_bits(w_bits) -> int:
    """Validates a weight bit-width: 1..32 (32 = float)."""
    return checks.bits("w_bits", w_bits, 1, FLOAT_BITS)


def check_a_bits(a_bits, signed: bool = False) -> int:
    """Validates an activation bit-width: 1..16 or 32 (= float); signed inputs need at least 2."""
    return checks.bits("a_bits for a signed input" if signed else "a_bits", a_bits, 2 if signed else 1, 16,
                       also=(FLOAT_BITS,))


ALPHA_FLOOR = 1e-3


def _check_alpha(alpha) -> float:
    """A finite clip > 0 that stays so in float32, the precision the ops compute in."""
    value = checks.number("alpha", alpha, low=0, low_open=True)
    stored = float(torch.tensor(value, dtype=torch.float32))
    if not (math.isfinite(stored) and stored > 0):
        raise ConfigError(f"alpha must be a finite number > 0 that float32 holds (about 1.4e-45 to 3.4e38), got {alpha!r}")
    return value


class QuantLayer:
    """Quantization state and behaviour shared by :class:`QuantConv2d` and :class:`QuantLinear`.

    ``alpha`` is the activation clip: a buffer when fixed (DoReFa: 1.0), an ``nn.Parameter``
    when learned (PACT). It is a one-element tensor so it follows ``.to()`` and ``state_dict``.
    A learned clip is used no lower than ``ALPHA_FLOOR`` (:meth:`clip`): one step at a large
    clip gradient can take it below zero, which no quantizer can use; training puts it back on
    the floor, where it still learns.
    """

    w_bits: int
    a_bits: int
    signed_input: bool

    def _init_quant(self, w_bits: int, a_bits: int, signed_input: bool, alpha: float, learn_alpha: bool) -> None:
        self.register_buffer("alpha", torch.empty((), dtype=torch.float32, device=self.weight.device))
        self.w_bits, self.a_bits, self.signed_input, self.learn_alpha = FLOAT_BITS, FLOAT_BITS, False, False
        self.configure(w_bits, a_bits, signed_input=signed_input, alpha=alpha, learn_alpha=learn_alpha)

    def configure(
        self,
        w_bits: Optional[int] = None,
        a_bits: Optional[int] = None,
        *,
        signed_input: Optional[bool] = None,
        alpha: Optional[float] = None,
        learn_alpha: Optional[bool] = None,
    ) -> "QuantLayer":
        """Changes bits / signedness / clip in place (``None`` keeps the current value)."""
        alpha = None if alpha is None else _check_alpha(alpha)
        signed = self.signed_input if signed_input is None else bool(signed_input)
        w_bits = check_w_bits(self.w_bits if w_bits is None else w_bits)
        a_bits = check_a_bits(self.a_bits if a_bits is None else a_bits, signed)
        self.w_bits, self.a_bits, self.signed_input = w_bits, a_bits, signed
        learn = self.learn_alpha if learn_alpha is None else bool(learn_alpha)
        if learn == self.learn_alpha and self.alpha.device == self.weight.device:
            if alpha is not None:
                with torch.no_grad():
                    self.alpha.fill_(alpha)
            return self
        value = self.alpha.detach().clone() if alpha is None else torch.tensor(alpha)
        value = value.to(device=self.weight.device, dtype=torch.float32)
        del self.alpha
        if learn:
            self.alpha = nn.Parameter(value)
        else:
            self.register_buffer("alpha", value)
        self.learn_alpha = learn
        return self

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with (DoReFa-quantized when ``w_bits < 32``)."""
        return self.weight if self.w_bits >= FLOAT_BITS else ops.quantize_weight(self.weight, self.w_bits)

    def clip(self) -> torch.Tensor:
        """The activation clip in use: ``alpha``, a learned one held at ``ALPHA_FLOOR`` or above.
        In training, a learned clip that a step took below the floor is put back on it (through
        ``.data``, which autograd does not track), so its gradient flows again and it can recover."""
        if not self.learn_alpha:
            return self.alpha
        if self.training:
            self.alpha.data.clamp_(min=ALPHA_FLOOR)
        # A learned clip turns non-finite only when training diverged: say that, not "alpha must be finite".
        # (Read on the host for CPU tensors only, as the ops' own check, so CUDA never synchronises.)
        if self.alpha.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(
                torch.isfinite(self.alpha).all()):
            raise TrainingError(f"a learned activation clip became {float(self.alpha.detach().reshape(-1)[0]):g}: "
                                "training diverged; lower lr (or set quantize.learn_alpha=false)")
        return self.alpha.clamp(min=ALPHA_FLOOR)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantizes the input activation to ``a_bits`` in [0, clip] (signed: [-clip, clip])."""
        if self.a_bits >= FLOAT_BITS:
            return x
        return ops.fake_quant_act(x, self.clip(), self.a_bits, self.signed_input)

    def extra_repr(self) -> str:
        clip = "learned" if self.learn_alpha else "fixed"
        return (
            f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
            f"signed_input={self.signed_input}, alpha={clip}"
        )

    @classmethod
    def _float_type(cls) -> type:
        return next(b for b in cls.__mro__ if b.__module__.startswith("torch.nn"))

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        w_bits: int,
        a_bits: int,
        signed_input: bool = False,
        alpha: float = 1.0,
        learn_alpha: bool = False,
    ):
        """Quantized twin of a float layer, sharing its weight and bias ``Parameter`` objects.

        Sharing (not copying) keeps optimizers and other references to the parameters valid.
        """
        base = cls._float_type()
        if type(module) is not base:
            raise ArgumentTypeError(f"module must be a plain {base.__name__}, got {type(module).__name__}")
        q = cls(**cls._ctor_args(module), w_bits=w_bits, a_bits=a_bits, signed_input=signed_input,
                alpha=alpha, learn_alpha=learn_alpha, device="meta")
        q.weight = module.weight
        q.bias = module.bias
        q.configure(alpha=alpha)
        q.train(module.training)
        return q


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input activation and DoReFa-quantized weight."""

    def __init__(self, *args, w_bits: int = 32, a_bits: int = 32, signed_input: bool = False,
                 alpha: float = 1.0, learn_alpha: bool = False, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quant(w_bits, a_bits, signed_input, alpha, learn_alpha)

    @staticmethod
    def _ctor_args(m: nn.Conv2d) -> dict:
        return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode, dtype=m.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized input activation and DoReFa-quantized weight."""

    def __init__(self, *args, w_bits: int = 32, a_bits: int = 32, signed_input: bool = False,
                 alpha: float = 1.0, learn_alpha: bool = False, **kwargs):
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_quant(w_bits, a_bits, signed_input, alpha, learn_alpha)

    @staticmethod
    def _ctor_args(m: nn.Linear) -> dict:
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None,
                    dtype=m.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


def replace_modules(model: nn.Module, replaced: Dict[nn.Module, nn.Module]) -> nn.Module:
    """Puts ``replaced[m]`` wherever module ``m`` sits in ``model`` (every parent); returns the model,
    or its replacement when ``model`` itself is replaced."""
    if model in replaced:
        return replaced[model]
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child in replaced:
                setattr(parent, name, replaced[child])
    return model


def _is_target(m: nn.Module) -> bool:
    return isinstance(m, QuantLayer) or type(m) in (nn.Conv2d, nn.Linear)


def quant_report(model: nn.Module) -> Dict[str, Bits]:
    """``{layer name: (w_bits, a_bits)}`` for every conv / linear layer; float layers read (32, 32)."""
    return {
        name: (m.w_bits, m.a_bits) if isinstance(m, QuantLayer) else (FLOAT_BITS, FLOAT_BITS)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@dataclass
class _InputStats:
    minimum: float = float("inf")
    max_abs: float = 0.0


def _calibrate(model: nn.Module, layers: Dict[nn.Module, str], example_input) -> Dict[nn.Module, _InputStats]:
    """Runs ``example_input`` once and records, per layer, the input range, in execution order."""
    stats: Dict[nn.Module, _InputStats] = {}

    def hook(module, args):
        x = args[0].detach()
        s = stats.setdefault(module, _InputStats())
        if x.numel():
            s.minimum = min(s.minimum, float(x.min()))
            s.max_abs = max(s.max_abs, float(x.abs().max()))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with evaluating(model), torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
    return stats


def _policy_bits(policy: Policy, name: str, module: nn.Module, role: str, w_bits: int, a_bits: int) -> Optional[Bits]:
    if callable(policy) and not isinstance(policy, Mapping):
        return policy(name, module, role)
    if isinstance(policy, Mapping) and name in policy:
        bits = policy[name]
        return tuple(bits) if isinstance(bits, list) else bits  # [w, a] as YAML and JSON give it
    if policy == "all":
        return w_bits, a_bits
    return (8, 8) if role in ("first", "last") else (w_bits, a_bits)


def quantize_model(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    policy: Policy = "first_last_8bit",
    *,
    example_input=None,
    alpha: Union[float, str] = 1.0,
    learn_alpha: bool = False,
    inplace: bool = True,
) -> Tuple[nn.Module, Dict[str, Bits]]:
    """Replaces every ``nn.Conv2d`` / ``nn.Linear`` by its quantized twin; returns ``(model, report)``.

    Layers that are already quantized are re-configured in place (so Q after Q works).
    ``report`` is :func:`quant_report` of the result: ``{name: (w_bits, a_bits)}`` for every
    conv / linear layer, (32, 32) for layers left in float.

    Roles. ``first`` is the first conv / linear layer to run, ``last`` the last one (the final
    classifier); for an :class:`~ordercomp.nn.ExitNet` the classifier of every exit head is a
    ``last`` layer too, because it produces the logits an exit decision is taken on.
    Execution order comes from one forward pass of ``example_input`` (eval mode) when it is
    given, and layers that do not run in it (defined but unused, or auxiliary heads that only
    run in train mode) are left as they are; without it, every layer is quantized in
    registration order (right for models that register layers in the order they run).

    Policy. ``"first_last_8bit"`` (default, as in the paper): first and last layers at 8w8a,
    every other layer at ``w_bits`` / ``a_bits``. ``"all"``: every layer at ``w_bits`` /
    ``a_bits``. A mapping ``{name: (w_bits, a_bits) or None}`` overrides the default for the
    named layers. A callable ``policy(name, module, role)`` returns the bits of every layer.
    ``None`` leaves a layer as it is; (32, 32) keeps a float layer in float.

    Signed activations. Activations are clipped to [0, alpha], which suits post-ReLU inputs. The
    first layer's input (normalised data) is quantized signed. With ``example_input``, every
    layer whose calibration input goes below zero (e.g. the 1x1 expansion conv reading a
    MobileNetV2 linear bottleneck) is signed too, and a signed layer's clip is set to the
    largest calibration |x|, since such inputs have no natural unit range; unsigned layers use
    ``alpha`` (DoReFa: 1.0), or with ``alpha="calibrated"`` their largest input in
    ``example_input`` (post-ReLU activations often exceed 1, and a clip at 1 cuts them off;
    give a few batches of real data). ``learn_alpha`` makes every clip a learned parameter (PACT).
    """
    check_w_bits(w_bits)
    check_a_bits(a_bits)
    if alpha != "calibrated":
        _check_alpha(alpha)
    elif example_input is None:
        raise ConfigError('alpha="calibrated" needs example_input (a few batches of real inputs)')
    if not (policy in ("first_last_8bit", "all") or isinstance(policy, Mapping) or callable(policy)):
        raise ConfigError(f"policy must be 'first_last_8bit', 'all', a mapping or a callable, got {policy!r}")
    if not inplace:
        model = copy.deepcopy(model)

    layers: Dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        if _is_target(m):
            layers.setdefault(m, name)
    if isinstance(policy, Mapping):
        unknown = sorted(set(policy) - set(layers.values()))
        if unknown:
            raise ConfigError(f"policy names layers the model does not have: {unknown}")
    if not layers:
        return model, quant_report(model)

    stats = _calibrate(model, layers, example_input) if example_input is not None else {}
    plan = _plan(model, layers, stats, policy, w_bits, a_bits, alpha)
    replaced: Dict[nn.Module, nn.Module] = {}
    for m, (wb, ab), signed, clip in plan:
        if isinstance(m, QuantLayer):
            m.configure(wb, ab, signed_input=signed, alpha=clip, learn_alpha=learn_alpha)
        elif (wb, ab) != (FLOAT_BITS, FLOAT_BITS):
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            replaced[m] = cls.from_float(m, wb, ab, signed_input=signed, alpha=clip, learn_alpha=learn_alpha)
    model = replace_modules(model, replaced)
    return model, quant_report(model)


def _plan(model: nn.Module, layers: Dict[nn.Module, str], stats: Dict[nn.Module, _InputStats], policy: Policy,
          w_bits: int, a_bits: int, alpha) -> List[Tuple[nn.Module, Bits, bool, Optional[float]]]:
    """``(layer, bits, signed input, clip)`` of every layer the policy quantizes, in execution order."""
    order = list(stats) if stats else list(layers)
    head_classifiers = set(model.classifiers()[:-1]) if isinstance(model, ExitNet) else set()
    last = [m for m in order if m not in head_classifiers][-1]
    plan = []
    for m in order:
        name = layers[m]
        role = "first" if m is order[0] else "last" if m is last or m in head_classifiers else "body"
        bits = _policy_bits(policy, name, m, role, w_bits, a_bits)
        if bits is None:
            continue
        if not (isinstance(bits, tuple) and len(bits) == 2):
            raise ConfigError(f"policy must give (w_bits, a_bits) or None for layer {name!r}, got {bits!r}")
        s = stats.get(m)
        signed = role == "first" or (s is not None and s.minimum < 0) or (
            isinstance(m, QuantLayer) and m.signed_input
        )
        try:
            check_w_bits(bits[0])
            check_a_bits(bits[1], signed)
        except ConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
        if signed and s is not None and s.max_abs > 0:
            clip = s.max_abs
        elif isinstance(m, QuantLayer):
            clip = None
        elif alpha == "calibrated":
            clip = s.max_abs if s is not None and s.max_abs > 0 else 1.0
        else:
            clip = alpha
        plan.append((m, bits, signed, clip))
    return plan
