"""Writing one module as an ONNX graph: torch's exporter, then constants made initializers.

The TorchScript exporter is used (``dynamo=False``): it places the QDQ nodes of the export specs
(:mod:`.quant`) where they ran. Constant nodes are then moved into the initializers, the batch
axis is left dynamic, and the graph is checked with ``onnx.checker``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..errors import MissingDependencyError, ModelError

__all__ = ["OPSET", "onnx_module", "graph_of", "write_graph", "write_model"]

OPSET = 17


def onnx_module():
    """The onnx package (an optional dependency: the ``deploy`` extra)."""
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("exporting to ONNX needs the onnx package: pip install 'ordercomp[deploy]'") from None
    return onnx


def _constants_to_initializers(model) -> None:
    onnx = onnx_module()
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def graph_of(module: nn.Module, example: torch.Tensor, name: str, input_name: str, output_name: str,
             opset: int = OPSET):
    """``module`` (one tensor in, one tensor out) as a checked ``onnx.ModelProto`` with a dynamic
    batch axis; ``name`` names it in errors."""
    onnx = onnx_module()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    except Exception as e:  # the exporter raises many types for a layer it cannot express
        raise ModelError(f"torch.onnx cannot export {name} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
    model = onnx.load_from_string(buffer.getvalue())
    _constants_to_initializers(model)
    onnx.checker.check_model(model)
    return model


def write_model(model, path: Path) -> Path:
    """Writes an ``onnx.ModelProto`` to ``path`` atomically."""
    data = model.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


def write_graph(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                opset: int = OPSET) -> Path:
    """Exports ``module`` (one tensor in, one tensor out) to ``path`` with a dynamic batch axis."""
    return write_model(graph_of(module, example, path.stem, input_name, output_name, opset), path)
