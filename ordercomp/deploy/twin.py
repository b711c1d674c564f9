"""The export twin of a model: batch norm folded, quantized layers in their integer form.

:func:`rewrite` copies the model and, part by part (the model, or each segment and head of an
ExitNet), traces it with torch.fx to find every convolution that feeds a batch norm alone, folds
that batch norm into it, and replaces each quantized layer by an :class:`ExportConv` /
:class:`ExportLinear` holding its specs (:mod:`.quant`). The twin computes what the model
computes; exported, it gives the QDQ graph.

In the ``fast`` graph every quantized convolution's output must be quantized, so that ONNX
Runtime fuses it into ``QLinearConv``. When the output flows, through ReLUs only, into a single
8-bit unsigned input, that input's own quantization serves (ONNX Runtime drops the ReLU).
Otherwise a :class:`RequantPoint` goes after the convolution, or after the ReLUs that follow
it (a range of [0, max] then, twice as fine), with a range calibrated on real inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Collection, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError
from ..nn import ExitNet, QuantLayer
from ..nn.points import trace
from ..nn.quant import FLOAT_BITS, replace_modules
from .quant import (ActQuant, Requant, WeightCodes, codes_of, dequantize_weight, quantize_input, requantize,
                    requantized_codes)

__all__ = ["MODES", "ExportConv", "ExportLinear", "ExactAdaptivePool", "RequantPoint", "rewrite", "calibrate", "export_layers"]

MODES = ("fast", "exact")
_RELUS = (nn.ReLU,)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
# modules that pass values through unchanged in eval mode (timm's blocks put an Identity for an
# absent drop-block or anti-aliasing layer between a conv's ReLU and the next conv)
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class RequantPoint(nn.Module):
    """Where the fast graph re-quantizes a convolution's output; ``spec`` is set by :func:`calibrate`."""

    def __init__(self, layer: str, reader: Optional[ActQuant] = None, sole: bool = False):
        super().__init__()
        self.layer, self.name = layer, f"{layer} output"  # the conv whose output this is
        self.reader = reader  # the 8-bit input quantization of a layer reading this value
        self.sole = sole  # the reader is the only one: what it clips away may be clipped here too
        self.spec: Optional[Requant] = None

    def set_range(self, low: float, high: float) -> None:
        """The range of the values seen here; the reader's own grid when it holds them all, or when
        the reader is the only one (it clips to that range itself), so that its quantization repeats
        this one exactly."""
        r = self.reader
        if r is not None and (self.sole or (low >= 0 and high <= float(r.alpha))):
            self.spec = Requant(float(r.scale), r.zero_point)
        else:
            self.spec = Requant.over(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return requantize(x, self.spec)


class _ExportLayer(nn.Module):
    """Shared by :class:`ExportConv` and :class:`ExportLinear`: input spec, weight, bias, output spec."""

    def __init__(self, name: str, act: Optional[ActQuant], codes: Optional[WeightCodes],
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], w_bits: int):
        super().__init__()
        self.name, self.act, self.codes, self.w_bits = name, act, codes, w_bits
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.output_point: Optional[RequantPoint] = None  # set on a part torch.fx cannot trace
        self.exact_weight: Optional[torch.Tensor] = None  # a weight the fast graph re-quantized, before that

    def _weight(self, anchor: torch.Tensor) -> torch.Tensor:
        return self.weight if self.codes is None else dequantize_weight(anchor, self.codes)


class ExportConv(_ExportLayer):
    """A convolution in export form (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, **kwargs):
        super().__init__(**kwargs)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode, self.pad = conv.padding_mode, conv._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_input(x, self.act)
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.pad, mode=self.padding_mode), 0
        y = F.conv2d(x, self._weight(x), self.bias, self.stride, padding, self.dilation, self.groups)
        return y if self.output_point is None else self.output_point(y)


class ExportLinear(_ExportLayer):
    """A linear layer in export form (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_input(x, self.act)
        return F.linear(x, self._weight(x), self.bias)


class ExactAdaptivePool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` as fixed windows when the output size does not divide the input's
    (a 1 x 1 map pooled to 2 x 2, a 7 x 7 one to 2 x 2), which torch.onnx cannot export; the same
    windows and values as PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = (self.output_size, self.output_size) if isinstance(self.output_size, int) else self.output_size
        oh, ow = oh or h, ow or w
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        rows = [x[..., (i * h) // oh: -((-(i + 1) * h) // oh), :].mean(-2, keepdim=True) for i in range(oh)]
        x = torch.cat(rows, -2)
        cols = [x[..., (j * w) // ow: -((-(j + 1) * w) // ow)].mean(-1, keepdim=True) for j in range(ow)]
        return torch.cat(cols, -1)


def _act(layer: nn.Module, name: str, mode: str) -> Optional[ActQuant]:
    if not isinstance(layer, QuantLayer) or layer.a_bits >= FLOAT_BITS:
        if mode == "fast" and isinstance(layer, QuantLayer) and isinstance(layer, nn.Conv2d):
            raise ConfigError(f"layer {name!r} quantizes its weights but not its input (a_bits=32): mode='fast' "
                              "needs inputs of at most 8 bits to run it in integers; use mode='exact'")
        return None
    if mode == "fast" and layer.a_bits > 8:
        raise ConfigError(f"layer {name!r} has {layer.a_bits}-bit inputs, which have no 8-bit form: mode='fast' needs "
                          "a_bits <= 8; use mode='exact' (it keeps them, rounded in float)")
    return ActQuant(layer.clip().detach().reshape(()).to(torch.float32).clone(), layer.a_bits, layer.signed_input)


def _fold_factors(bn: Optional[nn.BatchNorm2d], channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f, shift)``: ``bn(y) = y * f + shift`` per channel (``f = 1, shift = 0`` without one)."""
    if bn is None:
        return torch.ones(channels), torch.zeros(channels)
    var, mean = bn.running_var.detach().float(), bn.running_mean.detach().float()
    f = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        f = f * bn.weight.detach().float()
    shift = -mean * f + (bn.bias.detach().float() if bn.bias is not None else 0.0)
    return f, shift


def _export_layer(name: str, layer: nn.Module, bn: Optional[nn.BatchNorm2d], mode: str,
                  in_float: bool = False) -> _ExportLayer:
    """``layer`` (quantized, or a float conv with a batch norm to fold) in export form; ``in_float``: a
    quantized conv the fast graph runs in float (its exact DoReFa weights, its input quantized in float)."""
    if in_float:  # float weights: ONNX Runtime would fuse int8 codes with the QDQ nodes around them
        new = _export_layer(name, layer, bn, "exact")
        if new.codes is not None:
            new.weight, new.codes = new.codes.apply(), None
        if new.act is not None:  # its input quantized as the model's is, in float ops: dropped, the rounding
            new.act = dataclasses.replace(new.act, in_float=True)  # a model trained on it relies on is lost
            new.weight = new.weight * new.act.scale  # it reads the integer codes (see ActQuant)
        return new
    quantized = isinstance(layer, QuantLayer) and layer.w_bits < FLOAT_BITS
    out = layer.weight.shape[0]
    f, shift = _fold_factors(bn, out)
    bias = layer.bias.detach().float() * f + shift if layer.bias is not None else (shift if bn is not None else None)
    codes = codes_of(layer.weight, layer.w_bits) if quantized else None
    weight = exact = None
    if codes is not None:
        sign = torch.where(f < 0, -1, 1).to(torch.int8).view((-1,) + (1,) * (codes.codes.dim() - 1))
        codes = WeightCodes(codes.codes * sign, codes.scale * f.abs(), codes.bits)
    else:
        w = layer.quantized_weight() if isinstance(layer, QuantLayer) else layer.weight
        weight = w.detach().float() * f.view((-1,) + (1,) * (w.dim() - 1))
        if quantized and mode == "fast":
            codes, weight, exact = requantized_codes(weight), None, weight
    kwargs = dict(name=name, act=_act(layer, name, mode), codes=codes, weight=weight, bias=bias,
                  w_bits=layer.w_bits if quantized else FLOAT_BITS)
    new = ExportConv(layer, **kwargs) if isinstance(layer, nn.Conv2d) else ExportLinear(**kwargs)
    new.exact_weight = exact
    return new


def _single_call(graph: torch.fx.Graph) -> Dict[str, torch.fx.Node]:
    """``{module name: node}`` for the modules called exactly once."""
    calls: Dict[str, List[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return {name: nodes[0] for name, nodes in calls.items() if len(nodes) == 1}


def _bn_pairs(graph: torch.fx.Graph, modules: Dict[str, nn.Module]) -> Dict[str, str]:
    """``{conv name: batch norm name}`` for every conv whose only reader is a batch norm in eval form."""
    single = _single_call(graph)
    pairs = {}
    for name, node in single.items():
        bn = modules.get(name)
        if not (type(bn) is nn.BatchNorm2d and bn.running_mean is not None and node.args):  # a subclass may do more
            continue
        source = node.args[0]
        conv = modules.get(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        if (isinstance(conv, nn.Conv2d) and source.target in single and len(source.users) == 1
                and conv.out_channels == bn.num_features):
            pairs[source.target] = name
    return pairs


def _is_relu(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _RELUS)
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("relu", "relu_"))


def _after_relus(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> torch.fx.Node:
    """The last of the ReLUs (and of the modules that pass values through, see ``_TRANSPARENT``) that
    follow ``node`` with one reader at each step (``node`` itself when none)."""
    while len(node.users) == 1:
        (user,) = node.users
        through = _is_relu(user, modules) or (user.op == "call_module" and type(modules.get(user.target)) in _TRANSPARENT)
        if not (through and user.args and user.args[0] is node):
            break
        node = user
    return node


def _8bit_readers(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> List[QuantLayer]:
    """The quantized layers with unsigned 8-bit inputs that read ``node``'s value as their input."""
    readers = []
    for user in node.users:
        layer = modules.get(user.target) if user.op == "call_module" else None
        if (isinstance(layer, QuantLayer) and layer.a_bits == 8 and not layer.signed_input
                and bool(user.args) and user.args[0] is node):
            readers.append(layer)
    return readers


def _requant_points(part: nn.Module, graph: torch.fx.Graph, outputs: Dict[str, str],
                    modules: Dict[str, nn.Module], in_float: set, where: str) -> nn.Module:
    """``part`` as a GraphModule with a :class:`RequantPoint` wherever a quantized convolution's output
    (``outputs``: conv name -> the node its output leaves from) needs one."""
    calls = _single_call(graph)
    for i, (conv, leaves) in enumerate(outputs.items()):
        node = _after_relus(calls[leaves], modules)
        readers = _8bit_readers(node, modules)
        # a reader run in float (``in_float``) quantizes in float ops, which no int8 conv before it can
        # fuse with: a point is needed, on that reader's grid; an int8 reader's own quantization serves
        if len(node.users) == 1 and any(r not in in_float for r in readers):
            continue
        sole = len(node.users) == 1 and len(readers) == 1
        reader = _act(readers[0], conv, "fast") if len(readers) == 1 and (sole or node is not calls[leaves]) else None
        target = f"requant_{i}"
        part.add_module(target, RequantPoint(f"{where}{conv}", reader, sole))
        with graph.inserting_after(node):
            point = graph.call_module(target, (node,))
        node.replace_all_uses_with(point, delete_user_cb=lambda user: user is not point)
    return torch.fx.GraphModule(part, graph, class_name=type(part).__name__)


def _quantized_conv(m: nn.Module) -> bool:
    return isinstance(m, QuantLayer) and isinstance(m, nn.Conv2d) and m.w_bits < FLOAT_BITS


def _runs_in_float(m: nn.Module, min_channels: int) -> bool:
    """A quantized conv too narrow for ONNX Runtime's int8 kernels to beat float (see :func:`rewrite`)."""
    return _quantized_conv(m) and min(m.in_channels // m.groups, m.out_channels) < min_channels


@torch.no_grad()
def _split_norm_acts(part: nn.Module) -> nn.Module:
    """``part`` with each batch norm that applies its own ``drop`` and ``act`` modules after itself
    (timm's ``BatchNormAct2d``) split into a plain ``nn.BatchNorm2d``, ``drop`` and ``act``, where
    that computes the same on a probe input. Whole, torch.fx traces into it: the batch norm stayed
    unfolded and its ReLU unseen, so the conv before it re-quantized its output over the signed
    range, before the ReLU (47 such points in a timm RegNetY-400MF)."""
    replaced = {}
    for m in part.modules():
        drop, act = getattr(m, "drop", None), getattr(m, "act", None)
        if not (isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and m.running_mean is not None
                and isinstance(drop, nn.Module) and isinstance(act, nn.Module)):
            continue
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats).to(m.running_mean)
        bn.load_state_dict({k: v for k, v in m.state_dict().items() if "." not in k})
        split = nn.Sequential(bn, drop, act).eval()
        probe = torch.randn(2, m.num_features, 3, 3, generator=torch.Generator().manual_seed(0)).to(m.running_mean)
        if torch.equal(split(probe), m.eval()(probe)):
            replaced[m] = split
    return replace_modules(part, replaced) if replaced else part


def _rewrite_part(part: nn.Module, mode: str, where: str, min_channels: int = 0,
                  floats: Collection[str] = ()) -> nn.Module:
    """``part`` with batch norms folded and its layers in export form (``where``: its name's prefix)."""
    part = _split_norm_acts(part)
    modules = dict(part.named_modules())
    in_float = {m for name, m in modules.items() if mode == "fast" and (
        _runs_in_float(m, min_channels) or (f"{where}{name}" in floats and _quantized_conv(m)))}
    try:
        graph = trace(part)
    except ModelError as e:
        warnings.warn(f"{where or 'the model'}: not traced by torch.fx, so the batch norms after its quantized convs stay "
                      f"unfolded and every int8 conv re-quantizes its own output ({e})", stacklevel=3)
        graph = None
    pairs = _bn_pairs(graph, modules) if graph is not None else {}
    called = _single_call(graph) if graph is not None else {}  # not: inside a module fx keeps whole, or called twice
    replaced: Dict[nn.Module, nn.Module] = {m: ExactAdaptivePool(m.output_size) for m in modules.values()
                                            if type(m) is nn.AdaptiveAvgPool2d}
    outputs: Dict[str, str] = {}  # quantized conv -> the node its output leaves from, in the fast graph
    for name, m in modules.items():
        if name in pairs or isinstance(m, QuantLayer):
            bn = modules[pairs[name]] if name in pairs else None
            new = replaced[m] = _export_layer(f"{where}{name}", m, bn, mode, m in in_float)
            if bn is not None:
                replaced[bn] = nn.Identity()
            if mode == "fast" and isinstance(new, ExportConv) and new.codes is not None:
                if name not in called:
                    new.output_point = RequantPoint(new.name)
                else:
                    outputs[name] = pairs.get(name, name)
    part = replace_modules(part, replaced)
    return _requant_points(part, graph, outputs, modules, in_float, where) if outputs else part


def rewrite(model: nn.Module, mode: str, int8_min_channels: int = 0, floats: Collection[str] = ()) -> nn.Module:
    """The export twin of ``model`` (a copy; the model is not changed), in eval mode.

    ``int8_min_channels`` (fast mode): a quantized conv with fewer input channels (per group) or
    output channels runs in float, on its DoReFa weights, its input quantized as the model's is (in
    float ops): ONNX Runtime's int8 convolution is slower than float for so few channels.
    ``floats`` (fast mode): the quantized convs (names in the twin: ``segments.0.conv1`` in an
    ExitNet) that run in float as well, to keep the model's predictions (:mod:`.agreement`).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    twin = copy.deepcopy(model).eval()
    if isinstance(twin, ExitNet):
        for i, segment in enumerate(twin.segments):
            twin.segments[i] = _rewrite_part(segment, mode, f"segments.{i}.", int8_min_channels, floats)
        for i, head in enumerate(twin.heads):
            twin.heads[i] = _rewrite_part(head, mode, f"heads.{i}.", int8_min_channels, floats)
        return twin.eval()
    return _rewrite_part(twin, mode, "", int8_min_channels, floats).eval()


def export_layers(twin: nn.Module) -> List[_ExportLayer]:
    return [m for m in twin.modules() if isinstance(m, _ExportLayer)]


@torch.no_grad()
def calibrate(twin: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Sets the range of every :class:`RequantPoint` to the range its input takes on ``batches``;
    returns the number of inputs seen."""
    points = [m for m in twin.modules() if isinstance(m, RequantPoint)]
    ranges = {m: [math.inf, -math.inf] for m in points}

    def hook(module, args):
        r = ranges[module]
        r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))

    handles = [m.register_forward_pre_hook(hook) for m in points]
    seen = 0
    try:
        for x in batches:
            twin(x)
            seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    for m in points:
        low, high = ranges[m]
        if not math.isfinite(low) or not math.isfinite(high):
            raise ModelError(f"{m.name!r} took no finite value on the calibration inputs, so its range in the fast "
                             "graph is unknown")
        m.set_range(low, high)
    return seen
