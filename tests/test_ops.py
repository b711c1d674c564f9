"""Compiled ops against their pure-PyTorch references, on every device and dtype they support."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import ordercomp
from conftest import DEVICE_DTYPES, device_dtype_param, device_param, requires_cuda
from ordercomp import ops, reference

COMPILED = ordercomp.backend_info()["compiled"]
needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled library not built")

DEVICES = [device_param("cpu"), device_param("cuda")]
# The shared device x dtype cases (conftest.py) plus the CUDA half types the kernels also cover;
# float64 on CPU exercises the reference fallback. CUDA cases are skipped without a device.
CASES = DEVICE_DTYPES + [device_dtype_param("cuda", torch.float16), device_dtype_param("cuda", torch.bfloat16)]
SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 5, 7), (65, 1027)]


def _tol(dtype):
    return {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def _noncontig(shape, dtype, device, scale=1.0):
    """A non-contiguous view holding random values with the given shape."""
    full = torch.randn(*shape, 2, dtype=torch.float32, device=device) * scale
    return full[..., 0].to(dtype)


# --------------------------------------------------------------------------- activation fake-quant


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_matches_reference(device, dtype, shape, signed):
    x = (torch.randn(shape, device=device) * 2).to(dtype)
    alpha = torch.tensor(1.7, device=device)
    for bits in range(2 if signed else 1, 17):
        got = ops.fake_quant_act(x, alpha, bits, signed)
        want, _ = reference.fake_quant_act(x, alpha, bits, signed)
        assert got.shape == x.shape and got.dtype == x.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=_tol(dtype) * 2)


def test_fake_quant_levels_and_range():
    x = torch.linspace(-3, 3, 10001)
    for bits in (1, 2, 3, 4, 8):
        out = ops.fake_quant_act(x, 1.5, bits)
        levels = torch.unique(out)
        assert len(levels) == 2**bits
        assert out.min() == 0 and math.isclose(out.max().item(), 1.5, rel_tol=1e-6)
        signed = ops.fake_quant_act(x, 1.5, bits + 1, signed=True)
        assert len(torch.unique(signed)) == 2 ** (bits + 1) - 1
        assert (signed == 0).any() and math.isclose(signed.min().item(), -1.5, rel_tol=1e-6)


def test_fake_quant_non_contiguous():
    x = _noncontig((33, 17), torch.float32, "cpu", 2.0)
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.fake_quant_act(x, 1.0, 4), reference.fake_quant_act(x.contiguous(), torch.tensor(1.0), 4)[0])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_gradients_match_reference(device, dtype, signed):
    x0 = (torch.randn(40, 31, device=device) * 2).to(dtype)
    grad = torch.randn(40, 31, device=device).to(dtype)
    results = []
    for use_kernel in (True, False):
        x = x0.clone().requires_grad_(True)
        alpha = torch.tensor(1.3, device=device, requires_grad=True)
        if use_kernel:
            out = ops.fake_quant_act(x, alpha, 4, signed)
        else:
            out, region = reference.fake_quant_act(x, alpha, 4, signed)
            out = out.detach().requires_grad_(True)
        out.backward(grad)
        if use_kernel:
            results.append((x.grad, alpha.grad))
        else:
            results.append(reference.fake_quant_act_backward(grad, region, signed))
    (gx, ga), (rx, ra) = results
    torch.testing.assert_close(gx, rx.to(gx.dtype))
    torch.testing.assert_close(ga.float(), ra.float(), rtol=1e-4, atol=1e-3)
    # STE: gradient passes exactly where the input is inside the clip range.
    lo = -1.3 if signed else 0.0
    inside = (x0.float() >= lo) & (x0.float() <= 1.3)
    torch.testing.assert_close(gx, torch.where(inside, grad, torch.zeros_like(grad)))
    above = (grad.float() * (x0.float() > 1.3)).sum()
    below = (grad.float() * (x0.float() < -1.3)).sum() if signed else 0.0
    torch.testing.assert_close(ga.float(), torch.as_tensor(above - below).float(), rtol=1e-4, atol=1e-3)


def test_fake_quant_matches_torch_native_8bit():
    x = torch.randn(4096) * 3
    for alpha in (0.5, 1.0, 2.75):
        native = torch.fake_quantize_per_tensor_affine(x, alpha / 255, 0, 0, 255)
        torch.testing.assert_close(ops.fake_quant_act(x, alpha, 8), native, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- weight quantizer


def _level_mismatch_ok(got, want, bits):
    """Equal except where the last bit of tanh puts a weight on a rounding boundary: then one level apart."""
    step = 2.0 / ((1 << bits) - 1) if 1 < bits < 32 else 0.0
    diff = (got.float() - want.float()).abs()
    close = diff <= 1e-5 * (1 + want.float().abs())
    off_by_one = (diff - step).abs() <= 1e-3 * step + 1e-6
    assert bool((close | off_by_one).all()), f"max diff {diff.max().item()} for {bits} bits"
    assert int((~close).sum()) <= max(1, got.numel() // 100)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_weight_matches_reference(device, dtype, shape):
    w = (torch.randn(shape, device=device) * 0.4).to(dtype)
    for bits in list(range(1, 17)) + [24, 32]:
        got = ops.quantize_weight(w, bits)
        want = reference.quantize_weight(w, bits)
        assert got.shape == w.shape and got.dtype == w.dtype
        if dtype in (torch.float16, torch.bfloat16):
            torch.testing.assert_close(got, want, rtol=0, atol=2.0 / ((1 << min(bits, 8)) - 1) + 1e-2)
        else:
            _level_mismatch_ok(got, want, bits)


def test_quantize_weight_levels():
    w = torch.randn(64, 32, 3, 3) * 0.2
    for bits in (2, 3, 4, 8):
        q = ops.quantize_weight(w, bits)
        assert len(torch.unique(q)) <= 2**bits
        assert q.min() >= -1 and q.max() <= 1
        assert q.abs().max() == 1  # the largest weight maps to the top level
    q1 = ops.quantize_weight(w, 1)
    e = w.abs().mean()
    assert torch.unique(q1).tolist() == pytest.approx([-e.item(), e.item()], rel=1e-5)
    assert torch.equal(ops.quantize_weight(w, 32), w)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_quantize_weight_gradients_match_reference(device, dtype, bits):
    w0 = (torch.randn(16, 8, 3, 3, device=device) * 0.5).to(dtype)
    w0.view(-1)[5] = 3.0  # a clear maximum receives the gradient through max|tanh(w)|
    w0.view(-1)[9] = -3.0  # ...shared with a tie of the opposite sign
    grad = torch.randn_like(w0)
    w = w0.clone().requires_grad_(True)
    ops.quantize_weight(w, bits).backward(grad)
    want = reference.quantize_weight_backward(grad, w0, bits)
    atol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    torch.testing.assert_close(w.grad, want, rtol=1e-3, atol=atol)


def test_quantize_weight_gradient_is_autograd_of_reference_formula():
    w0 = torch.randn(50, dtype=torch.float64) * 0.7
    grad = torch.randn(50, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    t = torch.tanh(w)
    (t / t.abs().amax()).backward(grad)
    torch.testing.assert_close(reference.quantize_weight_backward(grad, w0, 4), w.grad, rtol=1e-5, atol=1e-6)
    if COMPILED:
        kernel = torch.ops.ordercomp.quantize_weight_backward(grad.float(), w0.float(), 4)
        torch.testing.assert_close(kernel, w.grad.float(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- early exit


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", [(0, 10), (1, 1), (5, 1), (7, 3), (64, 10), (33, 100), (9, 1000), (3, 5000)])
@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_exit_check_matches_reference(device, dtype, shape, criterion):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    for threshold in (0.0, 0.3, 0.9, 1.0):
        conf, pred, mask = ops.exit_check(logits, threshold, criterion)
        rconf, rpred, _ = reference.exit_check(logits, threshold, criterion)
        assert conf.dtype == dtype and pred.dtype == torch.int64 and mask.dtype == torch.bool
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(conf, rconf, rtol=tol, atol=tol)
        assert torch.equal(pred, rpred)
        assert torch.equal(mask, conf >= threshold)
    if shape[0]:
        assert bool(ops.exit_check(logits, 0.0, criterion)[2].all())


def test_exit_check_stable_for_huge_logits_and_ties():
    logits = torch.tensor([[1e30, 0.0, -1e30], [3e4, 3e4, 0.0], [-5e4, -5e4, -5e4], [0.0, 88.0, 200.0]])
    conf, pred, mask = ops.exit_check(logits, 0.5)
    assert torch.isfinite(conf).all()
    torch.testing.assert_close(conf, torch.tensor([1.0, 0.5, 1 / 3, 1.0]))
    assert pred.tolist() == [0, 0, 0, 2]
    assert mask.tolist() == [True, True, False, True]
    ent, _, _ = ops.exit_check(logits, 0.5, "entropy")
    torch.testing.assert_close(ent, torch.tensor([1.0, 1 - math.log(2) / math.log(3), 0.0, 1.0]), atol=1e-6, rtol=0)


def test_exit_check_non_contiguous():
    logits = torch.randn(10, 40)[:, ::4]
    torch.testing.assert_close(ops.exit_check(logits, 0.2)[0], reference.exit_check(logits.contiguous(), 0.2)[0])


# --------------------------------------------------------------------------- bitops accumulation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_accumulate_bitops(device, dtype):
    counter = torch.zeros(9, dtype=dtype, device=device)
    want = torch.zeros(9, dtype=torch.float64)
    mask = torch.ones(9, dtype=torch.bool, device=device)
    for step, bitops in enumerate([1000, 2**40, 7, 0]):
        ops.accumulate_bitops(counter, mask, bitops)
        want += mask.cpu().double() * bitops
        mask[step * 2 : step * 2 + 2] = False  # two inputs leave after each layer
    assert torch.equal(counter.cpu().double(), want.to(dtype).double())
    empty = torch.zeros(0, dtype=dtype, device=device)
    ops.accumulate_bitops(empty, torch.zeros(0, dtype=torch.bool, device=device), 5)
    assert empty.numel() == 0


# --------------------------------------------------------------------------- torch.library integration


@needs_compiled
def test_opcheck_every_op():
    cases = {
        "fake_quant_act": [
            (torch.randn(6, 5, requires_grad=True), torch.tensor(1.2, requires_grad=True), 4, False),
            (torch.randn(3, 2, 4), torch.tensor([0.8]), 8, True),
        ],
        "fake_quant_act_backward": [(torch.randn(4, 3), torch.randint(-1, 2, (4, 3), dtype=torch.int8), True)],
        "quantize_weight": [(torch.randn(8, 3, 3, 3, requires_grad=True), 4), (torch.randn(5, 4, requires_grad=True), 1)],
        "quantize_weight_backward": [(torch.randn(8, 4), torch.randn(8, 4), 3)],
        "exit_check": [(torch.randn(12, 10), 0.4, "maxprob"), (torch.randn(3, 7), 0.1, "entropy")],
        "accumulate_bitops": [(torch.zeros(5, dtype=torch.float64), torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool), 128.0)],
    }
    for name, arg_sets in cases.items():
        op = getattr(torch.ops.ordercomp, name)
        for args in arg_sets:
            torch.library.opcheck(op, args)


@needs_compiled
def test_torch_compile_fullgraph():
    def f(x, alpha, w, logits):
        y = ops.fake_quant_act(x, alpha, 4)
        q = ops.quantize_weight(w, 2)
        conf, pred, mask = ops.exit_check(logits, 0.5)
        return y * 2 + 1, q.sum(), conf, pred, mask

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (torch.randn(10, 4), torch.tensor(1.0), torch.randn(6, 6), torch.randn(5, 10))
    for got, want in zip(compiled(*args), f(*args)):
        torch.testing.assert_close(got, want)


def test_fallback_path_gives_same_results(tmp_path):
    """With the compiled library disabled the package imports and every op returns the same values."""
    script = (
        "import torch, ordercomp\n"
        "from ordercomp import ops\n"
        "info = ordercomp.backend_info()\n"
        "assert not info['compiled'] and 'ORDERCOMP_DISABLE_EXT' in info['reason'], info\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(300) * 2; w = torch.randn(40, 9) * 0.3; l = torch.randn(20, 10) * 3\n"
        "c = torch.zeros(20, dtype=torch.float64)\n"
        "ops.accumulate_bitops(c, l[:, 0] > 0, 10.0)\n"
        "torch.save([ops.fake_quant_act(x, 1.0, 3), ops.quantize_weight(w, 3), *ops.exit_check(l, 0.4), c], __import__('sys').argv[1])\n"
    )
    path = str(tmp_path / "fallback.pt")
    env = dict(os.environ, ORDERCOMP_DISABLE_EXT="1")
    subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
    fallback = torch.load(path)
    torch.manual_seed(0)
    x = torch.randn(300) * 2
    w = torch.randn(40, 9) * 0.3
    logits = torch.randn(20, 10) * 3
    c = torch.zeros(20, dtype=torch.float64)
    ops.accumulate_bitops(c, logits[:, 0] > 0, 10.0)
    here = [ops.fake_quant_act(x, 1.0, 3), ops.quantize_weight(w, 3), *ops.exit_check(logits, 0.4), c]
    for got, want in zip(fallback, here):
        torch.testing.assert_close(got, want)


def test_backend_info_says_what_is_in_use():
    """``compiled`` is true exactly when the ops are registered with torch.library; ``cuda`` when the
    build has CUDA kernels and a device is visible; ``reason`` says which and why."""
    info = ordercomp.backend_info()
    registered = hasattr(torch.ops.ordercomp, "fake_quant_act") and hasattr(torch.ops.ordercomp, "build_info")
    assert info["compiled"] is registered
    assert info["cuda"] is (registered and bool(info["build"].get("cuda")) and torch.cuda.is_available())
    if registered:
        assert info["reason"].startswith("compiled library loaded") and info["build"]["openmp"] is True
        assert ("CUDA kernels not in use" in info["reason"]) is not info["cuda"]
    else:
        assert info["build"] == {}
        assert "ORDERCOMP_DISABLE_EXT" in info["reason"] or "not importable" in info["reason"], info["reason"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.fake_quant_act(torch.randn(3), 1.0, 0), "bits must be an integer in 1..16, got 0"),
        (lambda: ops.fake_quant_act(torch.randn(3), 1.0, 17), "bits must be an integer in 1..16, got 17"),
        (lambda: ops.fake_quant_act(torch.randn(3), 1.0, 1, signed=True), "bits must be an integer in 2..16, got 1"),
        (lambda: ops.fake_quant_act(torch.randn(3), 0.0, 4), "alpha must be a positive number"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor(-1.0), 4), "alpha must be > 0, got -1.0"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.ones(2), 4), "alpha must hold exactly one value"),
        (lambda: ops.fake_quant_act(torch.arange(3), 1.0, 4), "x must be a floating-point tensor, got torch.int64"),
        (lambda: ops.quantize_weight(torch.randn(3), 0), "bits must be an integer in 1..32, got 0"),
        (lambda: ops.quantize_weight(torch.randn(3), 33), "bits must be an integer in 1..32, got 33"),
        (lambda: ops.quantize_weight(torch.ones(3, dtype=torch.int32), 4), "w must be a floating-point tensor"),
        (lambda: ops.exit_check(torch.randn(3), 0.5), "logits must be 2-D"),
        (lambda: ops.exit_check(torch.randn(3, 4), 1.5), "threshold must be a number in [0, 1], got 1.5"),
        (lambda: ops.exit_check(torch.randn(3, 4), -0.1), "threshold must be a number in [0, 1], got -0.1"),
        (lambda: ops.exit_check(torch.randn(3, 0), 0.5), "at least one class"),
        (lambda: ops.exit_check(torch.randn(3, 4), 0.5, "margin"), "criterion must be one of"),
        (lambda: ops.exit_check(torch.randint(0, 3, (3, 4)), 0.5), "logits must be a floating-point tensor"),
        (lambda: ops.accumulate_bitops(torch.zeros(3), torch.ones(3), 1.0), "active_mask must be a bool tensor"),
        (lambda: ops.accumulate_bitops(torch.zeros(3), torch.ones(4, dtype=torch.bool), 1.0), "active_mask must have the counter's shape"),
        (lambda: ops.accumulate_bitops(torch.zeros(3), torch.ones(3, dtype=torch.bool), -1), "bitops must be a finite number >= 0"),
        (lambda: ops.accumulate_bitops(torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.bool), 1), "counter must be float64"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


@pytest.mark.cuda
@requires_cuda
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="x on cuda:0, alpha on cpu"):
        ops.fake_quant_act(torch.randn(3, device="cuda"), torch.tensor(1.0), 4)
    with pytest.raises(ValueError, match="counter on cuda:0, active_mask on cpu"):
        ops.accumulate_bitops(torch.zeros(3, device="cuda"), torch.ones(3, dtype=torch.bool), 1.0)


def test_tensors_on_different_devices_meta():
    """The device check runs before any kernel; meta tensors stand in for a second device here."""
    with pytest.raises(ValueError, match="x on cpu, alpha on meta"):
        ops.fake_quant_act(torch.randn(3), torch.tensor(1.0, device="meta"), 4)
    with pytest.raises(ValueError, match="counter on cpu, active_mask on meta"):
        ops.accumulate_bitops(torch.zeros(3), torch.ones(3, dtype=torch.bool, device="meta"), 1.0)
