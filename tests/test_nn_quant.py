"""QuantConv2d / QuantLinear and quantize_model: values, levels, gradients, policy, copies, pruning."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ordercomp import reference
from ordercomp.errors import TrainingError
from ordercomp.nn import QuantConv2d, QuantLayer, QuantLinear, quant_report, quantize_model
from ordercomp.nn.quant import ALPHA_FLOOR


def small_cnn(in_ch: int = 1, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


def quant_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


# --------------------------------------------------------------------------- layers


def test_32_bits_equal_the_float_layers(device_dtype):
    dd = device_dtype
    conv, lin = dd.module(nn.Conv2d(3, 5, 3, padding=1, groups=1)), dd.module(nn.Linear(7, 4))
    x, v = dd.randn(2, 3, 6, 6), dd.randn(3, 7)
    qconv, qlin = QuantConv2d.from_float(conv, 32, 32), QuantLinear.from_float(lin, 32, 32)
    assert torch.equal(qconv(x), conv(x))
    assert torch.equal(qlin(v), lin(v))
    assert qconv.weight is conv.weight and qlin.bias is lin.bias  # parameters shared, not copied
    assert (qconv.w_bits, qconv.a_bits) == (32, 32)
    assert qconv.alpha.device == conv.weight.device


@pytest.mark.parametrize("w_bits,a_bits,signed", [(1, 8, False), (2, 8, False), (4, 4, False), (8, 8, True), (4, 2, True)])
def test_forward_is_conv_of_quantized_input_and_weight(device_dtype, w_bits, a_bits, signed):
    dd = device_dtype
    conv = dd.module(QuantConv2d(4, 6, 3, padding=1, w_bits=w_bits, a_bits=a_bits, signed_input=signed, alpha=1.5))
    x = dd.randn(3, 4, 5, 5) * 2
    xq, _ = reference.fake_quant_act(x, torch.tensor(1.5, device=dd.device), a_bits, signed)
    wq = reference.quantize_weight(conv.weight.detach(), w_bits)
    out = conv(x)
    assert out.dtype == dd.dtype and out.device == x.device
    torch.testing.assert_close(out, F.conv2d(xq, wq, conv.bias, padding=1), **dd.tol)
    torch.testing.assert_close(conv.quantized_weight(), wq, **dd.tol)
    assert wq.unique().numel() <= 2**w_bits
    assert xq.unique().numel() <= (2**a_bits - 1 if signed else 2**a_bits)
    if signed:
        assert xq.min() < 0
    else:
        assert xq.min() == 0  # unsigned: clipped at 0, and half of the random input is below it


def test_linear_quantizes_input_and_weight(device_dtype):
    dd = device_dtype
    lin = dd.module(QuantLinear(9, 3, w_bits=2, a_bits=3))
    x = dd.rand(5, 9) * 2
    xq, _ = reference.fake_quant_act(x, torch.tensor(1.0, device=dd.device), 3, False)
    expected = F.linear(xq, reference.quantize_weight(lin.weight.detach(), 2), lin.bias)
    torch.testing.assert_close(lin(x), expected, **dd.tol)
    assert lin.quantized_weight().unique().numel() <= 4


@pytest.mark.parametrize("signed", [False, True])
def test_gradients_match_the_reference_straight_through_estimator(device_dtype, signed):
    """Every gradient of a quantized conv (input, weight, bias, learned clip) is the reference STE's:
    the conv's own gradients w.r.t. its quantized input and weight, passed back through
    ``reference.fake_quant_act_backward`` and ``reference.quantize_weight_backward``."""
    dd = device_dtype
    conv = dd.module(QuantConv2d(2, 3, 3, padding=1, w_bits=4, a_bits=4, signed_input=signed, learn_alpha=True))
    assert isinstance(conv.alpha, nn.Parameter) and "alpha" in dict(conv.named_parameters())
    x0 = dd.randn(2, 2, 4, 4) * 1.5  # a good share outside the clip range ([0, 1], signed [-1, 1])
    x = x0.clone().requires_grad_(True)
    grad = dd.randn(2, 3, 4, 4)
    conv(x).backward(grad)

    alpha, w = conv.alpha.detach(), conv.weight.detach()
    xq, region = reference.fake_quant_act(x0, alpha, 4, signed)
    xq, wq = xq.requires_grad_(True), reference.quantize_weight(w, 4).requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    F.conv2d(xq, wq, bias, padding=1).backward(grad)
    want_x, want_alpha = reference.fake_quant_act_backward(xq.grad, region, signed)
    want_w = reference.quantize_weight_backward(wq.grad, w, 4)

    assert bool((region != 0).any()) and bool((region == 0).any())
    torch.testing.assert_close(x.grad, want_x, **dd.tol)
    assert bool((x.grad[region != 0] == 0).all())  # clipped inputs get no gradient
    torch.testing.assert_close(conv.weight.grad, want_w, **dd.tol)
    torch.testing.assert_close(conv.bias.grad, bias.grad, **dd.tol)
    # PACT: the clip collects the gradient of the inputs above it (minus those below -alpha, signed)
    torch.testing.assert_close(conv.alpha.grad, want_alpha.to(conv.alpha.dtype).reshape(conv.alpha.shape),
                               rtol=1e-4, atol=1e-4)
    assert float(want_alpha) != 0


def test_quantized_model_matches_a_layer_by_layer_reference(device_dtype):
    """quantize_model on a model already on the device / in the dtype (calibration runs there), then
    the whole forward against the layers recomputed with the reference quantizers."""
    dd = device_dtype
    model, x = dd.module(small_cnn()), dd.randn(4, 1, 8, 8)
    model, report = quantize_model(model, 2, 4, example_input=x)
    assert report == {"0": (8, 8), "3": (2, 4), "6": (2, 4), "11": (8, 8)}
    assert float(model[0].alpha) == pytest.approx(float(x.abs().max()), rel=1e-6)
    model.eval()
    with torch.no_grad():
        out = model(x)
        h = x
        for m in model:
            if isinstance(m, QuantLayer):
                hq, _ = reference.fake_quant_act(h, m.alpha, m.a_bits, m.signed_input)
                wq = reference.quantize_weight(m.weight, m.w_bits)
                if isinstance(m, nn.Conv2d):
                    h = F.conv2d(hq, wq, m.bias, m.stride, m.padding)
                else:
                    h = F.linear(hq, wq, m.bias)
            else:
                h = m(h)
    assert out.dtype == dd.dtype and out.device == x.device and out.shape == (4, 10)
    torch.testing.assert_close(out, h, **dd.tol)


def test_fixed_alpha_is_a_buffer_and_configure_switches():
    lin = QuantLinear(4, 2, w_bits=8, a_bits=8)
    assert "alpha" in dict(lin.named_buffers()) and not list(p for n, p in lin.named_parameters() if n == "alpha")
    lin.configure(learn_alpha=True, alpha=2.0)
    assert isinstance(lin.alpha, nn.Parameter) and float(lin.alpha.detach()) == 2.0
    lin.configure(4, 4)
    assert (lin.w_bits, lin.a_bits, lin.learn_alpha) == (4, 4, True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_bits=0), "w_bits must be an integer in 1..32, got 0"),
        (dict(w_bits=33), "w_bits must be an integer in 1..32"),
        (dict(a_bits=17), r"a_bits must be an integer in 1..16 or 32, got 17"),
        (dict(a_bits=0), "a_bits must be"),
        (dict(a_bits=1, signed_input=True), "a_bits for a signed input must be an integer in 2..16 or 32"),
        (dict(alpha=0.0), "alpha must be a finite number > 0"),
        (dict(w_bits=4.0), "w_bits must be an integer"),
    ],
)
def test_bad_bits_name_the_argument_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConv2d(1, 1, 1, **kwargs)


def test_from_float_rejects_other_layers():
    with pytest.raises(TypeError, match="plain Conv2d"):
        QuantConv2d.from_float(nn.Linear(2, 2), 4, 4)


# --------------------------------------------------------------------------- quantize_model


def test_default_policy_first_and_last_at_8_bits():
    model, x = small_cnn(), torch.randn(4, 1, 8, 8)
    model, report = quantize_model(model, 2, 4, example_input=x)
    assert report == {"0": (8, 8), "3": (2, 4), "6": (2, 4), "11": (8, 8)}
    assert model[0].signed_input and not model[3].signed_input and not model[11].signed_input
    assert float(model[0].alpha) == pytest.approx(float(x.abs().max()))  # signed clip calibrated
    assert float(model[3].alpha) == 1.0  # DoReFa's fixed clip
    assert quant_report(model) == report
    assert model(x).shape == (4, 10)


def test_policy_all_mapping_callable_and_float_layers():
    _, report = quantize_model(small_cnn(), 4, 8, policy="all")
    assert set(report.values()) == {(4, 8)}
    model, report = quantize_model(small_cnn(), 4, 4, policy={"6": None, "11": (32, 32)})
    assert report == {"0": (8, 8), "3": (4, 4), "6": (32, 32), "11": (32, 32)}
    assert type(model[6]) is nn.Conv2d and type(model[11]) is nn.Linear
    roles = {}

    def policy(name, module, role):
        roles[name] = role
        return (1, 2) if role == "body" else (8, 8)

    _, report = quantize_model(small_cnn(), 4, 4, policy=policy)
    assert roles == {"0": "first", "3": "body", "6": "body", "11": "last"}
    assert report["3"] == (1, 2)


def test_policy_errors():
    with pytest.raises(ValueError, match="policy must be"):
        quantize_model(small_cnn(), 4, 4, policy="middle")
    with pytest.raises(ValueError, match=r"does not have: \['nope'\]"):
        quantize_model(small_cnn(), 4, 4, policy={"nope": (4, 4)})
    with pytest.raises(ValueError, match="w_bits must be an integer in 1..32"):
        quantize_model(small_cnn(), 0, 4)
    with pytest.raises(ValueError, match="a_bits must be"):
        quantize_model(small_cnn(), 4, 20)
    model = small_cnn()
    with pytest.raises(ValueError, match="layer '0': a_bits for a signed input"):
        quantize_model(model, 4, 1, policy="all")
    assert not quant_layers(model)  # nothing changed before the error


def test_execution_order_decides_first_and_last():
    class Reversed(nn.Module):  # registers the classifier before the body
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    _, report = quantize_model(Reversed(), 4, 4, example_input=torch.randn(2, 1, 6, 6))
    assert report == {"fc": (8, 8), "body.0": (8, 8), "body.2": (4, 4)}


def test_negative_inputs_are_quantized_signed():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        bottleneck = model[1].eval()(model[0](x))  # a linear bottleneck: no ReLU before conv 2, eval BN as calibrated
    model, _ = quantize_model(model, 4, 4, example_input=x)
    assert [model[i].signed_input for i in (0, 2, 4, 7)] == [True, True, False, False]
    assert float(model[2].alpha) == pytest.approx(float(bottleneck.abs().max()), rel=1e-6)


def test_requantizing_reconfigures_in_place_and_not_inplace_copies():
    model, _ = quantize_model(small_cnn(), 4, 4, learn_alpha=True)
    layer = model[3]
    with torch.no_grad():
        layer.alpha.fill_(0.7)
    again, report = quantize_model(model, 2, 8)
    assert again is model and model[3] is layer and report["3"] == (2, 8)
    assert float(layer.alpha.detach()) == pytest.approx(0.7)  # a learned clip survives re-quantization
    original = small_cnn()
    copied, _ = quantize_model(original, 4, 4, inplace=False)
    assert not quant_layers(original) and len(quant_layers(copied)) == 4


def test_deepcopy_and_state_dict_round_trip():
    x = torch.randn(2, 1, 8, 8)
    model, _ = quantize_model(small_cnn(), 4, 4, example_input=x, learn_alpha=True)
    model.eval()
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh, _ = quantize_model(small_cnn(), 4, 4, learn_alpha=True)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert "0.alpha" in model.state_dict()


def prune_half(model, x, ignored):
    pruner = tp.pruner.BasePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=ignored
    )
    pruner.step()
    return model


@pytest.mark.parametrize("learn_alpha", [False, True])
def test_torch_pruning_removes_channels_of_quant_layers_like_float_ones(learn_alpha):
    x = torch.randn(2, 1, 8, 8)
    float_model = small_cnn()
    quant, _ = quantize_model(copy.deepcopy(float_model), 4, 4, example_input=x, learn_alpha=learn_alpha)
    prune_half(float_model, x, [float_model[11]])
    prune_half(quant, x, [quant[11]])
    assert [type(quant[i]) for i in (0, 3, 6)] == [QuantConv2d] * 3 and type(quant[11]) is QuantLinear
    assert [quant[i].out_channels for i in (0, 3, 6)] == [4, 8, 8]
    assert quant[11].in_features == 8 and quant[11].out_features == 10
    for i in (0, 3, 6, 11):  # the same channels were kept as in the float twin
        assert torch.equal(quant[i].weight, float_model[i].weight)
    assert (quant[3].w_bits, quant[3].a_bits) == (4, 4)
    assert quant(x).shape == (2, 10)
    quant(x).sum().backward()  # still trains
    assert quant[3].weight.grad.shape == quant[3].weight.shape


def test_a_learned_clip_pushed_below_zero_is_put_back_on_the_floor_where_it_still_learns():
    torch.manual_seed(0)
    layer = QuantConv2d(2, 3, 3, padding=1, w_bits=4, a_bits=4, alpha=0.5, learn_alpha=True)
    with torch.no_grad():
        layer.alpha.fill_(-0.3)  # where one large PACT step once took a squeeze-excitation clip
    x = torch.rand(2, 2, 5, 5)
    fixed = QuantConv2d(2, 3, 3, padding=1, w_bits=4, a_bits=4, alpha=ALPHA_FLOOR)
    fixed.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "alpha"}, strict=False)
    torch.testing.assert_close(layer.eval()(x), fixed(x))
    assert float(layer.alpha) == pytest.approx(-0.3), "evaluation uses the floor and changes nothing"
    layer.train()
    torch.testing.assert_close(layer(x), fixed(x))
    assert float(layer.alpha) == pytest.approx(ALPHA_FLOOR), "training puts the clip back on the floor"
    optimizer = torch.optim.SGD([layer.alpha], lr=0.001)
    (-layer.quantize_input(x).sum()).backward()  # a loss that wants a wider clip: it grows from the floor
    assert float(layer.alpha.grad) < 0
    optimizer.step()
    assert float(layer.alpha) > ALPHA_FLOOR + 0.01
    with torch.no_grad():
        layer.alpha.fill_(0.7)
    assert float(layer.clip().detach()) == pytest.approx(0.7), "above the floor the clip is alpha itself"


def test_a_diverged_learned_clip_is_named_as_divergence_not_as_a_bad_setting():
    """A learned clip goes NaN only when training diverged (a too-high learning rate): the error
    says so and what to do, not "alpha must be a finite number > 0", a setting nobody gave."""
    conv = QuantConv2d(2, 3, 3, padding=1, w_bits=4, a_bits=4, learn_alpha=True)
    with torch.no_grad():
        conv.alpha.fill_(float("nan"))
    with pytest.raises(TrainingError, match="learned activation clip became nan: training diverged; lower lr"):
        conv(torch.rand(1, 2, 4, 4))


def test_a_clip_that_diverges_in_training_is_named_with_its_layer_and_phase():
    from ordercomp.train import TrainConfig, Trainer

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    x = torch.rand(16, 1, 8, 8)
    net, _ = quantize_model(model, 4, 8, example_input=x, learn_alpha=True, policy="all")
    with torch.no_grad():
        net[2].alpha.fill_(float("inf"))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8)
    with pytest.raises(TrainingError, match=r"Q finetune: at epoch 1, batch 1, layer\(s\) \['2'\]: a learned "
                                            r"activation clip became inf: training diverged; lower lr"):
        Trainer(TrainConfig(epochs=1, progress=False)).fit(net, data, desc="Q finetune")
