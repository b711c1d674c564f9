"""One ONNX graph for an ExitNet: the exits decided inside the graph, per row.

:func:`single_graph` inlines the K+1 segment graphs and K head graphs of an export into one model
with inputs ``input`` [B, C, H, W] and ``threshold`` (a scalar with the chosen threshold as its
default) and outputs ``logits`` [B, classes] and ``exit_index`` [B] int64. After segment i, head i
runs on the rows still in flight; the rows confident enough leave (``Compress``), their logits
and exit are scattered back to their place in the batch (``ScatterND``), and the rest go on into
the next segment only when there are any (``If``): at batch 1 an input that leaves early skips
the later segments, and any ONNX runtime runs the whole model with one call. A threshold above 1
takes a branch with the segments alone, so the heads cost nothing (as in ``ExitNet.infer``).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

from ..errors import ModelError
from .graphs import onnx_module

__all__ = ["single_graph", "INPUT", "THRESHOLD", "LOGITS", "EXIT_INDEX"]

INPUT, THRESHOLD, LOGITS, EXIT_INDEX = "input", "threshold", "logits", "exit_index"
# the ops ONNX Runtime's QDQ propagation moves a DequantizeLinear past (QDQPropagationTransformer)
PROPAGATING = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")


class _Graph:
    """Nodes and initializers of one (sub)graph; names made unique across the model by a counter
    shared by all graphs, constants made on first use in the top graph (outer scope of all)."""

    def __init__(self, onnx, top: "_Graph" = None):
        self.onnx, self.nodes, self.initializers = onnx, [], []
        self.top = top or self
        if top is None:
            self._count, self._constants = 0, {}

    def name(self, hint: str) -> str:
        self.top._count += 1
        return f"{hint}_{self.top._count}"

    def constant(self, value, hint: str) -> str:
        import numpy as np
        value = np.asarray(value)
        key = (hint, value.dtype.str, value.shape, value.tobytes())
        if key not in self.top._constants:
            name = self.top._constants[key] = f"const_{hint}"
            self.top.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return self.top._constants[key]

    def op(self, op_type: str, inputs: Sequence[str], hint: str, outputs: int = 1, **attributes) -> List[str]:
        out = [self.name(hint) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), out, **attributes))
        return out

    def one(self, op_type: str, inputs: Sequence[str], hint: str, **attributes) -> str:
        return self.op(op_type, inputs, hint, **attributes)[0]

    def graph(self, name: str, outputs: Sequence[Tuple[str, int]], inputs: Sequence = ()):
        """The ``onnx.GraphProto``: ``outputs`` (name, element type) with shapes left open."""
        helper = self.onnx.helper
        return helper.make_graph(self.nodes, name, list(inputs),
                                 [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
                                 initializer=self.initializers)

    def inline(self, model, prefix: str, source: str, target: str) -> None:
        """The nodes and initializers of ``model`` (one input, one output) into this graph, reading
        ``source`` and writing ``target``; every other name prefixed with ``prefix``. The
        initializers stay beside their nodes so that ONNX Runtime folds and fuses them there."""
        onnx, graph = self.onnx, model.graph
        if len(graph.input) != 1 or len(graph.output) != 1:
            raise ModelError(f"{prefix.rstrip('/')}: a graph to inline needs one input and one output, "
                             f"got {len(graph.input)} and {len(graph.output)}")
        rename = {graph.input[0].name: source, graph.output[0].name: target, "": ""}
        for tensor in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = rename.setdefault(tensor.name, prefix + tensor.name)
            self.initializers.append(copy)
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ModelError(f"{prefix.rstrip('/')}: node {node.op_type} holds a subgraph, which "
                                 "graph='single' cannot inline (export with graph='segments')")
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + node.name if node.name else ""
            copy.input[:] = [rename.setdefault(n, prefix + n) for n in node.input]
            copy.output[:] = [rename.setdefault(n, prefix + n) for n in node.output]
            self.nodes.append(copy)


def _output_on_grid(model):
    """``model`` with its output re-quantized on its own grid where it leaves a DequantizeLinear
    through ops of ``PROPAGATING`` only (a segment ending in a max pool of int8 values).

    Inside the single graph such an output is read by the ``If`` branches alone, and ONNX Runtime's
    QDQ propagation, which would put the Q/DQ pair there itself, indexes the ``If``'s inputs out of
    range and aborts the process when it loads the model (ONNX Runtime 1.32, GoogLeNet with an
    exit after a max pool). The pair written here is exact (the values are on that grid already)
    and leaves the propagation nothing to do."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    output = graph.output[0].name
    source = producer.get(output)
    if source is None or source.op_type not in PROPAGATING:
        return model
    while source is not None and source.op_type in PROPAGATING:
        source = producer.get(source.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        return model
    onnx = onnx_module()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    raw = output + "/off_grid"
    for node in copy.graph.node:
        node.input[:] = [raw if n == output else n for n in node.input]
        node.output[:] = [raw if n == output else n for n in node.output]
    grid = list(source.input[1:])  # scale and zero point
    copy.graph.node.extend([onnx.helper.make_node("QuantizeLinear", [raw, *grid], [raw + "/q"]),
                            onnx.helper.make_node("DequantizeLinear", [raw + "/q", *grid], [output])])
    return copy


def _confidence(g: _Graph, logits: str, criterion: str, classes: int) -> str:
    """Per-row confidence [n] of ``logits`` [n, classes], as ``runtime.exit_check`` computes it."""
    import numpy as np
    logp = g.one("LogSoftmax", [logits], "logp", axis=1)
    if criterion == "maxprob":
        return g.one("Exp", [g.one("ReduceMax", [logp], "max_logp", axes=[1], keepdims=0)], "confidence")
    one, axis1 = g.constant(np.float32(1.0), "one"), g.constant(np.array([1], np.int64), "axis1")
    if classes == 1:  # 1 + log p: 1, or NaN for a non-finite logit
        return g.one("Add", [one, g.one("Squeeze", [logp, axis1], "logp0")], "confidence")
    plogp = g.one("Mul", [g.one("Exp", [logp], "p"), logp], "plogp")
    zero_p = g.one("IsInf", [logp], "p_is_zero", detect_positive=0)  # p log p is 0 where p is 0
    plogp = g.one("Where", [zero_p, g.constant(np.float32(0.0), "zero"), plogp], "plogp_defined")
    negative_entropy = g.one("ReduceSum", [plogp, axis1], "negative_entropy", keepdims=0)
    scale = g.constant(np.float32(math.log(classes)), "log_classes")
    return g.one("Add", [one, g.one("Div", [negative_entropy, scale], "scaled")], "confidence")


def _level(g: _Graph, i: int, h: str, rows: str, out: str, exits: str, segments, heads, criterion: str,
           classes: int) -> Tuple[str, str]:
    """Segment i onward for the rows in flight (``rows``: their places in the batch, ``h``: their
    inputs), written into ``g``; returns the names of the batch's (logits, exit_index)."""
    import numpy as np
    T = g.onnx.TensorProto
    features = g.name(f"segment{i}_out")
    g.inline(segments[i], f"s{i}/", h, features)
    index = g.one("Unsqueeze", [rows, g.constant(np.array([1], np.int64), "axis1")], f"places{i}")
    if i == len(heads):  # the final classifier: every row still in flight leaves here
        return g.one("ScatterND", [out, index, features], "logits"), g.one("Identity", [exits], "exit_index")

    decide = _Graph(g.onnx, g.top)  # head i and its exit check, on these rows
    logits = decide.name(f"head{i}_out")
    decide.inline(heads[i], f"h{i}/", features, logits)
    confidence = _confidence(decide, logits, criterion, classes)
    leave = decide.one("GreaterOrEqual", [confidence, THRESHOLD], f"leave{i}")
    stay = decide.one("Not", [leave], f"stay{i}")
    gone = decide.one("Compress", [index, leave], f"gone{i}", axis=0)
    left = decide.one("Compress", [logits, leave], f"gone_logits{i}", axis=0)
    decided = (decide.one("Compress", [features, stay], f"features_on{i}", axis=0),
               decide.one("Compress", [rows, stay], f"rows_on{i}", axis=0),
               decide.one("ScatterND", [out, gone, left], f"logits{i}"),
               decide.one("ScatterND", [exits, gone, decide.one(
                   "Expand", [g.constant(np.array([i], np.int64), f"exit{i}"),
                              decide.one("Shape", [gone], f"gone_count{i}", end=1)], f"exit_ids{i}")], f"exit_index{i}"))
    skip = _Graph(g.onnx, g.top)  # a threshold above 1: no exits, the head is not evaluated
    skipped = tuple(skip.one("Identity", [name], f"kept{j}_{i}") for j, name in enumerate((features, rows, out, exits)))
    types = [(T.FLOAT, "h"), (T.INT64, "rows"), (T.FLOAT, "logits"), (T.INT64, "exits")]
    h_on, rows_on, out, exits = g.op(
        "If", [g.one("Greater", [THRESHOLD, g.constant(np.float32(1.0), "one")], f"no_exits{i}")], f"head{i}_if",
        outputs=4, then_branch=skip.graph(f"skip_head{i}", [(n, t) for n, (t, _) in zip(skipped, types)]),
        else_branch=decide.graph(f"head{i}", [(n, t) for n, (t, _) in zip(decided, types)]))

    deeper = _Graph(g.onnx, g.top)
    final = _level(deeper, i + 1, h_on, rows_on, out, exits, segments, heads, criterion, classes)
    done = _Graph(g.onnx, g.top)
    finished = (done.one("Identity", [out], f"logits_done{i}"), done.one("Identity", [exits], f"exits_done{i}"))
    any_on = g.one("Greater", [g.one("Size", [rows_on], f"count_on{i}"), g.constant(np.int64(0), "zero_count")],
                   f"any_on{i}")
    pair = [(T.FLOAT,), (T.INT64,)]
    return tuple(g.op("If", [any_on], f"after_head{i}", outputs=2,
                      then_branch=deeper.graph(f"segment{i + 1}", [(n, t) for n, (t,) in zip(final, pair)]),
                      else_branch=done.graph(f"all_left_at{i}", [(n, t) for n, (t,) in zip(finished, pair)])))


def single_graph(segments: Sequence, heads: Sequence, threshold: float, criterion: str, classes: int,
                 input_shape: Sequence[int]):
    """One ``onnx.ModelProto`` running ``segments`` (K+1 models) with early exits through ``heads``
    (K models); each part has one input and one output with a dynamic batch axis."""
    import numpy as np
    onnx = onnx_module()
    helper, T = onnx.helper, onnx.TensorProto
    if len(segments) != len(heads) + 1:
        raise ModelError(f"need one segment more than heads, got {len(segments)} and {len(heads)}")
    segments = [_output_on_grid(s) for s in segments[:-1]] + [segments[-1]]
    g = _Graph(onnx)
    g.initializers.append(onnx.numpy_helper.from_array(np.array(threshold, np.float32), THRESHOLD))
    batch = g.one("Shape", [INPUT], "batch", end=1)
    rows = g.one("Range", [g.constant(np.int64(0), "zero_count"), g.one("Squeeze", [batch], "batch_size"),
                           g.constant(np.int64(1), "one_count")], "rows")
    zeros = g.one("ConstantOfShape", [g.one("Concat", [batch, g.constant(np.array([classes], np.int64), "classes")],
                                            "logits_shape", axis=0)],
                  "no_logits", value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    last = g.one("ConstantOfShape", [batch], "last_exit",
                 value=onnx.numpy_helper.from_array(np.array([len(heads)], np.int64)))
    logits, exits = _level(g, 0, INPUT, rows, zeros, last, segments, heads, criterion, classes)
    g.nodes.append(helper.make_node("Identity", [logits], [LOGITS], name="logits"))
    g.nodes.append(helper.make_node("Identity", [exits], [EXIT_INDEX], name="exit_index"))
    graph = helper.make_graph(
        g.nodes, "ordercomp_exitnet",
        [helper.make_tensor_value_info(INPUT, T.FLOAT, ["batch", *input_shape]),
         helper.make_tensor_value_info(THRESHOLD, T.FLOAT, [])],
        [helper.make_tensor_value_info(LOGITS, T.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info(EXIT_INDEX, T.INT64, ["batch"])],
        initializer=g.initializers)
    opsets = {}
    for part in (*segments, *heads):
        for o in part.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="ordercomp")
    model.ir_version = max(part.ir_version for part in (*segments, *heads))
    onnx.checker.check_model(model)
    return model
