"""ONNX export (``ordercomp.export``): a model or result as ONNX graphs plus a manifest the runtime driver reads.

A folder holds ``manifest.json`` (see :mod:`ordercomp.runtime`) and ``model.onnx``: a plain model,
or an ExitNet whose exits are decided inside the graph (``graph="single"``, the default: see
:mod:`.single`); with ``graph="segments"`` an ExitNet is written as ``segment<i>.onnx`` and
``head<i>.onnx`` instead (head i reads segment i's output) and the driver runs the exits.
``mode="exact"`` keeps the model's integers: QDQ on every quantized weight and input, logits as
the PyTorch model's up to float summation order. ``mode="fast"`` also re-quantizes convolution
outputs (ranges from ``calibration``) so that ONNX Runtime runs every quantized convolution as a
``QLinearConv`` (uint8 inputs, int8 weights); weights of 8 bits and more are re-quantized to int8;
where that costs the predictions on the calibration inputs, the convs that cost most run in float
(``min_agreement``, :mod:`.agreement`).
With held-out ``data`` the export is run through the driver and compared with the PyTorch model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import bitops, checks, results, runtime
from ..checkpoint import check_creatable, write_json
from ..data import check_labels, unpack
from ..errors import ConfigError, DataError, ModelError, reason
from ..nn import ExitNet
from ..nn.modes import evaluating
from .agreement import Fallback, keep_agreement
from .graphs import OPSET, graph_of, write_model
from .single import EXIT_INDEX, INPUT, LOGITS, THRESHOLD, single_graph
from .twin import MODES, calibrate, export_layers, rewrite

__all__ = ["export", "Exported", "compare", "FORMAT", "VERSION", "GRAPHS", "MIN_AGREEMENT"]

FORMAT, VERSION = runtime.FORMAT, runtime.VERSION  # the manifest the driver reads
CALIBRATION_INPUTS = 1024
# ONNX Runtime 1.32 on 2 x86-64 cores (AVX-512 VNNI), four 3x3 convs at batch 64: int8 takes about
# 1.4-1.6x float's time at 8 channels, 0.7-1.1x at 16, 0.5-0.7x at 32 and 0.4-0.5x at 64 (benchmarks/bench_deploy.py
# --widths); at 16 the quantize / dequantize / layout nodes where float and int8 meet eat the gain.
INT8_MIN_CHANNELS = 32
# % of the calibration inputs on which the fast graph must predict what the model does (the
# convs whose re-quantized outputs cost most run in float until it does)
MIN_AGREEMENT = 99.5
BATCH = 256
# "single" measured faster than "segments" at batch 1 and 64 (benchmarks/bench_deploy.py): one
# session call instead of one per segment and head, and no copies between them
GRAPHS = ("single", "segments")


@dataclass
class Exported:
    """What :func:`export` wrote and measured.

    ``onnx_bytes``: the graphs' size on disk; ``packed_bytes``: the same with each k-bit weight code
    stored in k bits instead of a byte. ``comparison`` (with ``data``): see :func:`compare`.
    ``requantized``: for each weight of 8 bits or more that the fast graph holds in int8, the
    largest error of that rounding relative to the layer's largest weight. ``fallback`` (fast): the
    agreement on the calibration inputs and the convs run in float to keep it (``min_agreement``).
    """

    path: Path
    mode: str
    manifest: dict
    files: List[Path]
    onnx_bytes: int
    packed_bytes: int
    comparison: Optional[dict] = None
    requantized: Dict[str, float] = field(default_factory=dict)
    fallback: Optional[Fallback] = None

    def summary(self) -> str:
        lines = [f"exported ({self.mode}) to {self.path}: {len(self.files)} graph(s), "
                 f"{self.onnx_bytes / 1024:.1f} KiB ({self.packed_bytes / 1024:.1f} KiB with weights packed)"]
        c = self.comparison
        if c:
            line = (f"on {c['inputs']} held-out inputs: predictions agree with PyTorch on {c['agreement']:.2f} %")
            if c.get("accuracy_onnx") is not None:
                line += (f"; accuracy {c['accuracy_onnx']:.2f} % (PyTorch {c['accuracy_torch']:.2f} %, "
                         f"change {c['accuracy_onnx'] - c['accuracy_torch']:+.2f} pp)")
            lines.append(line)
            lines.append(f"logits: median relative error {c['median_error']:.1e}, {c['within_1e-4']:.2f} % of inputs "
                         f"within 1e-4, largest {c['max_error']:.1e}")
        if self.requantized:
            worst = max(self.requantized, key=self.requantized.get)
            lines.append(f"{len(self.requantized)} weight(s) of 8+ bits re-quantized to int8; largest error "
                         f"{self.requantized[worst]:.2e} of the layer's largest weight ({worst})")
        f = self.fallback
        if f is not None and f.layers:
            names = ", ".join(f.layers[:5]) + (f" and {len(f.layers) - 5} more" if len(f.layers) > 5 else "")
            lines.append(f"{len(f.layers)} conv(s) run in float to keep agreement >= {f.min_agreement:g} % on the "
                         f"calibration inputs ({f.before:.2f} % -> {f.after:.2f} %): {names}")
        return "\n".join(lines)


def _resolve(source, model: Optional[nn.Module], student: Optional[nn.Module]) -> Tuple[nn.Module, Optional[list]]:
    """``(model, input shape or None)`` of a module, a result file or a CompressResult."""
    if isinstance(source, nn.Module):
        return source, None
    if isinstance(source, (str, Path)):
        net, recipe = results.load_with_recipe(source, model=model, student=student)
        return net, recipe["input_shape"]
    if isinstance(getattr(source, "model", None), nn.Module):
        return source.model, getattr(source, "input_shape", None)
    raise ConfigError(f"result_or_model must be an nn.Module, a result file path or a CompressResult, "
                      f"got {checks.describe(source)}")


def _batches(source, what: str, limit: Optional[int] = None, shape: Optional[Sequence[int]] = None,
             classes: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(inputs, labels or None)`` batches of a tensor of inputs, an ``(inputs, labels)`` pair or a
    loader; each checked: float inputs [batch, C, H, W] (of ``shape`` [C, H, W] when given), labels
    class indices below ``classes`` when given, and at least one input in all."""
    if isinstance(source, torch.Tensor):
        source = [(source[i:i + BATCH], None) for i in range(0, source.shape[0], BATCH)]
    elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.Tensor):
        x, y = source
        source = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, x.shape[0], BATCH)]
    seen = 0
    for batch in source:
        x, y, _ = unpack(batch, what)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4):
            raise DataError(f"{what} must give float input batches [batch, C, H, W], got {checks.describe(x)}")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise DataError(f"{what} must give inputs of shape [batch, {', '.join(map(str, shape))}] (the model's "
                            f"input), got {tuple(x.shape)}")
        if classes is not None and y is not None:
            check_labels(y, classes, what)
        if limit is not None:
            x, y = x[:limit - seen], None if y is None else y[:limit - seen]
        if x.shape[0]:
            yield x.float(), y
        seen += x.shape[0]
        if limit is not None and seen >= limit:
            return
    if seen == 0:
        raise DataError(f"{what} holds no inputs (0 rows)")


def _costs(model: nn.Module, shape: Sequence[int]) -> dict:
    p = bitops.profile(model, torch.zeros(1, *shape))
    if isinstance(model, ExitNet):
        return {"segments": [float(c) for c in p.segment_bitops], "heads": [float(c) for c in p.head_bitops]}
    return {"segments": [float(p.bitops)], "heads": []}


@torch.no_grad()
def _write(twin: nn.Module, folder: Path, shape: Sequence[int], opset: int, graph: str) -> dict:
    """Writes the graphs of ``twin``; the manifest's entries that name them."""
    example = torch.zeros(2, *shape)
    if not isinstance(twin, ExitNet):
        write_model(graph_of(twin, example, "model", "input", "logits", opset), folder / "model.onnx")
        return {"graph": "segments", "segments": [{"file": "model.onnx", "input": "input", "output": "logits"}],
                "heads": []}
    segments, heads, x = [], [], example
    last = len(twin.segments) - 1
    for i, segment in enumerate(twin.segments):
        names = ("input", "logits" if i == last else "features")
        segments.append(graph_of(segment, x, f"segment{i}", *names, opset))
        x = segment(x)
        if i < last:
            heads.append(graph_of(twin.heads[i], x, f"head{i}", "features", "logits", opset))
    if graph == "single":
        classes = int(x.shape[-1])
        write_model(single_graph(segments, heads, float(twin.threshold), twin.criterion, classes, shape),
                    folder / "model.onnx")
        return {"graph": "single", "model": {"file": "model.onnx", "input": INPUT, "threshold": THRESHOLD,
                                             "logits": LOGITS, "exit_index": EXIT_INDEX},
                "num_exits": len(segments)}
    entries = {"graph": "segments", "segments": [], "heads": []}
    for kind, parts in (("segment", segments), ("head", heads)):
        for i, part in enumerate(parts):
            write_model(part, folder / f"{kind}{i}.onnx")
            entries[f"{kind}s"].append({"file": f"{kind}{i}.onnx", "input": part.graph.input[0].name,
                                        "output": part.graph.output[0].name})
    return entries


def _packed_bytes(twin: nn.Module, onnx_bytes: int) -> int:
    codes = [m.codes for m in export_layers(twin) if m.codes is not None]
    return onnx_bytes - sum(c.codes.numel() for c in codes) + sum(math.ceil(c.codes.numel() * c.bits / 8) for c in codes)


def _requant_errors(twin: nn.Module) -> Dict[str, float]:
    """For each weight the fast graph re-quantized: the largest rounding error relative to its largest weight."""
    out = {}
    for m in export_layers(twin):
        if m.exact_weight is not None:
            w, exact = m.codes.apply(), m.exact_weight
            out[m.name] = float((w - exact).abs().max() / exact.abs().max().clamp_min(1e-30))
    return out


def export(result_or_model, path, mode: str = "fast", *, calibration=None, data=None,
           input_shape: Optional[Sequence[int]] = None, preprocessing: Optional[dict] = None,
           opset: int = OPSET, model: Optional[nn.Module] = None, student: Optional[nn.Module] = None,
           data_limit: Optional[int] = None, int8_min_channels: int = INT8_MIN_CHANNELS,
           min_agreement: float = MIN_AGREEMENT, threads: int = 2, graph: str = "single") -> Exported:
    """Exports a model (an ``nn.Module``, a result file or a ``CompressResult``) to the folder ``path``.

    ``calibration``: inputs the fast graph's output ranges are taken from (a tensor [N, C, H, W], an
    ``(inputs, labels)`` pair or a loader; at most 1024 inputs are used); required by ``mode="fast"``.
    ``data``: held-out inputs (with labels for accuracy) to compare the export with the PyTorch model
    on, through :mod:`ordercomp.runtime` (at most ``data_limit`` inputs). ``input_shape``:
    ``[C, H, W]`` (a result file records it; else taken from ``calibration`` or ``data``). ``preprocessing``: recorded in the manifest for the
    deployment side, e.g. ``{"scale": 1/255, "mean": [0.1307], "std": [0.3081]}``. ``model`` /
    ``student``: templates for a result file whose base is not a zoo model (see ``ordercomp.load``).
    ``int8_min_channels`` (fast): quantized convs with fewer input (per group) or output channels run
    in float, where ONNX Runtime's int8 kernels are slower; 0 runs every one as ``QLinearConv``.
    ``min_agreement`` (fast, %): when the fast graph predicts what the model does on fewer of the
    calibration inputs, the fewest convs whose re-quantized outputs cost most run in float until
    it does (``Exported.fallback`` names them); 0 keeps every one in int8.
    ``graph`` (an ExitNet): ``"single"`` writes one ``model.onnx`` that decides the exits itself
    (inputs ``input`` and ``threshold``, the chosen threshold by default; outputs ``logits`` and
    ``exit_index``), which any ONNX runtime runs with one call; ``"segments"`` writes each segment
    and head as its own graph, for runtimes without ``If``/``Compress`` or to time the parts.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if graph not in GRAPHS:
        raise ConfigError(f"graph must be one of {GRAPHS}, got {graph!r}")
    checks.integer("opset", opset, 13, 21)
    net, recorded = _resolve(result_or_model, model, student)
    if isinstance(net, ExitNet) and net.threshold is None:
        raise ModelError("this ExitNet has no threshold chosen yet: set model.threshold before exporting")
    if mode == "fast" and calibration is None:
        raise ConfigError("mode='fast' needs calibration= (a few hundred real inputs: tensor, (inputs, labels) or "
                          "loader) to choose the ranges convolution outputs are re-quantized to")
    shape = _input_shape(input_shape, recorded, calibration, data)
    try:
        classes = _classes(net, shape)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        origin = ("input_shape" if input_shape is not None else "the recorded input shape" if recorded is not None
                  else "calibration" if calibration is not None else "data")
        raise DataError(f"the model cannot run on inputs of shape [batch, {', '.join(map(str, shape))}] "
                        f"(from {origin}): {reason(e)}") from None
    for what, source in (("calibration", calibration), ("data", data)):
        if source is not None:  # the first batch, before anything is exported; later ones as they come
            next(_batches(source, what, 1, shape, classes))
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"path must be a folder (the graphs and manifest.json go in it), got the file {folder}")
    check_creatable(folder, "path", ConfigError)
    checks.integer("int8_min_channels", int8_min_channels, 0)
    checks.number("min_agreement", min_agreement, 0, 100)
    twin = rewrite(net, mode, int8_min_channels)  # a copy in eval mode
    fallback = None
    if mode == "fast":
        inputs = [x for x, _ in _batches(calibration, "calibration", CALIBRATION_INPUTS, shape)]
        calibrate(twin, inputs)
        with evaluating(net):
            twin, fallback = keep_agreement(net, twin, inputs, min_agreement,
                                            lambda floats: rewrite(net, mode, int8_min_channels, floats))
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)  # only once every setting was accepted
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder))
    try:  # written and checked aside: a failed export leaves the folder (and an earlier export in it) as it was
        with evaluating(net):  # the comparison reads it in eval mode; the caller's mode is kept
            out = _finish(net, twin, staging, shape, mode, opset, preprocessing, data, data_limit, threads, graph,
                          fallback)
        _move_in(staging, folder, out)
    except BaseException:
        for p in made:  # the folders this export created, innermost first
            shutil.rmtree(p, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _move_in(staging: Path, folder: Path, out: Exported) -> None:
    """Moves a finished export from ``staging`` into ``folder``: graphs first, the manifest last,
    each by an atomic rename; graphs of an earlier export there that this one does not write are
    removed after."""
    old = set()
    try:
        earlier = json.loads((folder / "manifest.json").read_text())
        old = set(runtime.graph_files(earlier))
    except (OSError, ValueError, AttributeError, TypeError, ModelError):
        pass  # no earlier export, or one that cannot be read: nothing of it is removed
    names = [f.name for f in out.files]
    for name in names + ["manifest.json"]:
        os.replace(staging / name, folder / name)
    for name in old - set(names):
        if isinstance(name, str) and Path(name).name == name and name.endswith(".onnx"):
            (folder / name).unlink(missing_ok=True)
    out.path, out.files = folder, [folder / name for name in names]


def _finish(net: nn.Module, twin: nn.Module, folder: Path, shape: Sequence[int], mode: str, opset: int,
            preprocessing: Optional[dict], data, data_limit: Optional[int], threads: int, graph: str,
            fallback: Optional[Fallback] = None) -> Exported:
    """Writes the graphs and the manifest of ``twin``, then compares them with ``net`` on ``data``."""
    graphs = _write(twin, folder, shape, opset, graph)
    manifest = {
        "format": FORMAT, "version": VERSION, "mode": mode, "opset": opset,
        "input": {"name": "input", "shape": list(shape), "dtype": "float32"},
        "preprocessing": preprocessing, "num_classes": _classes(net, shape), **graphs,
        "exits": {"threshold": net.threshold, "criterion": net.criterion} if isinstance(net, ExitNet) else None,
        "bitops": _costs(net, shape),
        # exact: ONNX Runtime must not fuse the QDQ nodes, which would re-quantize convolution outputs
        "session_config": {"session.disable_quant_qdq": "1"} if mode == "exact" else {},
    }
    if fallback is not None:
        manifest["calibration_agreement"] = fallback.as_dict()
    files = [folder / name for name in runtime.graph_files(manifest)]
    onnx_bytes = sum(f.stat().st_size for f in files)
    out = Exported(folder, mode, manifest, files, onnx_bytes, _packed_bytes(twin, onnx_bytes),
                   requantized=_requant_errors(twin) if mode == "fast" else {}, fallback=fallback)
    manifest["sizes"] = {"onnx_bytes": out.onnx_bytes, "packed_bytes": out.packed_bytes}
    write_json(folder / "manifest.json", runtime.check_manifest(manifest))
    if data is not None:
        out.comparison = compare(net, runtime.load(folder, threads=threads), data, data_limit)
        manifest["comparison"] = out.comparison
        write_json(folder / "manifest.json", manifest)
    return out


def _input_shape(given, recorded, calibration, data) -> List[int]:
    if given is not None:
        shape = list(given)
    elif recorded is not None:
        shape = list(recorded)
    else:
        source = calibration if calibration is not None else data
        if source is None:
            raise ConfigError("input_shape must be given ([C, H, W]) when there is no calibration or data to read it from")
        x, _ = next(_batches(source, "calibration" if calibration is not None else "data", 1))  # raises when empty
        shape = list(x.shape[1:])
    if len(shape) != 3 or not all(checks.is_int(s) and s >= 1 for s in shape):
        raise ConfigError(f"input_shape must be [C, H, W] of positive integers, got {given!r}")
    return [int(s) for s in shape]


@torch.no_grad()
def _classes(net: nn.Module, shape: Sequence[int]) -> int:
    with evaluating(net), torch.no_grad():  # a model handed over in train mode may have batch norms on 1 x 1 maps
        out = net(torch.zeros(1, *shape))
    return int((out[-1] if isinstance(out, (list, tuple)) else out).shape[-1])


@torch.no_grad()
def compare(net: nn.Module, deployed: "runtime.Deployed", data, limit: Optional[int] = None) -> dict:
    """The deployed graphs against the PyTorch model on held-out ``data``.

    Keys: ``inputs``; ``agreement`` (% of inputs with the same prediction); ``same_exit`` (% leaving
    at the same exit, ExitNets); ``median_error``, ``max_error`` and ``within_1e-4`` (% of inputs
    whose largest logit difference is at most 1e-4 of their largest PyTorch logit); with labels,
    ``accuracy_torch`` and ``accuracy_onnx`` (%).
    """
    net = net.eval()
    errors, agree, same_exit, right_torch, right_onnx, n, labelled = [], 0, 0, 0, 0, 0, True
    for x, y in _batches(data, "data", limit, list(deployed.input_shape), deployed.num_classes):
        if isinstance(net, ExitNet):
            r = net.infer(x)
            logits, exits = r.logits, r.exit_index
        else:
            logits, exits = net(x), torch.zeros(x.shape[0], dtype=torch.int64)
        got = deployed.run(x.numpy())
        onnx_logits = torch.from_numpy(np.ascontiguousarray(got.logits))
        errors.append((onnx_logits - logits).abs().amax(1) / logits.abs().amax(1).clamp_min(1e-30))
        agree += int((onnx_logits.argmax(1) == logits.argmax(1)).sum())
        same_exit += int((torch.from_numpy(got.exit_index) == exits).sum())
        if y is None:
            labelled = False
        else:
            right_torch += int((logits.argmax(1) == y).sum())
            right_onnx += int((onnx_logits.argmax(1) == y).sum())
        n += x.shape[0]
    if n == 0:
        raise DataError("data yielded no inputs to compare on")
    e = torch.cat(errors).double()
    out = {"inputs": n, "agreement": 100.0 * agree / n, "same_exit": 100.0 * same_exit / n,
           "median_error": float(e.median()), "max_error": float(e.max()),
           "within_1e-4": 100.0 * float((e <= 1e-4).double().mean())}
    if labelled:
        out.update(accuracy_torch=100.0 * right_torch / n, accuracy_onnx=100.0 * right_onnx / n)
    return out
