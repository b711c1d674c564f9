"""Result files: tensors plus a JSON recipe, read weights-only, rebuilt into the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ordercomp import models
from ordercomp.errors import ModelError
from ordercomp.nn import ExitNet, QuantConv2d, QuantLinear, attach_exits, quantize_model
from ordercomp.results import FORMAT, VERSION, architecture, build, is_result, load, read, recipe, save
from ordercomp.stages.prune import prune_channels

from test_nn_exits import Residual, conv_bn

SHAPE = (1, 16, 16)


def randomise_bn(model):
    """Non-trivial BN statistics and affine terms, so eval-mode outputs depend on every tensor."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def median_threshold(net, x):
    """The median confidence of the first head on ``x``: about half the inputs leave there."""
    with torch.no_grad():
        probs = net.eval()(x)[0].softmax(1)
    if net.criterion == "maxprob":
        return float(probs.amax(1).median())
    return float((1 + (probs * probs.log()).sum(1) / torch.log(torch.tensor(10.0))).median())


def outputs(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out if isinstance(out, list) else [out]


def assert_same_model(loaded, model, x):
    assert type(loaded) is type(model) and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, x), outputs(model, x), strict=True))
    if isinstance(model, ExitNet):
        assert (loaded.threshold, loaded.criterion) == (model.threshold, model.criterion)
        mine, theirs = loaded.infer(x), model.infer(x)
        assert torch.equal(mine.exit_index, theirs.exit_index)
        assert torch.equal(mine.predictions, theirs.predictions)
        return mine.exit_counts()
    return None


def zoo_recipe(model, name="resnet8", kwargs=None, **extra):
    arch = {"zoo": name, "kwargs": kwargs or {}, "num_classes": 10, "in_channels": 1}
    return recipe(model, original=arch, base=arch, input_shape=SHAPE, **extra)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(32, *SHAPE)


# --------------------------------------------------------------------------- identify and architecture


@pytest.mark.parametrize(
    "name,kwargs",
    [("resnet8", {}), ("resnet20", {}), ("vgg11", {}), ("mobilenetv2", {}), ("mobilenetv2", {"width_mult": 0.5}),
     ("resnet8", {"dropout": 0.25})],
)
def test_identify_recognises_unmodified_zoo_models(name, kwargs):
    with torch.device("meta"):
        model = models.create(name, num_classes=7, in_channels=1, **kwargs)
    assert models.identify(model) == (name, kwargs)
    assert architecture(model) == {"zoo": name, "kwargs": kwargs, "num_classes": 7, "in_channels": 1}


def test_identify_refuses_modified_and_user_models(x):
    pruned = prune_channels(models.create("resnet8", in_channels=1), 0.5, x[:2])
    quantized, _ = quantize_model(models.create("resnet8", in_channels=1), 4, 8)
    assert models.identify(pruned) is None and models.identify(quantized) is None
    assert models.identify(UserNet()) is None and models.identify(nn.Linear(3, 2)) is None
    assert architecture(UserNet()) == {"class": f"{__name__}.UserNet"}
    assert architecture(pruned, ("resnet8", {}))["zoo"] == "resnet8"


# --------------------------------------------------------------------------- zoo models: P, Q, E in either order


def compressed_resnet8(x, exits_first: bool, learn_alpha: bool = False):
    model = randomise_bn(models.create("resnet8", num_classes=10, in_channels=1))
    if exits_first:  # E then P (the pruner cuts the heads too), then Q
        net = attach_exits(model, head="conv", example_input=x[:2], grid=1)
        net = prune_channels(net, 0.5, x[:2])
    else:  # P then E, then Q
        net = attach_exits(prune_channels(model, 0.5, x[:2]), head="conv", example_input=x[:2], grid=1)
    net, _ = quantize_model(net, 4, 8, "first_last_8bit", example_input=x, learn_alpha=learn_alpha)
    randomise_bn(net).eval()
    net.threshold = median_threshold(net, x)
    return net


@pytest.mark.parametrize("exits_first", [True, False])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_compressed_zoo_model_reloads_exactly_without_a_model(tmp_path, x, exits_first, suffix):
    net = compressed_resnet8(x, exits_first)
    r = zoo_recipe(net, info={"order": "EPQ" if exits_first else "PEQ"})
    assert r["layers"]["segments.0.stem.conv"] == {"type": "conv", "in_channels": 1, "out_channels": 8, "groups": 1}
    assert r["layers"]["segments.2.classifier.fc"] == {"type": "linear", "in_features": 32, "out_features": 10}
    assert r["layers"]["heads.1.bn"] == {"type": "bn", "num_features": 16}  # half of layer2's 32, either way
    assert r["bits"]["segments.0.stem.conv"] == {"w_bits": 8, "a_bits": 8, "signed_input": True, "learn_alpha": False}
    assert r["bits"]["segments.1.layer2.0.conv1"]["w_bits"] == 4 and r["bits"]["heads.0.fc"]["w_bits"] == 8
    assert r["exits"] == {"points": [1, 2], "head_kind": "conv", "head_kwargs": {"grid": 1},
                          "threshold": net.threshold, "criterion": "maxprob", "output": None}
    path = save(tmp_path / f"model{suffix}", net, r)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    if suffix == ".pt":
        payload = torch.load(path, weights_only=True)
        assert (payload["format"], payload["version"], payload["recipe"]) == (FORMAT, VERSION, r)
    else:
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["ordercomp_recipe"]) == r
            assert "_extra_state" not in f.keys()
    assert is_result(path) and read(path)[0] == r

    loaded = load(path)
    counts = assert_same_model(loaded, net, x)
    assert 0 < int(counts[0]) < 32  # some inputs leave at the first head, some go on
    conv = loaded.segments[1].layer2[0].conv1
    assert isinstance(conv, QuantConv2d) and (conv.w_bits, conv.in_channels, conv.out_channels) == (4, 8, 16)
    assert isinstance(loaded.heads[1].fc, QuantLinear) and loaded.heads[1].conv.out_channels == 16


def test_learned_clips_reload_as_parameters(tmp_path, x):
    net = compressed_resnet8(x, exits_first=False, learn_alpha=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.alpha.uniform_(0.5, 2.0)
    loaded = load(save(tmp_path / "pact.pt", net, zoo_recipe(net)))
    assert_same_model(loaded, net, x)
    clip = loaded.segments[1].layer2[0].conv2
    assert clip.learn_alpha and isinstance(clip.alpha, nn.Parameter)
    assert torch.equal(clip.alpha, net.segments[1].layer2[0].conv2.alpha)


def test_pruned_depthwise_model_reloads_exactly(tmp_path):
    x = torch.randn(4, 1, 8, 8)
    model = randomise_bn(models.create("mobilenetv2", num_classes=10, in_channels=1, width_mult=0.5))
    prune_channels(model, 0.5, x[:2])
    depthwise = model.features[2][0].conv2
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 24  # 48 expanded, half pruned
    arch = architecture(model, ("mobilenetv2", {"width_mult": 0.5}))
    path = save(tmp_path / "mbv2.safetensors", model, recipe(model, original=arch, base=arch, input_shape=(1, 8, 8)))
    loaded = load(path)
    assert loaded.features[2][0].conv2.groups == 24
    assert_same_model(loaded, model, x)


# --------------------------------------------------------------------------- user models


class UserNet(nn.Module):
    """No `features`: conv-bn-relu blocks, a residual add, average pool and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.block1 = Residual(16)
        self.down = conv_bn(16, 32, 2)
        self.block2 = Residual(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_user_model_reloads_only_with_an_instance_of_its_class(tmp_path, x, suffix):
    model = randomise_bn(UserNet())
    prune_channels(model, 0.5, x[:2])
    net = attach_exits(model, ["block1", "down"], head="pool", example_input=x[:2])
    net, _ = quantize_model(net, 4, 4, example_input=x)
    randomise_bn(net).eval()
    net.criterion = "entropy"
    net.threshold = median_threshold(net, x)
    arch = architecture(UserNet())
    r = recipe(net, original=arch, base=arch, input_shape=SHAPE)
    assert r["layers"]["segments.0.stem.0"]["out_channels"] == 8 and r["layers"]["heads.1.fc"]["in_features"] == 16
    path = save(tmp_path / f"user{suffix}", net, r)
    with pytest.raises(ValueError, match=rf"cut from a {__name__}.UserNet model: pass an instance of it as model="):
        load(path)
    with pytest.raises(ValueError, match="pass an instance of it as model="):
        load(path, model=models.create("resnet8", in_channels=1))
    given = UserNet()
    loaded = load(path, model=given)
    assert given.stem[0].out_channels == 16  # the instance given is copied, not changed
    assert all(isinstance(s, torch.fx.GraphModule) for s in loaded.segments)
    counts = assert_same_model(loaded, net, x)
    assert 0 < int(counts[0]) < 32


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: a batch norm subclass that applies its own drop and act."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                     self.momentum, self.eps)
        return self.act(self.drop(x))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d (ConvNeXt): a layer norm over the channels of [B, C, H, W]."""

    def forward(self, x):
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaledBlock(nn.Module):
    """A ConvNeXt-like residual block: conv, layer norm, pointwise conv, times a layer scale."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.norm, self.pw = nn.Conv2d(c, c, 3, padding=1), LayerNorm2d(c), nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.linspace(0.2, 1.0, c).view(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * self.pw(self.norm(self.conv(x)))


class LibraryNet(nn.Module):
    """The normalization layers of timm and torchvision models, which are not torch.nn's own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), NormAct(16))
        self.block1 = ScaledBlock(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), NormAct(32))
        self.block2 = ScaledBlock(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.block2(self.down(self.block1(self.stem(x)))).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")  # the layer scales: Torch-Pruning prunes them
def test_pruned_library_norms_and_layer_scales_reload_behind_exits(tmp_path, x):
    """A pruned model with exits did not load back when its batch norms subclass torch's (timm's
    BatchNormAct2d), it has a layer norm over channels (torchvision's ConvNeXt) or a layer scale:
    the exits' trace went into the batch norm (its tensors then attributes of a segment, which the
    recipe did not resize), and layer norms and loose tensors were not recorded (4 of 24
    torchvision/timm models after DPQE). The batch norm also stayed a frozen F.batch_norm there."""
    model = randomise_bn(LibraryNet()).eval()
    prune_channels(model, 0.5, x[:2])
    assert model.block1.gamma.shape == (8, 1, 1) and model.block1.norm.normalized_shape == (8,)
    net = attach_exits(model, ["block1", "down"], head="pool", example_input=x[:2])
    assert isinstance(dict(net.segments[0].named_modules())["stem.1"], NormAct)  # kept whole, so it trains
    net, _ = quantize_model(net, 4, 8, example_input=x)
    net.eval().threshold = median_threshold(net, x)
    arch = architecture(LibraryNet())
    r = recipe(net, original=arch, base=arch, input_shape=SHAPE)
    assert r["layers"]["segments.0.block1.norm"] == {"type": "ln", "normalized_shape": [8]}
    assert r["tensors"]["segments.0.block1.gamma"] == [8, 1, 1]
    path = save(tmp_path / "library.safetensors", net, r)
    assert_same_model(load(path, model=LibraryNet()), net, x)


def test_thinner_copy_of_a_zoo_model_rebuilds_from_the_original(tmp_path, x):
    student = randomise_bn(prune_channels(models.create("resnet8", in_channels=1), 0.5, x[:2])).eval()
    original = architecture(models.create("resnet8", in_channels=1))
    r = recipe(student, original=original, base=architecture(student), input_shape=SHAPE)
    assert r["base"] == {"class": "ordercomp.models.resnet.ResNet"}
    assert_same_model(load(save(tmp_path / "student.pt", student, r)), student, x)


# --------------------------------------------------------------------------- refusals


UNPICKLED = []


class Trap(UserNet):
    """Records being unpickled."""

    def __setstate__(self, state):
        UNPICKLED.append(type(self).__name__)
        super().__setstate__(state)


def test_a_pickled_module_is_not_a_result_and_is_never_unpickled(tmp_path):
    UNPICKLED.clear()
    path = tmp_path / "module.pt"
    torch.save(Trap(), path)
    assert not is_result(path)
    with pytest.raises(ValueError, match="is not an ordercomp result: it holds pickled Python objects"):
        load(path)
    assert UNPICKLED == []
    torch.load(path, weights_only=False)
    assert UNPICKLED == ["Trap"]  # the trap works
    plain = tmp_path / "weights.pt"
    torch.save(UserNet().state_dict(), plain)
    with pytest.raises(ValueError, match=r"is not an ordercomp result: it holds a state dict \(weights without "
                                         r"the architecture\), not a model"):
        read(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    assert not is_result(junk) and not is_result(tmp_path / "missing.pt")


def test_recipes_that_cannot_be_rebuilt_say_why(tmp_path, x):
    net = attach_exits(models.create("resnet8", in_channels=1), head=lambda c, n: nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n)), example_input=x[:2])
    r = zoo_recipe(net)
    assert r["exits"]["head_kind"] == "custom"
    with pytest.raises(ValueError, match="cannot rebuild exit heads of kind 'custom'"):
        build(r)
    plain = zoo_recipe(models.create("resnet8", in_channels=1))
    plain["layers"]["features.9.conv"] = {"type": "conv", "in_channels": 1, "out_channels": 1, "groups": 1}
    with pytest.raises(ValueError, match="the recipe names layer 'features.9.conv', which the rebuilt ResNet lacks"):
        build(plain)
    with pytest.raises(ValueError, match="has version 2; this ordercomp reads version 1"):
        build({**plain, "version": 2})
    with pytest.raises(ValueError, match="info must hold only JSON values"):
        zoo_recipe(net, info={"model": net})
    with pytest.raises(ValueError, match=r"input_shape must be \[C, H, W\]"):
        recipe(net, original={}, base={}, input_shape=(16, 16))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_tampered_result_file_ends_in_one_line_naming_it(tmp_path, suffix):
    """A result file with a tensor missing or of the wrong shape, a recipe naming another
    architecture, or (safetensors) a recipe that is not JSON: one ModelError naming the file."""
    net = models.create("resnet8", in_channels=1)
    path = save(tmp_path / f"good{suffix}", net, zoo_recipe(net))
    good_recipe, state = read(path)

    def variant(name, recipe_=good_recipe, state_=state, metadata=None):
        out = tmp_path / f"{name}{suffix}"
        if suffix == ".pt":
            torch.save({"format": FORMAT, "version": VERSION, "recipe": recipe_, "state_dict": state_}, out)
        else:
            from safetensors.torch import save_file
            save_file(state_, str(out), metadata={"ordercomp_recipe": metadata or json.dumps(recipe_)})
        return out

    last = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 2][-1]  # the classifier's weight
    missing = {k: v for k, v in state.items() if k != last}
    wrong = dict(state, **{last: torch.zeros(3, 3)})
    other = json.loads(json.dumps(good_recipe))
    other["original"] = other["base"] = dict(other["base"], zoo="resnet20")
    for name, file, words in [
        ("missing", variant("missing", state_=missing), r"missing.*do not fit the model its recipe describes.*"
                                                        r"Missing key\(s\)"),
        ("wrong shape", variant("wrong", state_=wrong), r"wrong.*do not fit.*size mismatch"),
        ("another architecture", variant("other", recipe_=other), r"other.*do not fit.*another architecture"),
    ]:
        with pytest.raises(ModelError, match=words) as caught:
            load(file)
        assert len(str(caught.value).splitlines()) == 1, name
    if suffix == ".safetensors":
        with pytest.raises(ModelError, match=r"notjson.safetensors is not an ordercomp result: its recipe is not "
                                             r"valid JSON"):
            load(variant("notjson", metadata="{not json"))
