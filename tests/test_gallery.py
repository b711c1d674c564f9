"""The default compress() on foreign architectures (tests/gallery.py), end to end on real digits.

Each model runs the default order (DPQE) with automatic exit points on a tiny budget. The tests
check what each stage did to the layer that makes the architecture what it is (D's thinner copy
and then P remove its channels), that the exits found are where they should be, that the result
runs dynamic inference with exits taken, and that unused layers are left alone and reported.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import config_of, paying_exits
from gallery import GALLERY
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp.nn import ExitNet
from ordercomp.stages import sweep
from ordercomp.stages.prune import prune_channels

# name -> (input channels, the characteristic layer, the exit points found)
CASES = {
    "vgg": (1, "features.3.0", ["features.2", "features.3", "features"]),
    "resnet": (3, "layer1.conv1.0", ["stem", "layer1"]),
    "mobilenet": (1, "blocks.1.depthwise.0", ["blocks.0", "blocks.1", "blocks"]),
    "resnext": (1, "layer1.grouped.0", ["stem", "layer1"]),
    "inception": (3, "block1.branch3.0.0", ["stem", "pool1"]),
    "densenet": (1, "block1.0.conv", ["block1.0", "transition.1", "transition"]),
    "senet": (3, "layer2.se.reduce", ["stem", "layer1"]),
    "shufflenet": (3, "stage.1.branch2.0.0", ["stem", "stage.0", "stage.1"]),
    "sized_shufflenet": (3, "stage.1.branch2.0.0", ["stem", "stage.0", "stage.1"]),  # fx keeps its units whole
    "ghostnet": (3, "blocks.1.dw.0", ["stem", "blocks.0", "blocks.1"]),
    "allconv": (1, "features.2.0", ["features.0", "features.1", "features.2"]),
    "dictnet": (1, "layer1.conv1.0", ["stem", "layer1"]),
    "auxnet": (1, "aux_head.0.0", ["stage1.0", "stage1", "stage2.0"]),
}


def digits(mnist_small, channels: int):
    """Real digits: 1 x 28 x 28, or padded to 32 x 32 and repeated over 3 channels."""
    x_train, y_train, x_test, y_test = mnist_small
    if channels == 3:
        x_train, x_test = (F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1) for x in (x_train, x_test))
    train = DataLoader(TensorDataset(x_train[:256], y_train[:256]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x_test[:128], y_test[:128]), batch_size=64)
    return train, val


def width_of(layer: str):
    """A report metric: the output channels of ``layer`` (found under an ExitNet's segments too)."""

    def width(model: nn.Module, loader) -> float:
        for name, m in model.named_modules():
            if name == layer or name.endswith("." + layer):
                return float(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        return math.nan  # not in this model (an auxiliary head is not part of an ExitNet)

    width.__name__ = "width"
    return width


@pytest.mark.parametrize("name", list(CASES))
def test_default_compress_runs_on_a_foreign_architecture(name, mnist_small):
    channels, layer, points = CASES[name]
    train, val = digits(mnist_small, channels)
    model = GALLERY[name](in_channels=channels)
    result = ordercomp.compress(model, train, val, config=config_of(epochs=1, max_batches=2, progress=False),
                                metric=width_of(layer), stages={"E": paying_exits()})
    report = result.report
    assert [s["stage"] for s in report["stages"]] == list("DPQE")
    assert report["exit_points"] == {"points": points, "source": "found"}
    assert "exit points (found automatically): " + ", ".join(points) in str(result)

    widths = [report["original"]["width"]] + [s["width"] for s in report["stages"][:2]]
    assert widths[0] > widths[1] > widths[2], f"{layer}: original, after D, after P = {widths}"

    net = result.model
    assert isinstance(net, ExitNet) and net.points == points and net.num_exits == len(points) + 1
    example = next(iter(val))[0][:2]
    point = sweep(net, val, [0.1], example)[0]  # max softmax >= 1/10: every input leaves at the first head
    assert point.exit_fractions[0] == 1.0
    net.eval()
    with torch.no_grad():
        first_head = torch.cat([net(x)[0].argmax(1) == y for x, y in val])
    assert point.accuracy == pytest.approx(100.0 * first_head.float().mean().item())
    assert report["stages"][-1]["info"]["points"] == points


def test_layers_never_run_are_left_alone_and_reported(mnist_small):
    train, val = digits(mnist_small, 1)
    model = GALLERY["mobilenet"](in_channels=1)
    example = next(iter(val))[0][:2]
    unused = model.blocks[0].expand[0]
    before = unused.weight.clone()
    prune_channels(model, 0.5, example)
    assert unused.weight.shape == before.shape and torch.equal(unused.weight, before)
    assert model.blocks[0].depthwise[0].out_channels == 4  # the rest was pruned
    for mode in (True, False):
        model.train(mode)(example)

    result = ordercomp.compress(GALLERY["mobilenet"](in_channels=1), train, val,
                                config=config_of("P", epochs=1, max_batches=1, progress=False))
    assert result.report["stages"][0]["info"]["unused_layers"] == ["blocks.0.expand.0"]


def test_an_auxiliary_head_is_pruned_with_the_body_and_trains(mnist_small):
    train, _ = digits(mnist_small, 1)
    model = GALLERY["auxnet"](in_channels=1)
    example = next(iter(train))[0][:2]
    prune_channels(model, 0.5, example)
    assert model.aux_head[0][0].in_channels == model.stage1[1][0].out_channels == 8
    assert model.aux_head[3].out_features == model.fc.out_features == 10  # both classifiers keep their classes
    logits, aux = model.train()(example)
    assert logits.shape == aux.shape == (2, 10)
