"""Public ops: argument checks, dispatch to the compiled kernels, fake kernels and autograd.

Every op has a pure-PyTorch twin in :mod:`ordercomp.reference`; it is used when the compiled
library is missing or disabled, and for dtype/device combinations the kernels do not cover
(e.g. float64 on CPU). Both paths give the same values and the same gradients, NaN and inf
included (each op's docstring says what it does with them). Every argument the kernels would
refuse is refused here first, with a message naming it; the kernels' own checks are a last line
of defence.
"""

from __future__ import annotations

import math

import torch

from . import _ext, checks, reference
from .errors import ArgumentTypeError, ConfigError

__all__ = ["fake_quant_act", "quantize_weight", "exit_check", "accumulate_bitops", "CRITERIA"]

CRITERIA = ("maxprob", "entropy")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_covers(t: torch.Tensor) -> bool:
    if t.device.type == "cpu":
        return _ext.COMPILED and t.dtype == torch.float32
    if t.device.type == "cuda":
        return _ext.CUDA and t.dtype in _CUDA_DTYPES
    return False


def _dense(name: str, value, floating: bool = True) -> torch.Tensor:
    """``value`` if it is a dense (strided) tensor, floating-point with ``floating``: no kernel takes another layout."""
    checks.tensor(name, value, floating=floating)
    if value.layout != torch.strided:
        raise ArgumentTypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, the precision the kernels compute in (may be 0 or inf)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ConfigError(f"tensors must be on one device, got {listed}")


# --------------------------------------------------------------------------- activation fake-quant


def _check_alpha_value(value: float, allowed: str) -> None:
    """alpha must be finite and > 0, also once rounded to the float32 the kernels compute in."""
    ok = math.isfinite(value) and value > 0
    value32 = _as_float32(value) if ok else value
    if not (ok and math.isfinite(value32) and value32 > 0):
        rounded = f" ({value32:g} in float32, the kernels' precision)" if ok else ""
        raise ConfigError(f"alpha must be {allowed}, got {value!r}{rounded}")


def _as_alpha(alpha, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(alpha, torch.Tensor):
        allowed = "a finite number > 0 or a one-element tensor"
        if not checks.is_real(alpha):
            raise ConfigError(f"alpha must be {allowed}, got {alpha!r}")
        _check_alpha_value(float(alpha), allowed)
        return torch.tensor(float(alpha), dtype=torch.float32, device=x.device)
    _dense("alpha", alpha)
    if alpha.numel() != 1:
        raise ConfigError(f"alpha must hold exactly one value, got shape {tuple(alpha.shape)}")
    _check_same_device(x=x, alpha=alpha)
    # The value check reads alpha on the host: done for CPU tensors only, so CUDA never synchronises.
    if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_alpha_value(float(alpha.detach().reshape(())), "a finite number > 0")
    return alpha


class _RefFakeQuantAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, bits, signed):
        out, region = reference.fake_quant_act(x, alpha, bits, signed)
        ctx.save_for_backward(region)
        ctx.signed = signed
        ctx.alpha_meta = (alpha.shape, alpha.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (region,) = ctx.saved_tensors
        grad_x, grad_alpha = reference.fake_quant_act_backward(grad, region, ctx.signed)
        shape, dtype = ctx.alpha_meta
        return grad_x, grad_alpha.reshape(shape).to(dtype), None, None


def fake_quant_act(x: torch.Tensor, alpha, bits: int, signed: bool = False) -> torch.Tensor:
    """k-bit uniform activation fake-quant, clipped to [0, alpha] (or [-alpha, alpha] if signed).

    ``alpha`` is a finite float > 0 (also in float32) or a one-element tensor; when it requires
    grad it receives the PACT gradient. A CPU ``alpha`` that is not finite and > 0 is refused; a
    CUDA one is not read back (no host sync), and a bad one gives NaN outputs. The input gradient
    is straight-through inside the clip range and zero outside. ``bits`` is 1..16 (2..16 when
    ``signed``, which keeps zero and 2^(k-1)-1 levels per side). ``+-inf`` inputs clip; a NaN
    input gives NaN, counts as inside the range (its gradient passes to ``x``) and gives ``alpha``
    nothing.
    """
    _dense("x", x)
    checks.bits("bits", bits, 2 if signed else 1, 16)
    alpha = _as_alpha(alpha, x)
    if _kernel_covers(x):
        return torch.ops.ordercomp.fake_quant_act(x, alpha, bits, bool(signed))[0]
    return _RefFakeQuantAct.apply(x, alpha, bits, bool(signed))


# --------------------------------------------------------------------------- weight quantizer


class _RefQuantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits):
        ctx.save_for_backward(w)
        ctx.bits = bits
        return reference.quantize_weight(w, bits)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return reference.quantize_weight_backward(grad, w, ctx.bits), None


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantizer (k >= 2: tanh-normalised uniform; k = 1: sign * mean|w|; k = 32: identity).

    The backward is straight-through for the rounding and exact for everything else; see
    :func:`ordercomp.reference.quantize_weight_backward`. ``+-inf`` weights map to ``+-1`` (k >= 2);
    one NaN weight makes the whole output NaN (k = 1 and k >= 2; the scale is NaN), and so every
    gradient (k >= 2).
    """
    _dense("w", w)
    checks.bits("bits", bits, 1, 32)
    if _kernel_covers(w):
        return torch.ops.ordercomp.quantize_weight(w, bits)
    return _RefQuantizeWeight.apply(w, bits)


# --------------------------------------------------------------------------- early exit


def exit_check(logits: torch.Tensor, threshold: float, criterion: str = "maxprob"):
    """Early-exit decision for logits [B, C] in one pass.

    Returns ``(confidence [B], prediction [B] int64, exit_mask [B] bool)``. ``maxprob``: confidence
    is the largest softmax probability; ``entropy``: ``1 - H(softmax)/log(C)``. An input exits
    when its confidence is >= ``threshold`` (in [0, 1]). Stable for arbitrarily large logits.
    A ``-inf`` logit has probability 0; a row with any NaN, any ``+inf`` or only ``-inf`` logits
    has NaN confidence and never exits, and its prediction is ``torch.argmax``'s (the first NaN).
    """
    _dense("logits", logits)
    if logits.dim() != 2:
        raise ConfigError(f"logits must be 2-D [batch, classes], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ConfigError("logits must have at least one class, got 0 columns")
    checks.number("threshold", threshold, low=0, high=1)
    checks.one_of("criterion", criterion, CRITERIA)
    if _kernel_covers(logits):
        return torch.ops.ordercomp.exit_check(logits, float(threshold), criterion)
    return reference.exit_check(logits, float(threshold), criterion)


_INT64_MAX = torch.iinfo(torch.int64).max


def _check_bitops(bitops, counter: torch.Tensor, active_mask: torch.Tensor) -> float:
    """``bitops`` as the float the kernel takes, refused where the counter's dtype cannot add it exactly."""
    value = checks.number("bitops", bitops, low=0)
    if counter.dtype == torch.float32 and math.isinf(_as_float32(value)):
        limit = torch.finfo(torch.float32).max
        raise ConfigError(f"bitops must be at most {limit:g} for a float32 counter, got {bitops!r}")
    if counter.dtype != torch.int64:
        return value
    if not value.is_integer():
        raise ConfigError(f"bitops must be a whole number for an int64 counter, got {bitops!r}")
    exact = int(bitops)
    if exact > _INT64_MAX:
        raise ConfigError(f"bitops must be at most 2**63 - 1 for an int64 counter, got {bitops!r}")
    if int(value) != exact:
        raise ConfigError(f"bitops must be an integer that float64 holds exactly for an int64 counter, got {bitops!r}")
    # Overflow of the sum is checked where reading the counter costs no device sync: on the CPU.
    if counter.device.type == "cpu" and not torch.compiler.is_compiling() and exact > 0:
        active = counter[active_mask]
        top = int(active.max()) if active.numel() else 0
        if top > _INT64_MAX - exact:
            raise ConfigError(
                f"bitops must keep the int64 counter at most 2**63 - 1, got {bitops!r} for a counter entry of {top}"
            )
    return value


def accumulate_bitops(counter: torch.Tensor, active_mask: torch.Tensor, bitops: float) -> torch.Tensor:
    """Adds ``bitops`` to ``counter[i]`` (in place) for each input ``i`` whose mask is True.

    ``counter`` is a 1-D float64 (or float32, or int64) tensor, one entry per input of the batch;
    after a dynamic early-exit forward its mean is the exact expected BitOps of the batch. Returns
    ``counter``. ``bitops`` is a finite number >= 0; for an int64 counter a whole number the sum
    cannot overflow (checked for CPU counters; a CUDA one is not read back). A view that is not
    contiguous (e.g. ``c[::2]``) is updated in place by the reference path.
    """
    if not isinstance(counter, torch.Tensor) or counter.dim() != 1:
        got = f"shape {tuple(counter.shape)}" if isinstance(counter, torch.Tensor) else type(counter).__name__
        raise ConfigError(f"counter must be a 1-D tensor with one entry per input, got {got}")
    if counter.dtype not in (torch.float64, torch.float32, torch.int64):
        raise ArgumentTypeError(f"counter must be float64, float32 or int64, got {counter.dtype}")
    _dense("counter", counter, floating=False)
    if counter.requires_grad:
        raise ConfigError("counter must not require grad (it is a tally updated in place), got requires_grad=True")
    if counter.numel() > 1 and counter.stride(0) == 0:
        raise ConfigError("counter must not be an expanded view (its entries would share one element), got stride 0")
    if not isinstance(active_mask, torch.Tensor) or active_mask.dtype != torch.bool:
        got = active_mask.dtype if isinstance(active_mask, torch.Tensor) else type(active_mask).__name__
        raise ArgumentTypeError(f"active_mask must be a bool tensor, got {got}")
    _dense("active_mask", active_mask, floating=False)
    if active_mask.shape != counter.shape:
        raise ConfigError(f"active_mask must have the counter's shape {tuple(counter.shape)}, got {tuple(active_mask.shape)}")
    _check_same_device(counter=counter, active_mask=active_mask)
    value = _check_bitops(bitops, counter, active_mask)
    device = counter.device.type
    kernel = (device == "cpu" and _ext.COMPILED) or (device == "cuda" and _ext.CUDA)
    if kernel and counter.is_contiguous():
        torch.ops.ordercomp.accumulate_bitops(counter, active_mask, value)
    else:
        reference.accumulate_bitops(counter, active_mask, value)
    return counter


# --------------------------------------------------------------------------- registrations


def _register() -> None:
    """Fake kernels (for torch.compile / meta tensors) and autograd of the compiled ops."""
    lib = "ordercomp::"

    @torch.library.register_fake(lib + "fake_quant_act")
    def _(x, alpha, bits, signed):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty(
            x.shape, dtype=torch.int8, device=x.device
        )

    @torch.library.register_fake(lib + "fake_quant_act_backward")
    def _(grad, region, signed):
        return torch.empty_like(grad, memory_format=torch.contiguous_format), grad.new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "quantize_weight")
    def _(w, bits):
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "quantize_weight_backward")
    def _(grad, w, bits):
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "exit_check")
    def _(logits, threshold, criterion):
        b = logits.shape[0]
        return (
            logits.new_empty((b,)),
            logits.new_empty((b,), dtype=torch.int64),
            logits.new_empty((b,), dtype=torch.bool),
        )

    @torch.library.register_fake(lib + "accumulate_bitops")
    def _(counter, mask, bitops):
        return None

    def fq_setup(ctx, inputs, output):
        _, alpha, _, signed = inputs
        ctx.save_for_backward(output[1])
        ctx.signed = signed
        ctx.alpha_meta = (alpha.shape, alpha.dtype)

    def fq_backward(ctx, grad_out, _grad_region):
        (region,) = ctx.saved_tensors
        grad_x, grad_alpha = torch.ops.ordercomp.fake_quant_act_backward(grad_out.contiguous(), region, ctx.signed)
        shape, dtype = ctx.alpha_meta
        return grad_x, grad_alpha.reshape(shape).to(dtype), None, None

    torch.library.register_autograd(lib + "fake_quant_act", fq_backward, setup_context=fq_setup)

    def qw_setup(ctx, inputs, output):
        w, bits = inputs
        ctx.save_for_backward(w)
        ctx.bits = bits

    def qw_backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return torch.ops.ordercomp.quantize_weight_backward(grad.contiguous(), w, ctx.bits), None

    torch.library.register_autograd(lib + "quantize_weight", qw_backward, setup_context=qw_setup)


if _ext.COMPILED:
    _register()
