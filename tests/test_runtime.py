"""The ONNX Runtime driver (ordercomp.runtime) against ExitNet.infer, its numpy exit_check against
the reference, a plain model, bad input, and a run on a machine where torch cannot be imported.

The export folders are built here with torch.onnx (not with ordercomp.export), so the driver is
held to the manifest format itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import MNIST_DATA, MNIST_MEAN, MNIST_STD, REPO  # noqa: E402
from ordercomp import bitops, models, reference, runtime  # noqa: E402
from ordercomp.errors import ConfigError, DataError, MissingDependencyError, MissingFileError, ModelError  # noqa: E402
from ordercomp.deploy.single import single_graph  # noqa: E402
from ordercomp.nn import attach_exits  # noqa: E402

SHAPE = (1, 28, 28)
N_DIGITS = 256


def _export(module, example, path: Path, input_name: str, output_name: str) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


def _manifest(segments, heads, costs, exits, preprocessing) -> dict:
    return {
        "format": "ordercomp-onnx", "version": 1, "mode": "fast", "opset": 17,
        "input": {"name": "input", "shape": list(SHAPE), "dtype": "float32"},
        "preprocessing": preprocessing, "num_classes": 10,
        "segments": segments, "heads": heads, "exits": exits, "bitops": costs,
        "sizes": {"bytes": 1234}, "accuracy": 0.5,  # extra keys the driver must ignore
    }


def _build_exit_net():
    """resnet8 with two pool heads; the heads' classifiers get spread-out weights so that their
    confidences overlap and one threshold lets inputs leave at every exit."""
    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10, in_channels=1).eval()  # export restores the mode it finds
    net = attach_exits(model, None, "pool", example_input=torch.zeros(2, *SHAPE)).eval()
    gen = torch.Generator().manual_seed(1)
    for i, head in enumerate(net.heads):
        torch.nn.init.normal_(head.fc.weight, std=3.0 + 2.0 * i, generator=gen)
    return model, net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(ExitNet, its backbone, exit export folder, plain export folder, 256 normalised digits)."""
    model, net = _build_exit_net()
    example = torch.zeros(2, *SHAPE)
    folder = tmp_path_factory.mktemp("exits")
    names = ["input"] + [f"features{i}" for i in range(len(net.heads))] + ["logits"]
    segments, heads, h = [], [], example
    for i, segment in enumerate(net.segments):
        _export(segment, h, folder / f"segment{i}.onnx", names[i], names[i + 1])
        segments.append({"file": f"segment{i}.onnx", "input": names[i], "output": names[i + 1]})
        with torch.no_grad():
            h = segment(h)
        if i < len(net.heads):
            _export(net.heads[i], h, folder / f"head{i}.onnx", names[i + 1], "logits")
            heads.append({"file": f"head{i}.onnx", "input": names[i + 1], "output": "logits"})
    prof = bitops.profile(net, example)
    costs = {"segments": prof.segment_bitops, "heads": prof.head_bitops}
    pre = {"scale": 1 / 255, "mean": [MNIST_MEAN], "std": [MNIST_STD]}
    manifest = _manifest(segments, heads, costs, {"threshold": 0.5, "criterion": "maxprob"}, pre)
    (folder / "manifest.json").write_text(json.dumps(manifest))

    plain = tmp_path_factory.mktemp("plain")
    _export(model, example, plain / "model.onnx", "input", "logits")
    graph = [{"file": "model.onnx", "input": "input", "output": "logits"}]
    (plain / "manifest.json").write_text(json.dumps(_manifest(graph, [], None, None, None)))

    with np.load(MNIST_DATA) as npz:
        pixels = npz["x_test"][:N_DIGITS]
    x = ((pixels.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
    return net, model, folder, plain, x


@pytest.fixture(scope="module")
def single(exported, tmp_path_factory):
    """{criterion: folder}: the parts of the exit export inlined into one graph, version 2 manifest."""
    folder = exported[2]
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = {kind: [onnx.load(str(folder / g["file"])) for g in manifest[kind]] for kind in ("segments", "heads")}
    out = {}
    for criterion in runtime.CRITERIA:
        path = tmp_path_factory.mktemp(f"single-{criterion}")
        onnx.save(single_graph(parts["segments"], parts["heads"], 0.5, criterion, 10, SHAPE), str(path / "model.onnx"))
        m = {k: v for k, v in manifest.items() if k not in ("segments", "heads")}
        m.update(version=2, graph="single", num_exits=3, exits={"threshold": 0.5, "criterion": criterion},
                 model={"file": "model.onnx", "input": "input", "threshold": "threshold", "logits": "logits",
                        "exit_index": "exit_index"})
        (path / "manifest.json").write_text(json.dumps(m))
        out[criterion] = path
    return out


# --------------------------------------------------------------------------- exit_check


def _hard_logits(classes: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 3, classes) for _ in range(64)]
    inf, nan = math.inf, math.nan
    if classes == 1:
        rows += [[0.0], [5.0], [-inf], [inf], [nan], [1e30]]
    else:
        pad = [0.0] * (classes - 3)
        rows += [[nan, 1.0, 2.0] + pad, [inf, 1.0, 2.0] + pad, [inf, inf, 0.0] + pad, [-inf] * classes,
                 [-inf, 1.0, 2.0] + pad, [-inf, -inf, 3.0] + [-inf] * (classes - 3), [1e30, 0.0, -1e30] + pad,
                 [2.0, 2.0, 1.0] + pad, [-inf, nan, inf] + pad]
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("classes", [1, 3, 10])
@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_exit_check_matches_the_reference(classes, criterion, threshold):
    logits = _hard_logits(classes)
    conf, pred, mask = runtime.exit_check(logits, threshold, criterion)
    ref_conf, ref_pred, ref_mask = reference.exit_check(torch.from_numpy(logits), threshold, criterion)
    assert conf.dtype == np.float32 and pred.dtype == np.int64 and mask.dtype == bool
    np.testing.assert_allclose(conf, ref_conf.numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(pred, ref_pred.numpy())
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    if classes > 1:  # the non-finite rows: NaN confidence, never exit (the all -inf row included)
        special = conf[64:]
        assert np.isnan(special[[0, 1, 2, 3, 8]]).all() and not mask[64:][[0, 1, 2, 3, 8]].any()
        assert special[5] == 1.0 and special[6] == 1.0  # one finite logit; logits far apart


def _identity(name: str, classes: int):
    T = onnx.TensorProto
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], name,
                                   [onnx.helper.make_tensor_value_info("x", T.FLOAT, ["batch", classes])],
                                   [onnx.helper.make_tensor_value_info("y", T.FLOAT, ["batch", classes])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("classes", [1, 3, 10])
@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_the_single_graphs_exit_check_matches_exit_check(classes, criterion, tmp_path):
    """The exit decision written in ONNX ops leaves exactly the rows runtime.exit_check lets leave,
    non-finite rows (which never leave) included: identity segments and head feed it the logits."""
    import onnxruntime

    logits = _hard_logits(classes)
    parts = [_identity(f"part{i}", classes) for i in range(3)]
    for threshold in (0.0, 0.3, 0.5, 0.9, 1.0):
        model = single_graph(parts[:2], parts[2:], threshold, criterion, classes, [classes])
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=runtime.PROVIDERS)
        got_logits, exits = session.run(None, {"input": logits})
        mask = runtime.exit_check(logits, threshold, criterion)[2]
        np.testing.assert_array_equal(exits == 0, mask, err_msg=f"threshold {threshold}")
        np.testing.assert_array_equal(exits[~mask], 1)
        np.testing.assert_array_equal(got_logits, logits)


def _pooled_segment(name: str):
    """[batch, 1, 4, 4] -> fake-quantized on a grid of 0.5 (uint8) -> 2 x 2 max pool: a segment
    that ends in a max pool of int8 values, as GoogLeNet's does at an exit after its pool."""
    T, h = onnx.TensorProto, onnx.helper
    grid = [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
            onnx.numpy_helper.from_array(np.array(0, np.uint8), "zero")]
    nodes = [h.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
             h.make_node("MaxPool", ["dq"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = h.make_graph(nodes, name, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 1, 4, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", 1, 2, 2])], initializer=grid)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _flatten(name: str):
    T, h = onnx.TensorProto, onnx.helper
    graph = h.make_graph([h.make_node("Flatten", ["x"], ["y"])], name,
                         [h.make_tensor_value_info("x", T.FLOAT, ["batch", 1, 2, 2])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_a_segment_ending_in_a_max_pool_of_int8_values_loads_with_every_optimization(tmp_path):
    """ONNX Runtime's QDQ propagation aborted the process loading a single graph whose segment ends
    in DequantizeLinear -> MaxPool (the pool's output read by the If branches alone). The graph
    loads with every optimization, in a process of its own, and computes the pooled logits."""
    model = single_graph([_pooled_segment("s0"), _flatten("s1")], [_flatten("h0")], 0.5, "maxprob", 4, [1, 4, 4])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).uniform(0, 4, (7, 1, 4, 4)).astype(np.float32)
    x[:3, 0, 0, 0] = 60.0  # a confident row: it leaves at the head
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
              "s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
              "logits, exits = s.run(None, {'input': np.load(sys.argv[2])})\n"
              "np.save(sys.argv[3], logits); np.save(sys.argv[4], exits)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "logits.npy"), str(tmp_path / "exits.npy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    on_grid = np.clip(np.round(x / 0.5), 0, 255) * 0.5
    pooled = on_grid.reshape(7, 2, 2, 2, 2).max(axis=(2, 4)).reshape(7, 4)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), pooled)
    leave = runtime.exit_check(pooled, 0.5)[2]
    assert leave[:3].all() and not leave.all()
    np.testing.assert_array_equal(np.load(tmp_path / "exits.npy"), np.where(leave, 0, 1))


def test_exit_check_of_an_empty_batch_and_bad_arguments():
    conf, pred, mask = runtime.exit_check(np.zeros((0, 4), np.float32), 0.5)
    assert conf.shape == pred.shape == mask.shape == (0,)
    with pytest.raises(ConfigError, match="criterion must be one of"):
        runtime.exit_check(np.zeros((2, 4)), 0.5, "margin")
    with pytest.raises(DataError, match="logits must be 2-D"):
        runtime.exit_check(np.zeros(4), 0.5)


# --------------------------------------------------------------------------- the driver against ExitNet.infer


class Recording:
    """A session that logs how many rows each graph was given."""

    def __init__(self, session, name: str, log: list):
        self.session, self.name, self.log = session, name, log

    def run(self, names, feeds):
        self.log.append((self.name, len(next(iter(feeds.values())))))
        return self.session.run(names, feeds)


def _recorded(deployed) -> list:
    log: list = []
    deployed.segments = [Recording(s, f"segment{i}", log) for i, s in enumerate(deployed.segments)]
    deployed.heads = [Recording(s, f"head{i}", log) for i, s in enumerate(deployed.heads)]
    return log


def _spread_threshold(net, x: torch.Tensor, criterion: str) -> float:
    """The threshold that lets the most inputs leave at the least used exit, taken midway between
    confidences more than 2e-4 apart so that ONNX Runtime's and torch's rounding cannot flip a
    decision. In eval mode a row's confidence does not depend on the rest of the batch, so every
    head is run on every row once and the exits of each candidate are counted from that."""
    with torch.no_grad():
        h, confs = x, []
        for segment, head in zip(net.segments, net.heads):
            h = segment(h)
            confs.append(reference.exit_check(head(h), 2.0, criterion)[0])
        c = torch.cat(confs).sort().values
        mids = ((c[1:] + c[:-1]) / 2)[(c[1:] - c[:-1]) > 2e-4]
        leaves = [conf[None, :] >= mids[:, None] for conf in confs]  # [candidates, B] per head
        first = leaves[0].sum(1)
        second = (leaves[1] & ~leaves[0]).sum(1)
        counts = torch.stack([first, second, x.shape[0] - first - second], 1)
        best = float(mids[counts.min(1).values.argmax()])
        assert net.infer(x, best, criterion).exit_counts().min() > 0
    return best


@pytest.mark.parametrize("criterion,threshold", [("maxprob", "spread"), ("entropy", "spread"),
                                                 ("maxprob", 0.0), ("entropy", 2.0)])
def test_driver_matches_exitnet_infer(exported, criterion, threshold):
    net, _, folder, _, x = exported
    xt = torch.from_numpy(x)
    if threshold == "spread":
        threshold = _spread_threshold(net, xt, criterion)
    deployed = runtime.load(folder)
    log = _recorded(deployed)
    got = deployed.run(x, threshold, criterion)
    prof = bitops.profile(net, torch.zeros(2, *SHAPE))
    with torch.no_grad():
        want = net.infer(xt, threshold, criterion, bitops=(prof.segment_bitops, prof.head_bitops))
    np.testing.assert_array_equal(got.exit_index, want.exit_index.numpy())
    np.testing.assert_array_equal(got.bitops, want.bitops.numpy())
    np.testing.assert_allclose(got.logits, want.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got.exit_counts(), want.exit_counts().numpy())
    assert got.logits.dtype == np.float32 and got.exit_index.dtype == np.int64 and got.bitops.dtype == np.float64
    # Exited rows are dropped: segment i and head i see only the rows that did not leave before i.
    reach = [int((got.exit_index >= i).sum()) for i in range(3)]
    if threshold > 1:
        expected = [(f"segment{i}", N_DIGITS) for i in range(3)]
        np.testing.assert_array_equal(got.bitops, np.full(N_DIGITS, float(sum(prof.segment_bitops))))
    else:
        expected = [(name, reach[i]) for i in range(3) for name in (f"segment{i}", f"head{i}")
                    if reach[i] > 0 and name != "head2"]
    assert log == expected
    if threshold == 0.0:
        assert log == [("segment0", N_DIGITS), ("head0", N_DIGITS)]
        np.testing.assert_array_equal(got.exit_counts(), [N_DIGITS, 0, 0])
    np.testing.assert_array_equal(deployed.predict(x, threshold, criterion), got.logits.argmax(1))


@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
@pytest.mark.parametrize("threshold", ["spread", 0.0, 2.0])
def test_single_graph_matches_exitnet_infer(exported, single, criterion, threshold):
    """One graph that decides the exits itself gives infer's exits, BitOps and logits at batch 1, 7,
    64 and 256, in one session call (a threshold above 1: no head runs or is charged)."""
    net, _, _, _, x = exported
    xt = torch.from_numpy(x)
    if threshold == "spread":
        threshold = _spread_threshold(net, xt, criterion)
    deployed = runtime.load(single[criterion])
    assert deployed.single and (deployed.num_exits, deployed.threshold, deployed.criterion) == (3, 0.5, criterion)
    log = _recorded(deployed)
    prof = bitops.profile(net, torch.zeros(2, *SHAPE))
    for rows in (slice(0, 1), slice(1, 8), slice(8, 72), slice(0, N_DIGITS)):
        got = deployed.run(x[rows], threshold)
        with torch.no_grad():
            want = net.infer(xt[rows], threshold, criterion, bitops=(prof.segment_bitops, prof.head_bitops))
        np.testing.assert_array_equal(got.exit_index, want.exit_index.numpy())
        np.testing.assert_array_equal(got.bitops, want.bitops.numpy())
        np.testing.assert_allclose(got.logits, want.logits.numpy(), atol=1e-4, rtol=0)
        assert got.logits.dtype == np.float32 and got.exit_index.dtype == np.int64 and got.bitops.dtype == np.float64
    assert log == [("segment0", n) for n in (1, 7, 64, N_DIGITS)]  # one call per batch
    if threshold == "spread" or 0 < threshold <= 1:
        assert (got.exit_counts() > 0).all()
    elif threshold == 0.0:
        assert got.exit_counts().tolist() == [N_DIGITS, 0, 0]
    else:
        np.testing.assert_array_equal(got.bitops, np.full(N_DIGITS, float(sum(prof.segment_bitops))))


@pytest.mark.parametrize("changes,words", [
    ({"version": 1}, "graph must be 'segments' .version 1., got 'single'"),
    ({"model": {"file": "model.onnx"}}, "model must be an object with strings 'file', 'input', 'threshold'"),
    ({"num_exits": 0}, "num_exits must be >= 1"),
    ({"num_exits": 2}, "bitops.segments must be a list of 2"),
    ({"exits": {"threshold": None, "criterion": "maxprob"}}, "exits must hold the threshold and criterion"),
    ({"model": {"file": "model.onnx", "input": "input", "threshold": "cutoff", "logits": "logits",
                "exit_index": "exit_index"}}, r"has inputs \['input', 'threshold'\].*inputs \['input', 'cutoff'\]"),
])
def test_bad_single_graph_manifests_name_the_key(single, tmp_path, changes, words):
    with pytest.raises(ModelError, match=words):
        runtime.load(_variant(single["maxprob"], tmp_path, **changes))


def test_manifest_settings_preprocessing_and_float64(exported):
    net, _, folder, _, x = exported
    deployed = runtime.load(folder / "manifest.json", threads=1, optimization="basic")
    assert (deployed.threshold, deployed.criterion, deployed.num_exits, deployed.input_shape) == (0.5, "maxprob", 3,
                                                                                                   SHAPE)
    with torch.no_grad():
        want = net.infer(torch.from_numpy(x), 0.5, "maxprob")
    np.testing.assert_array_equal(deployed.run(x).exit_index, want.exit_index.numpy())
    with np.load(MNIST_DATA) as npz:
        pixels = npz["x_test"][:N_DIGITS]
    np.testing.assert_allclose(deployed.preprocess(pixels), x, atol=1e-6, rtol=0)
    np.testing.assert_allclose(deployed.preprocess(pixels[:, None].astype(np.float64)), x, atol=1e-6, rtol=0)
    via64 = deployed.run(x.astype(np.float64))
    np.testing.assert_array_equal(via64.logits, deployed.run(x).logits)
    empty = deployed.run(np.zeros((0, *SHAPE), np.float32))
    assert empty.logits.shape == (0, 10) and empty.exit_counts().tolist() == [0, 0, 0]


def test_preprocess_refuses_nan_and_warns_about_pixels_scaled_twice(exported):
    deployed = runtime.load(exported[2])
    with np.load(MNIST_DATA) as npz:
        pixels = npz["x_test"][:4]
    with pytest.raises(DataError, match="pixels must be finite: found 1 NaN"):
        deployed.preprocess(np.where(np.arange(pixels.size).reshape(pixels.shape) == 5, np.nan, pixels))
    with pytest.warns(UserWarning, match=r"pixels are all within \[0, 1\] but the manifest scales them by 0.00392"):
        deployed.preprocess(pixels / 255.0)


def test_an_edited_input_shape_is_refused(exported, tmp_path):
    manifest = json.loads((exported[2] / "manifest.json").read_text())
    with pytest.raises(ModelError, match=r"input.shape \[1, 32, 32\] is not the shape the first graph takes"):
        runtime.load(_variant(exported[2], tmp_path, input=dict(manifest["input"], shape=[1, 32, 32])))


def test_plain_model_runs(exported):
    _, model, _, plain, x = exported
    deployed = runtime.load(plain)
    assert (deployed.num_exits, deployed.threshold, deployed.heads) == (1, None, [])
    got = deployed.run(x[:64])
    with torch.no_grad():
        want = model(torch.from_numpy(x[:64])).numpy()
    np.testing.assert_allclose(got.logits, want, atol=1e-4, rtol=0)
    assert got.bitops is None and got.exit_counts().tolist() == [64]
    with pytest.raises(ConfigError, match="preprocessing"):
        deployed.preprocess(np.zeros((1, 28, 28), np.uint8))


# --------------------------------------------------------------------------- without torch

_BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"
_THIRD_PARTY = ("import json, sys\n"
                "mods = sorted({n.partition('.')[0] for n, m in sys.modules.items() if m is not None}"
                " - set(sys.stdlib_module_names))\n"
                "open(sys.argv[-1], 'w').write(json.dumps(mods))\n")
_CHILD = _BLOCK_TORCH + """import numpy as np
import ordercomp.runtime as rt
folder, inputs, out = sys.argv[1:4]
result = rt.load(folder).run(np.load(inputs), 0.5, "maxprob")
np.save(out + "/logits.npy", result.logits)
np.save(out + "/exit_index.npy", result.exit_index)
np.save(out + "/bitops.npy", result.bitops)
"""


def _python(script: str, *args) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_runs_where_torch_cannot_be_imported(exported, tmp_path):
    _, _, folder, _, x = exported
    np.save(tmp_path / "x.npy", x[:128])
    _python(_BLOCK_TORCH + "import numpy, onnxruntime\n" + _THIRD_PARTY, tmp_path / "base.json")
    _python(_CHILD + _THIRD_PARTY, folder, tmp_path / "x.npy", tmp_path, tmp_path / "child.json")
    want = runtime.load(folder).run(x[:128], 0.5, "maxprob")
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), want.logits)
    np.testing.assert_array_equal(np.load(tmp_path / "exit_index.npy"), want.exit_index)
    np.testing.assert_array_equal(np.load(tmp_path / "bitops.npy"), want.bitops)
    allowed = set(json.loads((tmp_path / "base.json").read_text())) | {"ordercomp"}
    imported = set(json.loads((tmp_path / "child.json").read_text()))
    assert "ordercomp" in imported and imported - allowed == set()


def test_missing_onnxruntime_names_the_extra(monkeypatch, exported):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"ordercomp\[deploy\]"):
        runtime.load(exported[2])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("x,words", [
    (np.zeros((2, 3, 28, 28), np.float32), r"x must have shape \[B, 1, 28, 28\].*\(2, 3, 28, 28\)"),
    (np.zeros((2, 28, 28), np.float32), r"x must have shape \[B, 1, 28, 28\].*\(2, 28, 28\)"),
    (np.zeros((2, 1, 28, 28), np.int64), r"x must hold floats.*int64"),
    ([[0.0]], r"x must be a numpy array.*list"),
    (np.stack([np.zeros((1, 28, 28)), np.full((1, 28, 28), np.nan)]).astype(np.float32),
     r"x must be finite: found 784 NaN and 0 infinite values, in rows \[1\]"),
    (np.full((2, 1, 28, 28), np.inf, np.float32), r"x must be finite: found 0 NaN and 1568 infinite values"),
])
def test_bad_input_is_refused(exported, x, words):
    with pytest.raises(DataError, match=words):
        runtime.load(exported[2]).run(x)


def test_bad_settings_are_refused(exported):
    deployed = runtime.load(exported[2])
    x = exported[4][:2]
    with pytest.raises(ConfigError, match=r"criterion must be one of \('maxprob', 'entropy'\), got 'margin'"):
        deployed.run(x, 0.5, "margin")
    for bad in (-0.1, math.nan, "0.5"):
        with pytest.raises(ConfigError, match="threshold must be a number >= 0"):
            deployed.run(x, bad)
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        runtime.load(exported[2], threads=0)
    with pytest.raises(ConfigError, match="optimization must be one of"):
        runtime.load(exported[2], optimization="max")


def _variant(folder: Path, tmp_path: Path, copy_graphs: bool = True, **changes) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    if copy_graphs:
        for file in folder.glob("*.onnx"):
            shutil.copy(file, tmp_path / file.name)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_missing_files(exported, tmp_path):
    folder = exported[2]
    with pytest.raises(MissingFileError, match="does not exist"):
        runtime.load(tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match="holds no manifest.json"):
        runtime.load(tmp_path)
    with pytest.raises(MissingFileError, match="segment0.onnx"):
        runtime.load(_variant(folder, tmp_path, copy_graphs=False))


@pytest.mark.parametrize("changes,words", [
    ({"version": 3}, r"version must be one of \(1, 2\)"),
    ({"version": 2}, "graph must be .single. or .segments., got None"),
    ({"format": "other"}, "format must be 'ordercomp-onnx'"),
    ({"heads": []}, "segments must number one more than heads"),
    ({"exits": None}, "exits must be an object"),
    ({"exits": {"threshold": 0.5, "criterion": "margin"}}, "exits.criterion must be one of"),
    ({"exits": {"threshold": -1, "criterion": "maxprob"}}, "exits.threshold must be a number >= 0"),
    ({"bitops": {"segments": [1.0], "heads": [1.0, 2.0]}}, "bitops.segments must be a list of 3"),
    ({"input": {"name": "input", "shape": [28, 28], "dtype": "float32"}}, r"input must hold .*\[C, H, W\]"),
])
def test_bad_manifests_name_the_key(exported, tmp_path, changes, words):
    with pytest.raises(ModelError, match=words):
        runtime.load(_variant(exported[2], tmp_path, **changes))


def test_graph_names_must_match_the_manifest(exported, tmp_path):
    manifest = json.loads((exported[2] / "manifest.json").read_text())
    manifest["segments"][0]["output"] = "features"
    with pytest.raises(ModelError, match="segment0.onnx has inputs"):
        runtime.load(_variant(exported[2], tmp_path, segments=manifest["segments"]))


def test_graph_files_must_stay_inside_the_export_folder(exported, tmp_path):
    """A manifest naming another export's graph ('..', an absolute path or a link out of the
    folder) is refused before any graph is opened, not run as if it were this model's."""
    other = exported[3]  # the plain export: a valid graph, but another model
    manifest = json.loads((exported[2] / "manifest.json").read_text())
    for i, escape in enumerate([os.path.relpath(other / "segment0.onnx", tmp_path / "v0"),
                                str(other / "segment0.onnx"), "link.onnx"]):
        segments = [dict(g) for g in manifest["segments"]]
        segments[0]["file"] = escape
        folder = tmp_path / f"v{i}"
        folder.mkdir()
        _variant(exported[2], folder, segments=segments)
        (folder / "link.onnx").symlink_to(other / "segment0.onnx")
        with pytest.raises(ModelError, match="is not inside the export folder"):
            runtime.load(folder)
    segments[0]["file"] = "segment0.onnx"  # a link inside the folder is fine
    (folder / "inside.onnx").symlink_to(folder / "segment0.onnx")
    segments[0]["file"] = "inside.onnx"
    _variant(exported[2], folder, segments=segments)
    runtime.load(folder)
