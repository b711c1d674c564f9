"""MACs, BitOps and storage accounting (DESIGN.md, "Metrics").

:func:`profile` runs the model once on an example input with forward hooks on every conv and
linear layer (``isinstance``, so quantized subclasses count too) and returns a :class:`Profile`:

- MACs per input: conv = k_h * k_w * (C_in / groups) * C_out * H_out * W_out, linear = in * out.
  BatchNorm, activations, pooling and residual adds are not counted.
- Bits: a layer with integer attributes ``w_bits`` and ``a_bits`` (``ordercomp.nn.QuantConv2d``,
  ``QuantLinear``) computes at those widths, any other layer at 32 x 32.
  BitOps = MACs * w_bits * a_bits.
- Storage: quantized weights at ``w_bits``, every other parameter (bias, BatchNorm, ...) at 32.

For an exit network (``segments`` and ``heads``, both ``nn.ModuleList``, as
``ordercomp.nn.ExitNet``) the profile also gives the BitOps of every segment and head, and the
cost of leaving at each exit; :func:`expected_bitops` turns those into the expected cost of
dynamic inference. :func:`compression_ratios` gives BitOpsCR and CR.

``python -m ordercomp.bitops resnet34`` prints the table of a zoo model.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import checks
from .errors import ArgumentTypeError, ConfigError, ModelError

__all__ = ["LayerRecord", "Profile", "profile", "exit_costs", "expected_bitops", "compression_ratios"]

FLOAT_BITS = 32
COUNTED, NOT_RUN, NOT_COUNTED = "counted", "not run", "not counted"
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)

Number = Union[int, float]


@dataclass
class LayerRecord:
    """One conv / linear layer, or a module holding parameters that is not counted.

    ``status``: ``"counted"`` (conv / linear that ran), ``"not run"`` (conv / linear the forward
    never called: no MACs, its parameters still stored) or ``"not counted"`` (a module of another
    type holding its own parameters, e.g. a custom layer: its work is unknown, its parameters
    count at 32 bits). ``macs`` and ``bitops`` are per input, summed over ``calls``.
    ``w_bits`` / ``a_bits`` are None for not-counted modules.
    """

    name: str
    type: str
    status: str
    macs: Number
    params: int
    w_bits: Optional[int]
    a_bits: Optional[int]
    bitops: Number
    storage_bits: int
    calls: int
    output_shape: Optional[Tuple[int, ...]] = None


@dataclass
class Profile:
    """Totals and per-layer records of one model on one example input (all per input).

    ``params`` and ``storage_bits`` cover every parameter of the model (shared ones once),
    BatchNorm included; ``policy`` maps each quantized layer (w_bits or a_bits below 32) to
    ``(w_bits, a_bits)``. For exit networks ``segment_bitops`` (K+1) and ``head_bitops`` (K)
    are the cost of each piece, the pair ``ExitNet.infer(bitops=...)`` takes; else None.
    """

    macs: Number
    params: int
    bitops: Number
    storage_bits: int
    layers: List[LayerRecord]
    policy: Dict[str, Tuple[int, int]]
    input_shape: Tuple[int, ...]
    segment_bitops: Optional[List[Number]] = None
    head_bitops: Optional[List[Number]] = None

    @property
    def exit_bitops(self) -> Optional[List[Number]]:
        """BitOps of an input leaving at each exit: segments 0..i plus heads 0..i; the last entry
        (the final classifier) is every segment and every head. None without exits."""
        if self.segment_bitops is None:
            return None
        costs, total = [], 0
        for segment, head in zip(self.segment_bitops, self.head_bitops):
            total += segment + head
            costs.append(total)
        costs.append(total + self.segment_bitops[-1])
        return costs

    def to_dict(self) -> dict:
        """Everything as plain JSON-able values."""
        out = asdict(self)
        out["policy"] = {name: {"w_bits": w, "a_bits": a} for name, (w, a) in self.policy.items()}
        out["exit_bitops"] = self.exit_bitops
        return out

    def policy_summary(self) -> str:
        """E.g. ``4w8a: 19 layers; 8w8a: 2 layers (conv1, fc); float: 0 layers``."""
        counted = [r for r in self.layers if r.status != NOT_COUNTED]
        groups = Counter((r.w_bits, r.a_bits) for r in counted if r.name in self.policy)
        parts = []
        for (w, a), n in sorted(groups.items()):
            names = [r.name for r in counted if self.policy.get(r.name) == (w, a)]
            listed = f" ({', '.join(names)})" if n <= 3 else ""
            parts.append(f"{w}w{a}a: {n} layer{'s' * (n != 1)}{listed}")
        n_float = len(counted) - sum(groups.values())
        parts.append(f"float: {n_float} layer{'s' * (n_float != 1)}")
        return "; ".join(parts)

    def __str__(self) -> str:
        header = ("layer", "type", "output", "MACs", "params", "bits", "BitOps", "storage", "note")
        rows = []
        for r in self.layers:
            shape = "-" if r.output_shape is None else "x".join(map(str, r.output_shape))
            notes = ([] if r.status == COUNTED else [r.status]) + ([f"{r.calls} calls"] if r.calls > 1 else [])
            rows.append((r.name, r.type, shape, _human(r.macs), _human(r.params), _bits_label(r.w_bits, r.a_bits),
                         _human(r.bitops), _human(r.storage_bits), ", ".join(notes)))
        other = self.params - sum(r.params for r in self.layers)
        if other:
            rows.append(("(other parameters)", "norm layers", "-", "-", _human(other), "float", "-", _human(32 * other),
                         ""))
        rows.append(("total", "", "", _human(self.macs), _human(self.params), "", _human(self.bitops),
                     _human(self.storage_bits), ""))
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        right = {3, 4, 6, 7}

        def line(row):
            cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(header))
        out = [f"input {tuple(self.input_shape)}, counts per input", line(header), rule]
        out += [line(r) for r in rows[:-1]] + [rule, line(rows[-1]), ""]
        out.append(
            f"MACs {self.macs:,}  params {self.params:,}  BitOps {self.bitops:,}  storage {self.storage_bits:,} bits"
        )
        out.append(f"quantization: {self.policy_summary()}")
        if self.exit_bitops is not None:
            out.append("BitOps up to each exit: " + ", ".join(_human(c) for c in self.exit_bitops))
        out.append("not counted: BatchNorm, activations, pooling, residual adds (their parameters are in the totals)")
        return "\n".join(out)


def _bits_label(w_bits: Optional[int], a_bits: Optional[int]) -> str:
    if w_bits is None:
        return "-"
    return "float" if (w_bits, a_bits) == (FLOAT_BITS, FLOAT_BITS) else f"{w_bits}w{a_bits}a"


def _human(x: Number) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _per_input(total: int, batch: int) -> Number:
    return total // batch if total % batch == 0 else total / batch


def _bits(name: str, module: nn.Module) -> Tuple[int, int]:
    """``(w_bits, a_bits)`` of a conv / linear layer: its integer attributes, else 32 x 32."""
    w, a = getattr(module, "w_bits", None), getattr(module, "a_bits", None)
    if not all(checks.is_int(b) for b in (w, a)):
        return FLOAT_BITS, FLOAT_BITS
    for attr, b in (("w_bits", w), ("a_bits", a)):
        if not 1 <= b <= FLOAT_BITS:
            raise ModelError(f"{name}.{attr} must be in 1..{FLOAT_BITS}, got {b}")
    return w, a


def _conv_macs(module: nn.modules.conv._ConvNd, inputs, output: torch.Tensor) -> int:
    per_position = math.prod(module.kernel_size)
    if module.transposed:
        return inputs[0].numel() * (module.out_channels // module.groups) * per_position
    return output.numel() * (module.in_channels // module.groups) * per_position


def _macs(module: nn.Module, inputs, output: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_macs(module, inputs, output)
    return output.numel() * module.in_features


def _as_args(example_input) -> Tuple[tuple, int]:
    """Positional arguments for the model and the batch size (first dim of the first tensor)."""
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0 or args[0].shape[0] == 0:
        raise ConfigError(
            "example_input must be a tensor [batch, ...] with batch >= 1, or a tuple of model arguments "
            f"whose first is one; got {type(example_input).__name__}"
        )
    return args, args[0].shape[0]


def _is_exit_net(model: nn.Module) -> bool:
    segments, heads = getattr(model, "segments", None), getattr(model, "heads", None)
    return isinstance(segments, nn.ModuleList) and isinstance(heads, nn.ModuleList) and len(segments) == len(heads) + 1


@torch.no_grad()
def profile(model: nn.Module, example_input) -> Profile:
    """Counts MACs, parameters, BitOps and storage of ``model`` by running it on ``example_input``.

    ``example_input``: a tensor ``[batch, ...]`` or a tuple of positional arguments; counts are
    per input (divided by the batch size). The model runs once in eval mode without gradients
    and is returned to its previous mode; hooks are removed afterwards, nothing is copied.
    Raises ModelError (chaining the original exception) if the model fails on the input.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, batch = _as_args(example_input)
    modules = list(model.named_modules())
    layers = {m: name for name, m in modules if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    other = {
        m: name
        for name, m in modules
        if m not in layers and not isinstance(m, _NORMS) and next(m.parameters(recurse=False), None) is not None
    }
    macs: Dict[nn.Module, int] = {}
    calls: Dict[nn.Module, int] = {}
    shapes: Dict[nn.Module, Tuple[int, ...]] = {}

    def hook(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if module in layers:
            macs[module] = macs.get(module, 0) + _macs(module, inputs, output)
            shapes.setdefault(module, tuple(output.shape[1:]))

    modes = {m: m.training for _, m in modules}
    handles = [m.register_forward_hook(hook) for m in (*layers, *other)]
    try:
        model.eval()
        try:
            model(*args)
        except Exception as e:
            raise ModelError(
                f"{type(model).__name__} failed on the example input of shape {tuple(args[0].shape)}: "
                f"{type(e).__name__}: {e}"
            ) from e
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    tracked = {**layers, **other}
    bits = {m: _bits(name, m) for m, name in layers.items()}
    weight_bits = {id(m.weight): w for m, (w, _) in bits.items()}
    records = []
    for m in [*calls, *(m for m in tracked if m not in calls)]:
        name, own = tracked[m], list(m.parameters(recurse=False))
        params = sum(p.numel() for p in own)
        storage = sum(p.numel() * weight_bits.get(id(p), FLOAT_BITS) for p in own)
        if m in other:
            records.append(LayerRecord(name, type(m).__name__, NOT_COUNTED, 0, params, None, None, 0, storage,
                                       calls.get(m, 0)))
            continue
        w, a = bits[m]
        n_macs = _per_input(macs.get(m, 0), batch)
        records.append(LayerRecord(name, type(m).__name__, COUNTED if m in calls else NOT_RUN, n_macs, params, w, a,
                                   n_macs * w * a, storage, calls.get(m, 0), shapes.get(m)))

    params = list(model.parameters())
    result = Profile(
        macs=sum(r.macs for r in records),
        params=sum(p.numel() for p in params),
        bitops=sum(r.bitops for r in records),
        storage_bits=sum(p.numel() * weight_bits.get(id(p), FLOAT_BITS) for p in params),
        layers=records,
        policy={r.name: (r.w_bits, r.a_bits) for r in records if r.w_bits and min(r.w_bits, r.a_bits) < FLOAT_BITS},
        input_shape=tuple(args[0].shape),
    )
    if _is_exit_net(model):
        result.segment_bitops = [_bitops_under(records, f"segments.{i}.") for i in range(len(model.segments))]
        result.head_bitops = [_bitops_under(records, f"heads.{i}.") for i in range(len(model.heads))]
    return result


def _bitops_under(records: Sequence[LayerRecord], prefix: str) -> Number:
    return sum(r.bitops for r in records if r.name.startswith(prefix))


def _profile_of(model_or_profile, example_input, what: str) -> Profile:
    if isinstance(model_or_profile, Profile):
        return model_or_profile
    if example_input is None:
        raise ConfigError(f"{what}: example_input is needed to profile a model (or pass a Profile)")
    return profile(model_or_profile, example_input)


def exit_costs(model_or_profile: Union[nn.Module, Profile], example_input=None) -> List[Number]:
    """BitOps of an input leaving at each exit (K heads, then the final classifier).

    Leaving at head i costs segments 0..i plus heads 0..i (every head it evaluated); reaching the
    final classifier costs everything. Takes a :class:`Profile` of an exit network, or the
    network and an example input.
    """
    costs = _profile_of(model_or_profile, example_input, "exit_costs").exit_bitops
    if costs is None:
        raise ModelError("exit_costs needs an exit network: a model with `segments` and `heads` (nn.ModuleList, "
                         "one more segment than heads)")
    return costs


def _as_floats(values, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{what} must be a sequence or tensor of numbers, got {type(values).__name__}") from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ConfigError(f"{what} must be non-empty, finite and >= 0, got {values!r}")
    return t


def expected_bitops(exit_costs=None, distribution=None, *, counters=None) -> float:
    """Expected BitOps per input of dynamic inference.

    Either ``exit_costs`` (from :func:`exit_costs`, K+1 numbers) weighted by ``distribution``,
    the number or fraction of inputs leaving at each exit (K+1 numbers, normalised here); or
    ``counters``, the per-input BitOps that ``ExitNet.infer`` accumulates (their mean).
    """
    if counters is not None:
        if exit_costs is not None or distribution is not None:
            raise ConfigError("give either exit_costs and distribution, or counters, not both")
        return float(_as_floats(counters, "counters").mean())
    if exit_costs is None or distribution is None:
        raise ConfigError("give exit_costs and distribution, or counters")
    costs, weights = _as_floats(exit_costs, "exit_costs"), _as_floats(distribution, "distribution")
    if costs.numel() != weights.numel():
        raise ConfigError(f"distribution must have one entry per exit ({costs.numel()}), got {weights.numel()}")
    if float(weights.sum()) == 0:
        raise ConfigError("distribution must not be all zeros")
    return float((costs * weights).sum() / weights.sum())


def compression_ratios(
    original: Union[nn.Module, Profile],
    compressed: Union[nn.Module, Profile],
    example_input=None,
    *,
    expected_bitops: Optional[float] = None,
) -> Dict[str, float]:
    """BitOpsCR and storage CR of ``compressed`` against ``original`` (models or Profiles).

    ``bitops_cr`` = BitOps(original) / BitOps(compressed); ``cr`` = storage bits of the original
    / those of the compressed model. ``expected_bitops`` (e.g. from :func:`expected_bitops`)
    replaces the compressed model's static BitOps, which for an exit network is the cost of
    running every segment and every head. Models need ``example_input``.
    """
    a = _profile_of(original, example_input, "compression_ratios")
    b = _profile_of(compressed, example_input, "compression_ratios")
    bitops = b.bitops if expected_bitops is None else float(expected_bitops)
    if not bitops > 0 or not b.storage_bits > 0:
        raise ModelError(f"compressed BitOps and storage must be > 0, got {bitops} and {b.storage_bits}")
    return {
        "bitops_cr": a.bitops / bitops,
        "cr": a.storage_bits / b.storage_bits,
        "original_bitops": a.bitops,
        "compressed_bitops": bitops,
        "original_storage_bits": a.storage_bits,
        "compressed_storage_bits": b.storage_bits,
    }
