"""Each stage on its effect: smaller students that learn, channels removed, weight levels, exit rates and costs."""

from __future__ import annotations

import collections
import copy
import functools
import re

from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
from conftest import count_accuracy, load_mnist24k
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ordercomp import bitops, models
from ordercomp.errors import ConfigError, ModelError
from ordercomp.losses import kd_loss
from ordercomp.nn import ExitNet, QuantConv2d, QuantLayer, QuantLinear, attach_exits, quantize_model
from ordercomp.stages import (
    NO_EXIT,
    Distill,
    EarlyExit,
    Prune,
    Quantize,
    channel_counts,
    derive_student,
    prune_channels,
    sweep,
)
from ordercomp.pipeline import CompressConfig, run_stage
from ordercomp.stages import Context
from ordercomp.train import TrainConfig, Trainer

N_TRAIN, N_VAL = 1024, 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread, and much faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _data():
    xtr, ytr, xte, yte = load_mnist24k(N_TRAIN, N_VAL)
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)


def loaders(batch_size: int = 32):
    train, val = _data()
    g = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=g), DataLoader(val, batch_size=128)


@functools.lru_cache(maxsize=None)
def _trained_resnet8() -> nn.Module:
    """Trained on two threads, whichever test asks first (this module's run on one, other modules' on
    the machine's default): the weights then depend neither on the order the tests run in nor on
    the machine's cores (on one thread the README's own-loop test trains exits that never pay off)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = models.create("resnet8", in_channels=1)
        Trainer(TrainConfig(epochs=3, lr=0.1, progress=False)).fit(model, loaders()[0])
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def teacher() -> nn.Module:
    """A resnet8 trained for 96 batches on real digits (about 80 %); a fresh copy each call."""
    return copy.deepcopy(_trained_resnet8())


def context(model: nn.Module, max_batches: int = 2, epochs: int = 1, lr: float = 0.05, train_loader=None) -> Context:
    train, val = loaders()
    ctx = Context.create(model, train, val, TrainConfig(epochs=epochs, max_batches=max_batches, lr=lr, progress=False))
    if train_loader is not None:
        ctx.train_loader = train_loader
    return ctx


class Untouchable:
    """A training loader that fails the test if anything starts training."""

    batch_size = 32

    def __len__(self):
        return 4

    def __iter__(self):
        raise AssertionError("training started before the input was validated")


def val_batch():
    return next(iter(loaders()[1]))


# ----------------------------------------------------------------------------- D


@pytest.mark.slow
def test_distill_gives_a_smaller_student_that_learns_from_the_teacher():
    t = teacher()
    ctx = context(t, max_batches=20, epochs=2, lr=0.1)
    result = run_stage(Distill(), t, ctx)
    student = result.model
    assert result.info["student_params"] < result.info["teacher_params"] / 3
    assert result.accuracy > 30.0  # chance is 10 %
    assert result.accuracy == pytest.approx(count_accuracy(student, ctx.val_loader), abs=1e-9)
    losses = result.info["train_loss"]
    assert losses[1] < losses[0]
    x, _ = val_batch()
    untrained = derive_student(t, ctx.example_input)
    student.eval(), untrained.eval(), t.eval()
    with torch.no_grad():
        kd_after, kd_before = kd_loss(student(x), t(x)), kd_loss(untrained(x), t(x))
    assert float(kd_after) < 0.5 * float(kd_before)


def test_zoo_students_are_the_shallower_member_and_keep_exits():
    x = torch.randn(2, 1, 28, 28)
    big = models.create("resnet20", in_channels=1)
    assert models.identify(big) == ("resnet20", {})
    student = derive_student(big, x)
    assert models.identify(student) == ("resnet8", {})
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in big.parameters()) / 3
    thin = derive_student(models.create("resnet8", in_channels=1), x)  # smallest member: a thinner copy
    assert models.identify(thin) is None and channel_counts(thin)["features.layer3.0.conv2"] == 32

    exits = attach_exits(big, example_input=x)
    ctx = context(big)  # the context knows the architecture being compressed: resnet20
    s, architecture = Distill().build_student(exits, ctx)
    assert isinstance(s, ExitNet) and s.num_exits == exits.num_exits and architecture["zoo"] == "resnet8"


def test_the_student_starts_from_the_teachers_weights_unless_asked_otherwise():
    torch.manual_seed(0)
    big = models.create("resnet20", in_channels=1)
    ctx = context(big)
    student, _ = Distill().build_student(big, ctx)  # resnet8: the stem, each stage's first block, the classifier
    mine, theirs = student.state_dict(), big.state_dict()
    assert len(mine) == 56 and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    fresh, _ = Distill(init="random").build_student(big, ctx)
    assert not torch.equal(fresh.state_dict()["features.layer1.0.conv1.weight"], theirs["features.layer1.0.conv1.weight"])

    small = teacher()  # the smallest member: a thinner copy keeps the weights of the channels it keeps
    thin, _ = Distill().build_student(small, context(small))
    kept, full = thin.state_dict()["features.stem.conv.weight"], small.state_dict()["features.stem.conv.weight"]
    assert kept.shape[0] == full.shape[0] // 2  # the stem reads the image, so its filters are kept whole
    assert all(bool((full == row).flatten(1).all(1).any()) for row in kept)
    given = models.create("resnet8", in_channels=1)
    as_given, _ = Distill(student=given).build_student(big, ctx)
    assert all(torch.equal(v, given.state_dict()[k]) for k, v in as_given.state_dict().items()), "yours stays yours"
    with pytest.raises(ValueError, match="init must be one of"):
        Distill(init="imagenet")


def test_distill_with_crd_uses_sample_indices():
    t = teacher()
    ctx = context(t, max_batches=3)
    kd_only = run_stage(Distill(crd=False), copy.deepcopy(t), ctx)
    with_crd = run_stage(Distill(crd=True, beta=0.8, crd_negatives=256), t, ctx)
    assert with_crd.info["train_loss"][0] > kd_only.info["train_loss"][0]  # the CRD term adds to the loss
    assert all(torch.isfinite(p).all() for p in with_crd.model.parameters())


def test_given_student_must_match_the_classes_before_training():
    t = teacher()
    ctx = context(t, max_batches=2)
    given = models.create("resnet8", in_channels=1)
    result = run_stage(Distill(student=given), t, ctx)
    assert result.model is not given and isinstance(result.model, type(given))
    ctx.train_loader = Untouchable()
    with pytest.raises(ValueError, match="student has 7 output classes but the teacher has 10"):
        run_stage(Distill(student=models.create("resnet8", num_classes=7, in_channels=1)), t, ctx)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 1.5}, "width must be a number in (0, 1] or None"),
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"alpha": 0, "gamma": 0}, "alpha and gamma must not both be 0 without crd"),
        ({"alpha": 0, "beta": 0, "gamma": 0, "crd": True}, "alpha, beta and gamma must not all be 0"),
        ({"beta": -0.5}, "beta must be a finite number >= 0"),
        ({"student": "resnet99"}, "student must be a zoo name"),
        ({"crd": True, "crd_negatives": 0}, "crd_negatives must be an integer >= 1"),
        ({"kd_alpha": 2}, "kd_alpha must be a number in [0, 1]"),
    ],
)
def test_distill_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Distill(**kwargs)


# ----------------------------------------------------------------------------- P


@pytest.mark.parametrize("ratio, widths", [(0.5, (8, 16, 32)), (0.25, (12, 24, 48))])
def test_prune_removes_the_ratio_of_every_layer(ratio, widths):
    model = models.create("resnet8", in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    before = channel_counts(model)
    prune_channels(model, ratio, x)
    after = channel_counts(model)
    for name, n in before.items():
        assert after[name] == (n if name == "classifier.fc" else round(n * (1 - ratio))), name
    expected = models.ResNet([1, 1, 1], widths, in_channels=1)  # the same network built thinner
    assert bitops.profile(model, x).macs == bitops.profile(expected, x).macs
    assert bitops.profile(model, x).params == bitops.profile(expected, x).params
    full = bitops.profile(models.create("resnet8", in_channels=1), x).macs
    assert bitops.profile(model, x).macs < full * ((1 - ratio) + 0.02)


@pytest.mark.parametrize("ratio, round_to, up, widths", [
    (0.4, 1, 1, (9, 19, 38)), (0.4, 8, 1, (8, 16, 32)), (0.4, 4, 1, (8, 16, 36)), (0.6, 8, 1, (8, 8, 24)),
    (0.4, 16, 1, (16, 16, 32)), (0.4, 1, 8, (16, 24, 40)), (0.3, 1, 4, (12, 24, 44)), (0.5, 1, 8, (8, 16, 32))])
def test_prune_rounds_the_kept_channels(ratio, round_to, up, widths):
    """40 % of 16 / 32 / 64 channels leaves 9.6 / 19.2 / 38.4, of which Torch-Pruning keeps 9 / 19 / 38,
    or a multiple of ``round_to`` (8 / 16 / 32 for 8, 8 / 16 / 36 for 4); the classifier keeps its outputs.
    Where rounding down would keep no channel (60 % of 16 leaves 7, rounded to 8: 0; 40 % leaves 10,
    rounded to 16: 0) the group keeps ``round_to`` of them, or all when it has no more (Torch-Pruning
    alone left the 16 channels whole at 60 %: a stronger ratio gave a wider layer). ``round_up_to``
    rounds up: 10 / 20 / 39 to 16 / 24 / 40 for 8; 30 % leaves 12 / 23 / 45, to 12 / 24 / 44 for 4."""
    model = models.create("resnet8", in_channels=1)
    prune_channels(model, ratio, torch.randn(2, 1, 28, 28), round_to=round_to, round_up_to=up)
    counts = channel_counts(model)
    assert [counts[n] for n in ("features.stem.conv", "features.layer2.0.conv1", "features.layer3.0.conv1")] == list(widths)
    assert counts["classifier.fc"] == 10


def test_prune_stage_passes_round_to_and_refuses_zero():
    assert CompressConfig().override(["prune.round_to=8"]).prune.round_to == 8
    assert CompressConfig().override(["prune.round_up_to=8"]).prune.round_up_to == 8
    with pytest.raises(ConfigError, match="prune.round_to must be an integer >= 1, got 0"):
        CompressConfig().override(["prune.round_to=0"])
    with pytest.raises(ConfigError, match="prune.round_up_to must be an integer >= 1, got 1.5"):
        CompressConfig().override(["prune.round_up_to=1.5"])
    with pytest.raises(ConfigError, match=r"prune.round_to \(8\) rounds the kept channels down and round_up_to \(8\) up"):
        CompressConfig().override(["prune.round_to=8", "prune.round_up_to=8"])


@pytest.mark.parametrize("importance, p", [("l1", 1), ("l2", 2)])
def test_prune_keeps_the_largest_filters(importance, p):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 24 * 24, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 1, 3, 3) * torch.tensor([0.1, 5.0, 0.2, 3.0]).view(4, 1, 1, 1))
    norms = model[0].weight.flatten(1).norm(p=p, dim=1)
    keep = sorted(norms.topk(2).indices.tolist())
    kept_weights = model[0].weight[keep].clone()
    prune_channels(model, 0.5, torch.randn(1, 1, 28, 28), importance=importance)
    assert torch.equal(model[0].weight, kept_weights)
    assert model[2].in_channels == 2 and model[4].out_features == 3


def test_prune_handles_quantized_layers_and_exit_heads():
    x = torch.randn(2, 1, 28, 28)
    model, _ = quantize_model(models.create("resnet8", in_channels=1), 4, 8, example_input=x)
    net = attach_exits(model, example_input=x)
    prune_channels(net, 0.5, x)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, QuantConv2d) for m in convs)
    assert [h.fc.in_features for h in net.heads] == [8, 16] and [h.fc.out_features for h in net.heads] == [10, 10]
    assert net.classifiers()[-1].in_features == 32 and net.classifiers()[-1].out_features == 10
    assert all(o.shape == (2, 10) for o in net(x))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.from_numpy(self.conv1(x).detach().numpy())  # leaves autograd: conv1 cannot be traced
        return self.fc(self.conv2(x).mean((2, 3)))


def test_prune_names_the_layer_it_cannot_trace():
    model = _Untraceable()
    with pytest.raises(ValueError, match="layer 'conv1' is not on the autograd path"):
        prune_channels(model, 0.5, torch.randn(1, 1, 12, 12))
    assert model.conv1.out_channels == 4


def test_layers_to_leave_whole_are_named_by_pattern_in_the_config():
    model = models.create("resnet8", in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    prune_channels(model, 0.5, x, ignored_layers=["layer2.*.conv1"])  # a tail pattern, as an ExitNet prefixes names
    counts = channel_counts(model)
    assert counts["features.layer2.0.conv1"] == 32 and counts["features.layer2.0.conv2"] == 16
    config = CompressConfig().override(["prune.ignored_layers=['*.se.*', 'stem.conv']",
                                        "distill.ignored_layers=stem.conv"])
    assert config.prune.ignored_layers == ("*.se.*", "stem.conv") and config.distill.ignored_layers == ("stem.conv",)
    with pytest.raises(ConfigError, match=r"prune.ignored_layers: 'layer2.0.conv3' names no conv or linear layer "
                                          r"of ResNet; did you mean \['features.layer2.0.conv2', 'features.layer2.0.conv1'"):
        Prune(ignored_layers=["layer2.0.conv3"]).check_model(models.create("resnet8", in_channels=1), _context(x))
    with pytest.raises(ConfigError, match=r"prune.ignored_layers must be a list of layer names or patterns"):
        Prune(ignored_layers=[3])


def _context(x):
    return SimpleNamespace(example_input=x, output=None, device=torch.device("cpu"), zoo_spec=None)


def test_a_layer_the_pruner_fails_on_is_named_before_training_with_the_setting_that_avoids_it(monkeypatch):
    """Torch-Pruning ending in a raw IndexError inside one group (as on some real models) is caught
    by the pre-flight on a copy, named by layer with the fix; that fix makes the model prunable."""
    original = tp.dependency.Group.prune

    def failing(group, *args, **kwargs):
        if getattr(group[0].dep.target.module, "fails_here", False):  # a mark that copies keep
            raise IndexError("index 12 is out of bounds for dimension 0 with size 8")
        return original(group, *args, **kwargs)

    monkeypatch.setattr(tp.dependency.Group, "prune", failing)
    model, x = models.create("resnet8", in_channels=1), torch.randn(2, 1, 28, 28)
    model.features.layer2[0].conv1.fails_here = True
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=r"cannot prune ResNet at layer 'features.layer2.0.conv1': Torch-Pruning "
                                         r"failed on its channels \(IndexError: index 12 .*\); leave it whole with "
                                         r"prune.ignored_layers=\['features.layer2.0.conv1'\]"):
        Prune().check_model(model, _context(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the check pruned a copy
    with pytest.raises(ModelError, match=r"distill.ignored_layers=\['features.layer2.0.conv1'\]"):
        Distill().check_model(model, _context(x))
    Prune(ignored_layers=["features.layer2.0.conv1"]).check_model(model, _context(x))


def test_a_group_the_pruner_cannot_rank_stays_whole_and_is_named(monkeypatch):
    """Torch-Pruning's index mapping fails on some cross-stage splits (an IndexError while ranking
    a CSP block's channels): that group stays whole, the rest is pruned, and a warning names it."""
    rank = tp.importance.MagnitudeImportance.__call__

    def failing(self, group, *args, **kwargs):
        if getattr(group[0].dep.target.module, "fails_here", False):
            raise IndexError("index 256 is out of bounds for dimension 0 with size 256")
        return rank(self, group, *args, **kwargs)

    monkeypatch.setattr(tp.importance.MagnitudeImportance, "__call__", failing)
    model, x = models.create("resnet8", in_channels=1), torch.randn(2, 1, 28, 28)
    model.features.layer2[0].conv1.fails_here = True
    Prune().check_model(model, _context(x))  # the pre-flight passes: the model prunes, less that group
    with pytest.warns(UserWarning, match=r"cannot prune \['features.layer2.0.conv1'\] \((IndexError: )?"
                                         r"index 256 .*\): they stay whole \(prune.ignored_layers="):
        prune_channels(model, 0.5, x, setting="prune.ignored_layers")
    counts = channel_counts(model)
    assert counts["features.layer2.0.conv1"] == 32 and counts["features.layer2.0.conv2"] == 16
    assert model(x).shape == (2, 10)


def test_building_the_pruner_stops_at_its_time_limit_with_a_way_out(monkeypatch):
    import time

    from ordercomp.stages import prune

    build = tp.pruner.MetaPruner.__init__

    def slow(self, *args, **kwargs):
        time.sleep(2)  # a dependency graph Torch-Pruning takes minutes to build
        build(self, *args, **kwargs)

    monkeypatch.setattr(tp.pruner.MetaPruner, "__init__", slow)
    monkeypatch.setattr(prune, "SETUP_LIMIT", 0.2)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot prune ResNet: building the pruner's dependency graph of its 10 conv "
                                         r"/ linear layers took more than 0.2 s; leave P out of the order"):
        prune_channels(models.create("resnet8", in_channels=1), 0.5, torch.randn(2, 1, 28, 28))
    assert time.perf_counter() - start < 1.5


def test_a_dependency_group_that_never_stops_growing_is_left_whole_in_seconds():
    """ReXNet's partial shortcuts send Torch-Pruning's index mapping round a cycle: six such blocks
    take it about a minute (each one more, several times that); the layers of that group stay whole."""
    import time

    from gallery import ReXNet

    model, x = ReXNet(in_channels=3), torch.randn(2, 3, 16, 16)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=r"Torch-Pruning cannot prune \[.*'blocks.5.conv.1.0'.*\] \(its dependency "
                                         r"group keeps growing \(channel slices inside a residual\)\): they stay whole"):
        prune_channels(model, 0.5, x)
    assert time.perf_counter() - start < 10
    assert model(x).shape == (2, 10)


def test_a_ghost_module_prunes_like_any_other_layer():
    """GhostNet: ranked channel by channel, the pruner picked half of a ghost module's output, the
    partners of those channels added the other half, and it dropped the group as one that would
    remove every channel: every ghost module stayed whole (10 % of timm's GhostNet pruned, not 50 %)."""
    from gallery import GhostNet

    model, x = GhostNet(in_channels=3), torch.randn(2, 3, 16, 16)
    before = channel_counts(model)
    prune_channels(model, 0.5, x)
    after = channel_counts(model)
    assert {n: after[n] for n in before if n != "fc"} == {n: before[n] // 2 for n in before if n != "fc"}
    assert model(x).shape == (2, 10)


class _MixConv(nn.Module):
    """MixNet's mixed depthwise convolution: the channels split into fixed sizes, one kernel size each."""

    def __init__(self, channels: int):
        super().__init__()
        self.sizes = [channels // 2, channels - channels // 2]
        self.convs = nn.ModuleList(nn.Conv2d(n, n, k, padding=k // 2, groups=n) for n, k in zip(self.sizes, (3, 5)))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.sizes, 1))], 1)


def test_layers_whose_pruning_breaks_a_module_stay_whole_and_the_rest_is_pruned():
    model = nn.Sequential(collections.OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1), relu=nn.ReLU(), mix=_MixConv(16), expand=nn.Conv2d(16, 32, 1),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(32, 10)))
    x = torch.randn(2, 3, 8, 8)
    Prune().check_model(model, _context(x))
    with pytest.warns(UserWarning, match=r"cannot prune \['mix.convs.0', 'mix.convs.1', 'stem'\] \(the pruned model "
                                         r"fails in 'mix': split_with_sizes expects split_sizes to sum exactly to 8"):
        prune_channels(model, 0.5, x)
    counts = channel_counts(model)
    assert (counts["stem"], counts["mix.convs.0"], counts["expand"], counts["fc"]) == (16, 8, 16, 10)
    assert model(x).shape == (2, 10)


def test_a_pruned_model_that_no_longer_runs_is_refused_before_training_naming_the_layer():
    class Scaled(nn.Module):  # a per-channel scale the pruner does not know belongs to conv1's channels
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)
            self.register_buffer("scale", torch.ones(1, 8, 1, 1))

        def forward(self, x):
            return self.fc(self.conv2(self.conv1(x) * self.scale).mean((2, 3)))

    with pytest.raises(ModelError, match=r"cannot prune Scaled: the pruned model fails"):
        Prune().check_model(Scaled(), _context(torch.randn(2, 1, 12, 12)))


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, True, "0.5"])
def test_prune_rejects_ratios_outside_0_1(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\)"):
        Prune(ratio=ratio)


# ----------------------------------------------------------------------------- Q


def _distinct_levels(layers):
    seen = {}

    def hook(module, args):
        seen[module] = torch.unique(module.quantize_input(args[0])).numel()

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    return seen, handles


@pytest.mark.parametrize("w_bits, a_bits", [(2, 4), (1, 8), (4, 2)])
def test_quantize_leaves_at_most_2_to_the_k_levels(w_bits, a_bits):
    t = teacher()
    result = run_stage(Quantize(w_bits=w_bits, a_bits=a_bits), t, context(t))
    layers = [m for m in result.model.modules() if isinstance(m, QuantLayer)]
    names = {m: n for n, m in result.model.named_modules()}
    assert len(layers) == len(channel_counts(result.model))  # every conv / linear is quantized
    first, last = layers[0], result.model.classifier.fc
    assert (first.w_bits, first.a_bits) == (8, 8) and (last.w_bits, last.a_bits) == (8, 8)
    body = [m for m in layers if m is not first and m is not last]
    assert all((m.w_bits, m.a_bits) == (w_bits, a_bits) for m in body)
    for m in layers:
        assert torch.unique(m.quantized_weight().detach()).numel() <= 2 ** m.w_bits, names[m]
    seen, handles = _distinct_levels(layers)
    result.model.eval()
    with torch.no_grad():
        result.model(val_batch()[0])
    for h in handles:
        h.remove()
    assert all(seen[m] <= 2 ** m.a_bits for m in layers)
    assert max(seen[m] for m in body) > 1  # activations are really quantized, not all clipped away
    assert result.bitops_cr > 32 * 32 / (8 * 8)


def test_quantize_exit_net_quantizes_heads_and_requantizes():
    x = torch.randn(2, 1, 28, 28)
    t = teacher()
    net = attach_exits(t, example_input=x)
    ctx = context(t)
    net = Quantize(w_bits=4, a_bits=8, finetune=False).prepare(net, ctx).model
    assert all(isinstance(h.fc, QuantLinear) and (h.fc.w_bits, h.fc.a_bits) == (8, 8) for h in net.heads)
    conv = net.segments[1][0][0].conv1
    assert (conv.w_bits, conv.a_bits) == (4, 8)
    net = Quantize(w_bits=2, a_bits=4, finetune=False).prepare(net, ctx).model
    assert (conv.w_bits, conv.a_bits) == (2, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"w_bits": 0}, "w_bits must be an integer in 1..8, got 0"),
        ({"w_bits": 9}, "w_bits must be an integer in 1..8, got 9"),
        ({"a_bits": 1}, "a_bits must be an integer in 2..8, got 1"),
        ({"a_bits": 16}, "a_bits must be an integer in 2..8, got 16"),
        ({"policy": "some"}, "policy must be"),
    ],
)
def test_quantize_rejects_bits_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quantize(**kwargs)


# ----------------------------------------------------------------------------- E


def test_early_exit_thresholds_route_inputs_and_costs_match_the_accounting():
    t = teacher()
    ctx = context(t, max_batches=10, lr=0.1)
    before = copy.deepcopy(t.state_dict())
    # any loss allowed: the cheapest threshold wins, so exits pay and the heads are kept
    result = run_stage(EarlyExit(max_accuracy_loss=100, thresholds=(0.0, 0.5, 0.9)), t, ctx)
    net = result.model
    assert isinstance(net, ExitNet) and net.num_exits == 3
    after = t.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # body frozen, BatchNorm statistics too
    assert all(p.requires_grad for p in net.parameters())

    x = ctx.example_input
    static = bitops.exit_costs(net, x)
    everything_at_0, nobody_exits = sweep(net, ctx.val_loader, [0.0], x)
    assert everything_at_0.exit_fractions == [1.0, 0.0, 0.0]
    assert everything_at_0.expected_bitops == pytest.approx(static[0])
    assert nobody_exits.threshold == NO_EXIT and nobody_exits.exit_fractions == [0.0, 0.0, 1.0]
    assert nobody_exits.expected_bitops == pytest.approx(bitops.profile(teacher(), x).bitops)

    exit = result.info["exit"]
    feasible = [p for p in exit["sweep"] if p["accuracy"] - p["margin"] >= exit["baseline"] - 100]
    assert exit["accuracy"] >= exit["baseline"] - 100 and exit["pays_off"]
    assert exit["expected_bitops"] == min(p["expected_bitops"] for p in feasible)
    assert net.threshold == exit["threshold"] and result.accuracy == exit["accuracy"]
    assert result.bitops_cr == pytest.approx(nobody_exits.expected_bitops / exit["expected_bitops"])


def test_heads_added_to_a_quantized_body_are_quantized_from_the_start():
    t = teacher()
    ctx = context(t)
    q = Quantize(w_bits=2, a_bits=4, finetune=False).prepare(t, ctx).model
    net = EarlyExit(head="conv").prepare(q, ctx).model
    for head in net.heads:
        assert isinstance(head.conv, QuantConv2d) and (head.conv.w_bits, head.conv.a_bits) == (2, 4)
        assert isinstance(head.fc, QuantLinear) and (head.fc.w_bits, head.fc.a_bits) == (8, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "mlp"}, "head must be one of"),
        ({"criterion": "margin"}, "criterion must be one of"),
        ({"thresholds": [0.5, 1.5]}, r"thresholds must be a non-empty list of numbers in \[0, 1\]"),
        ({"max_accuracy_loss": -1}, r"max_accuracy_loss must be a number in \[0, 100\]"),
    ],
)
def test_early_exit_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyExit(**kwargs)


def test_early_exit_points_are_checked_before_training_and_errors_list_the_candidates():
    one_conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    ctx = context(one_conv, train_loader=Untouchable())
    with pytest.raises(ConfigError, match=r"early_exit.points: none found automatically: Sequential has no "
                                          r"candidate exit point.*An exit point is a module"):
        run_stage(EarlyExit(), one_conv, ctx)
    two_convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    ctx = context(two_convs, train_loader=Untouchable())
    with pytest.raises(ConfigError, match=r"early_exit.points \['nope'\] \(given\): exit point 'nope' is neither "
                                          r".*candidates: 1 \(\d+% of MACs, \[4, 26, 26\]\)$"):
        EarlyExit(points=["nope"]).check_model(two_convs, ctx)
    assert EarlyExit().exit_points(two_convs, ctx, check=True) == (["1"], "found")
