"""Model zoo: shapes at MNIST and CIFAR sizes, the structure contract, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ordercomp import models

ALL = models.names()


def _run(model, x):
    """One forward pass; returns the logits, the features' output and the classifier's input."""
    seen = {}
    hooks = [
        model.features.register_forward_hook(lambda m, i, o: seen.update(features=o)),
        model.classifier.register_forward_hook(lambda m, i, o: seen.update(classifier_in=i[0], classifier_out=o)),
    ]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    assert out is seen["classifier_out"]
    return out, seen["features"], seen["classifier_in"]


@pytest.mark.parametrize("name", ALL)
def test_every_model_runs_at_mnist_and_cifar_sizes_with_the_structure_contract(name):
    for in_channels, size in [(1, 28), (3, 32)]:
        model = models.create(name, num_classes=7, in_channels=in_channels)
        out, features, classifier_in = _run(model, torch.randn(1, in_channels, size, size))
        assert out.shape == (1, 7) and torch.isfinite(out).all()
        assert classifier_in is features
    assert isinstance(model.features, nn.Sequential) and all(isinstance(s, nn.Sequential) for s in model.features)
    assert isinstance(model.classifier, nn.Sequential)
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].out_features == 7
    points = model.default_exit_points()
    assert points and points == sorted(set(points))
    assert 0 <= points[0] and points[-1] < len(model.features) - 1


def test_resnet_stages_and_exit_points():
    r34 = models.create("resnet34")
    assert list(r34.features._modules) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [len(r34.features[i]) for i in range(1, 5)] == [3, 4, 6, 3]
    assert r34.default_exit_points() == [1, 2, 3]
    r8 = models.create("resnet8")
    assert [len(s) for s in r8.features[1:]] == [1, 1, 1] and r8.default_exit_points() == [1, 2]


def test_resnet_shortcuts_are_1x1_convs_only_where_the_shape_changes():
    r18 = models.create("resnet18")
    shortcuts = [n for n, m in r18.named_modules() if n.endswith("shortcut") and len(m)]
    assert shortcuts == ["features.layer2.0.shortcut", "features.layer3.0.shortcut", "features.layer4.0.shortcut"]
    assert r18.features.layer2[0].shortcut[0].kernel_size == (1, 1)


def test_vgg_stages_end_in_max_pool_and_convs_have_bias():
    vgg = models.create("vgg19")
    assert len(vgg.features) == 5
    assert all(isinstance(stage[-1], nn.MaxPool2d) for stage in vgg.features)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is not None for c in convs)
    assert [m for m in vgg.classifier if isinstance(m, nn.Linear)][0].in_features == 512


def test_mobilenetv2_strides_and_width():
    net = models.create("mobilenetv2")
    strides = [group[0].stride for group in net.features[1:-1]]
    assert strides == [1, 1, 2, 2, 1, 2, 1]
    assert net.features[0].conv.stride == (1, 1)
    half = models.create("mobilenetv2", width_mult=0.5)
    assert half.features[0].conv.out_channels == 16 and half.features[-2][-1].conv3.out_channels == 160
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in net.parameters()) / 2
    with pytest.raises(ValueError, match="width_mult must be > 0"):
        models.create("mobilenetv2", width_mult=0)


def test_dropout_goes_before_the_linear_classifier():
    model = models.create("resnet8", dropout=0.2)
    assert isinstance(model.classifier[-2], nn.Dropout) and model.classifier[-2].p == 0.2
    assert not any(isinstance(m, nn.Dropout) for m in models.create("resnet8").modules())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model name 'resnet99'.*resnet18.*vgg19.*mobilenetv2"):
        models.create("resnet99")
    with pytest.raises(ValueError, match="known names"):
        models.family("nope")


@pytest.mark.parametrize("arg", ["num_classes", "in_channels"])
def test_bad_sizes(arg):
    with pytest.raises(ValueError, match=f"{arg} must be an integer >= 1, got 0"):
        models.create("resnet8", **{arg: 0})


def test_families_and_students():
    assert models.family("resnet34") == "resnet" and models.family("vgg13") == "vgg"
    assert models.student_of("resnet34") == ("resnet18", {})
    assert models.student_of("resnet18", num_classes=100) == ("resnet10", {"num_classes": 100})
    assert models.student_of("vgg19") == ("vgg11", {})
    assert models.student_of("mobilenetv2") == ("mobilenetv2", {"width_mult": 0.5})
    assert models.student_of("mobilenetv2", width_mult=0.5) == ("mobilenetv2", {"width_mult": 0.25})
    assert models.student_of("resnet10") is None and models.student_of("vgg11") is None
    for teacher in models.names():
        pair = models.student_of(teacher)
        if pair is not None:
            name, kwargs = pair
            assert models.family(name) == models.family(teacher)
            student, big = models.create(name, **kwargs), models.create(teacher)
            assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in big.parameters())
