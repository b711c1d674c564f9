"""Pruning across channel shuffles: found while the model runs, and the pruning stays exact.

Exactness: for every pruning group, zero the channels it removes, run the model, remove them,
run it again; the outputs must agree. A pruner that removed the wrong channels behind a
shuffle would change them.
"""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from gallery import GALLERY, channel_shuffle, conv_bn
from torch import nn

from ordercomp.stages.depgraph import TiedImportance, coupled_channels, find_channel_shuffles, pruner_arguments


class Hybrid(nn.Module):
    """A shuffle feeding a residual block, and a shuffle feeding a depthwise conv."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, stride=2)
        self.a, self.b = conv_bn(16, 16), conv_bn(16, 16, relu=False)
        self.mid, self.dw = conv_bn(16, 16), conv_bn(16, 16, groups=16)
        self.head, self.fc = conv_bn(16, 32, 1), nn.Linear(32, num_classes)

    def forward(self, x):
        x = channel_shuffle(self.stem(x), 4)
        x = torch.relu(self.b(self.a(x)) + x)
        x = channel_shuffle(self.mid(x), 2)
        return self.fc(self.head(self.dw(x)).mean((2, 3)))


def _zero(group) -> None:
    with torch.no_grad():
        for dep, idxs in group:
            m = dep.target.module
            if not group._DG.is_out_channel_pruning_fn(dep.handler):
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.weight[idxs] = 0
                if m.bias is not None:
                    m.bias[idxs] = 0


def test_channel_shuffles_are_found_where_they_run():
    x = torch.randn(2, 1, 28, 28)
    assert find_channel_shuffles(GALLERY["shufflenet"](), x) == ["stage.0", "stage.1", "stage.2"]
    assert find_channel_shuffles(Hybrid(), x) == [""]  # in the model's own forward
    for name in ("resnet", "densenet", "inception", "mobilenet"):
        assert find_channel_shuffles(GALLERY[name](), x) == []


@pytest.mark.parametrize("make,pruned_layers", [
    (GALLERY["shufflenet"], ["stem.0", "stage.0.branch1.0.0", "stage.0.branch2.0.0", "stage.0.branch2.1.0",
                             "stage.1.branch2.0.0", "stage.1.branch2.1.0", "stage.2.branch2.0.0", "stage.2.branch2.1.0"]),
    (Hybrid, ["a.0", "head.0"]),
    (GALLERY["resnet"], ["stem.0", "layer1.conv1.0", "layer1.conv2.0", "layer2.conv1.0", "layer2.conv2.0",
                         "layer2.shortcut.0"]),
], ids=["shufflenet", "hybrid", "resnet"])
def test_pruning_around_shuffles_is_exact(make, pruned_layers):
    model = make().eval()
    x, probe = torch.randn(2, 1, 28, 28), torch.randn(4, 1, 28, 28)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  **pruner_arguments(model, x, [model.fc]))
    worst = 0.0
    for group in pruner.step(interactive=True):
        _zero(group)
        with torch.no_grad():
            before = model.eval()(probe)
        group.prune()
        with torch.no_grad():
            worst = max(worst, float((model(probe) - before).abs().max()))
    assert worst < 1e-5
    pruned = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels < widths[n]]
    assert pruned == pruned_layers  # the layers whose channels do not cross a shuffle


def test_channels_pruned_only_together_are_found_and_ranked_as_one():
    """A ghost module's output channels ``k`` and ``k + C`` prune together (the second half is a
    depthwise conv of the first); a strided depthwise conv reading them is a group's root."""
    model = GALLERY["ghostnet"](in_channels=3).eval()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(2, 3, 16, 16))
    dw = model.blocks[1].dw[0]  # reads the 48 channels of ghost1: 24 from the 1x1 conv, 24 made from them
    assert coupled_channels(graph, dw, tp.prune_conv_out_channels, 48) == [[k, k + 24] for k in range(24)]
    assert coupled_channels(graph, model.stem[0], tp.prune_conv_out_channels, 16) == [[k, k + 8] for k in range(8)]
    # (the stem's channels meet the ghost module ending block 0 in the residual sum)
    assert coupled_channels(graph, model.blocks[0].se.reduce, tp.prune_conv_out_channels, 8) == []

    importance = TiedImportance(p=1)
    importance.graph = graph
    group = graph.get_pruning_group(dw, tp.prune_conv_out_channels, list(range(48)))
    tied, plain = importance(group), tp.importance.MagnitudeImportance(p=1)(group)
    assert torch.allclose(tied[:24], (plain[:24] + plain[24:]) / 2) and torch.equal(tied[:24], tied[24:])
