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
from ordercomp.errors import ArgumentTypeError, ConfigError

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


# --------------------------------------------------------------------------- bad values (NaN, +-inf)
#
# Each op on NaN and infinite values: a test holds the reference to the behaviour its docstring
# promises (runs everywhere), and another holds the kernel, called through torch.ops so that no
# fallback can hide a regression, to the reference: NaN in the same places, the same infinities,
# the same predictions and exit decisions, the usual tolerance elsewhere.

NAN, INF = math.nan, math.inf
BAD = {"nan": NAN, "+inf": INF, "-inf": -INF}
WEIGHT_CASES = [(7, 0), (7, 6), (100_003, 0), (100_003, 65_537), (100_003, 100_002)]  # (size, where)


def _needs_kernel(device):
    if not COMPILED:
        pytest.skip("compiled library not built")
    if device == "cuda" and not ordercomp.backend_info()["cuda"]:
        pytest.skip("CUDA kernels not built")


def _assert_same(got, want, rtol=1e-5, atol=1e-5):
    """NaN exactly where ``want`` has NaN, the same infinities, and close elsewhere."""
    got, want = got.detach().cpu(), want.detach().cpu()
    where = [t.isnan().nonzero().flatten().tolist()[:8] for t in (got, want)]
    assert torch.equal(got.isnan(), want.isnan()), f"NaN at {where[0]}, want at {where[1]}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


def _bad_weights(n, at, bad, device="cpu"):
    w = torch.randn(n, device=device) * 0.4
    w[at] = BAD[bad]
    return w, torch.randn(n, device=device)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("n, at", WEIGHT_CASES[:2])
def test_quantize_weight_bad_values_reference(bad, n, at):
    """One NaN weight: all NaN (the scale is NaN), gradients too for k >= 2; +-inf: +-1 for k >= 2
    with gradient 0 there, an infinite scale for k = 1; k = 32 is the identity."""
    w, grad = _bad_weights(n, at, bad)
    for bits in (1, 2, 4, 8, 24, 32):
        q = reference.quantize_weight(w, bits)
        g = reference.quantize_weight_backward(grad, w, bits)
        if bits == 32:
            _assert_same(q, w, rtol=0, atol=0)
        elif bad == "nan":
            assert bool(q.isnan().all())
            assert bool(g.isnan().all()) is (bits > 1)
        elif bits == 1:
            assert bool(q.isinf().all())
        else:
            assert q[at].item() == (1.0 if bad == "+inf" else -1.0) and bool(q.isfinite().all())
            assert g[at].item() == 0.0 and bool(g.isfinite().all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("n, at", WEIGHT_CASES)
def test_quantize_weight_bad_values_kernel_matches_reference(device, bad, n, at):
    _needs_kernel(device)
    w, grad = _bad_weights(n, at, bad, device)
    for bits in (1, 2, 4, 8, 24, 32):
        want = reference.quantize_weight(w, bits)
        got = torch.ops.ordercomp.quantize_weight(w, bits)
        assert torch.equal(got.isnan().cpu(), want.isnan().cpu()) and torch.equal(got.isinf().cpu(), want.isinf().cpu())
        assert torch.equal(got[got.isinf()].cpu(), want[want.isinf()].cpu())
        finite = want.isfinite()
        _level_mismatch_ok(got[finite].cpu(), want[finite].cpu(), bits)
        want_grad = reference.quantize_weight_backward(grad, w, bits)
        _assert_same(torch.ops.ordercomp.quantize_weight_backward(grad, w, bits), want_grad, rtol=1e-3, atol=1e-4)


def _bad_logit_rows(cols, device="cpu"):
    """Clean rows and rows with NaN / +inf / -inf in each arrangement the kernels treat apart,
    repeated and shuffled so they cross the kernels' row blocks and chunks."""
    g = torch.Generator().manual_seed(cols)
    base = torch.randn(cols, generator=g) * 3
    last, mid = cols - 1, cols // 2
    patterns = [
        {}, {0: NAN}, {last: NAN}, {mid: NAN}, {0: INF}, {last: INF}, {0: INF, last: INF}, {0: -INF},
        {last: -INF}, {0: INF, last: NAN}, {0: NAN, last: INF}, {0: -INF, last: NAN},
    ]
    rows = []
    for pattern in patterns:
        row = base.clone()
        for j, v in pattern.items():
            row[j] = v
        rows.append(row)
    rows.append(torch.full((cols,), -INF))
    rows.append(torch.full((cols,), NAN))
    if cols > 1:
        rows.append(torch.full((cols,), -INF).index_fill(0, torch.tensor([mid]), 2.0))
    rows = torch.stack(rows)
    return rows.repeat(5, 1)[torch.randperm(5 * len(rows), generator=g)].to(device)


@pytest.mark.parametrize("cols", [1, 2, 10, 33])
@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_exit_check_bad_values_reference(cols, criterion):
    """No softmax (any NaN, any +inf, only -inf): NaN confidence, no exit even at threshold 0, and
    argmax's prediction (the first NaN); a -inf logit beside a finite maximum is a valid row."""
    logits = _bad_logit_rows(cols)
    no_softmax = logits.isnan().any(1) | (logits == INF).any(1) | (logits == -INF).all(1)
    conf, pred, mask = reference.exit_check(logits, 0.0, criterion)
    assert torch.equal(conf.isnan(), no_softmax)
    assert torch.equal(mask, ~no_softmax)
    assert torch.equal(pred, logits.argmax(1))
    has_nan = logits.isnan().any(1)
    assert torch.equal(pred[has_nan], logits.isnan().int().argmax(1)[has_nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [1, 2, 10, 32, 33, 1000])
@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_exit_check_bad_values_kernel_matches_reference(device, cols, criterion):
    _needs_kernel(device)
    logits = _bad_logit_rows(cols, device)
    for threshold in (0.0, 0.5, 1.0):
        conf, pred, mask = torch.ops.ordercomp.exit_check(logits, threshold, criterion)
        rconf, rpred, rmask = reference.exit_check(logits, threshold, criterion)
        _assert_same(conf, rconf)
        assert torch.equal(pred.cpu(), rpred.cpu())
        assert torch.equal(mask.cpu(), rmask.cpu())


def test_exit_check_minus_inf_logit_has_probability_zero():
    """By hand, on the public op (the kernel when built) and on the reference."""
    logits = torch.tensor([[1.0, -INF, 0.0], [-INF, 2.0, -INF]])
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    want_entropy = torch.tensor([1 + (p * p.log()).sum().item() / math.log(3), 1.0])
    want_maxprob = torch.tensor([p.max().item(), 1.0])
    for fn in (ops.exit_check, reference.exit_check):
        conf, pred, mask = fn(logits, 0.6, "entropy")
        torch.testing.assert_close(conf, want_entropy)
        assert pred.tolist() == [0, 1] and mask.tolist() == [False, True]
        conf, _, mask = fn(logits, 0.6, "maxprob")
        torch.testing.assert_close(conf, want_maxprob)
        assert mask.tolist() == [True, True]


def _bad_activations(signed, device="cpu"):
    """x with NaN and +-inf (over several chunks of the CPU kernel), its reference region, and two
    incoming gradients: ``quiet`` has NaN / inf only where no alpha term takes them (inside the
    range; below it when unsigned), ``loud`` has a NaN where x was clipped above."""
    x = torch.randn(70_001, device=device) * 2
    x[[0, 40_000, 70_000]] = NAN
    x[[1, 50_000]] = INF
    x[[2, 60_000]] = -INF
    alpha = torch.tensor(1.3, device=device)
    _, region = reference.fake_quant_act(x, alpha, 4, signed)
    inside = (region == 0).nonzero().flatten()[1:3].tolist()  # [0] is x = NaN, already covered
    quiet = torch.randn(x.shape, device=device)
    quiet[[0] + inside] = torch.tensor([NAN, NAN, INF], device=device)
    if not signed:
        quiet[int((region < 0).nonzero()[1])] = NAN
    loud = torch.randn(x.shape, device=device)
    loud[int((region > 0).nonzero()[1])] = NAN
    return x, alpha, region, quiet, loud


@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_bad_values_reference(signed):
    """NaN in -> NaN out in region 0 (its gradient passes to x); +-inf clip to the ends of the
    range; a bad gradient reaches alpha only from a clipped element."""
    x, alpha, region, quiet, loud = _bad_activations(signed)
    out, _ = reference.fake_quant_act(x, alpha, 4, signed)
    nan_at = [0, 40_000, 70_000]
    assert bool(out[nan_at].isnan().all()) and region[nan_at].tolist() == [0, 0, 0]
    assert out[1].item() == pytest.approx(1.3) and region[1].item() == 1
    assert out[2].item() == pytest.approx(-1.3 if signed else 0.0) and region[2].item() == -1
    grad_x, grad_alpha = reference.fake_quant_act_backward(quiet, region, signed)
    assert bool(grad_alpha.isfinite()) and bool(grad_x[0].isnan())
    assert bool(reference.fake_quant_act_backward(loud, region, signed)[1].isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_bad_values_kernel_matches_reference(device, signed):
    _needs_kernel(device)
    x, alpha, region, quiet, loud = _bad_activations(signed, device)
    for bits in (2, 4, 8):
        got, got_region = torch.ops.ordercomp.fake_quant_act(x, alpha, bits, signed)
        want, want_region = reference.fake_quant_act(x, alpha, bits, signed)
        _assert_same(got, want, rtol=0, atol=1e-6)
        assert torch.equal(got_region.cpu(), want_region.cpu())
    for grad in (quiet, loud):
        gx, ga = torch.ops.ordercomp.fake_quant_act_backward(grad, region, signed)
        rgx, rga = reference.fake_quant_act_backward(grad, region, signed)
        _assert_same(gx, rgx, rtol=0, atol=0)
        _assert_same(ga, rga, rtol=1e-4, atol=1e-3)
        # The public op's autograd (kernel) against the reference's.
        grads = []
        for apply in (ops.fake_quant_act, ops._RefFakeQuantAct.apply):
            xg = x.clone().requires_grad_(True)
            ag = alpha.clone().requires_grad_(True)
            apply(xg, ag, 4, signed).backward(grad)
            grads.append((xg.grad, ag.grad))
        _assert_same(grads[0][0], grads[1][0], rtol=0, atol=0)
        _assert_same(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-3)


def test_accumulate_bitops_bad_counter_values_reference():
    for dtype in (torch.float64, torch.float32):
        counter = torch.tensor([NAN, INF, -INF, 1.0, NAN, -INF], dtype=dtype)
        reference.accumulate_bitops(counter, torch.tensor([True, True, True, True, False, False]), 5.0)
        _assert_same(counter, torch.tensor([NAN, INF, -INF, 6.0, NAN, -INF], dtype=dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_accumulate_bitops_bad_counter_values_kernel_matches_reference(device, dtype):
    _needs_kernel(device)
    counter = torch.tensor([NAN, INF, -INF, 1.0, NAN, -INF], dtype=dtype, device=device)
    mask = torch.tensor([True, True, True, True, False, False], device=device)
    got, want = counter.clone(), counter.clone()
    torch.ops.ordercomp.accumulate_bitops(got, mask, 5.0)
    reference.accumulate_bitops(want, mask, 5.0)
    _assert_same(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_accumulate_bitops_non_contiguous_counter(dtype):
    """A strided view is updated in place (by the reference path), as a contiguous counter would be."""
    storage = torch.zeros(10, dtype=dtype)
    view = storage[::2]
    assert not view.is_contiguous()
    assert ops.accumulate_bitops(view, torch.tensor([True, False, True, True, False]), 7) is view
    assert storage.tolist() == [7, 0, 0, 0, 7, 0, 7, 0, 0, 0]


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ops.fake_quant_act(torch.randn(3), INF, 4), ConfigError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3), NAN, 4), ConfigError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3), 1e39, 4), ConfigError, "alpha"),  # inf in float32
        (lambda: ops.fake_quant_act(torch.randn(3), 1e-50, 4), ConfigError, "alpha"),  # 0 in float32
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor(INF), 4), ConfigError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor([NAN]), 4), ConfigError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor(1e-50, dtype=torch.float64), 4), ConfigError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor(1e300, dtype=torch.float64), 4), ConfigError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor([1.0]).to_sparse(), 4), ArgumentTypeError, "alpha"),
        (lambda: ops.fake_quant_act(torch.randn(3, 3).to_sparse(), 1.0, 4), ArgumentTypeError, "x"),
        (lambda: ops.quantize_weight(torch.randn(3, 3).to_sparse(), 4), ArgumentTypeError, "w"),
        (lambda: ops.exit_check(torch.randn(3, 3).to_sparse(), 0.5), ArgumentTypeError, "logits"),
        (lambda: ops.exit_check(torch.randn(3, 3), NAN), ConfigError, "threshold"),
        (lambda: ops.accumulate_bitops(torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool), 2.5), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool), 1e30), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool), 2**60 + 1), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.tensor([2**62, 0]), torch.tensor([True, False]), 2**62), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.zeros(2), torch.ones(2, dtype=torch.bool), 1e39), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.zeros(2), torch.ones(2, dtype=torch.bool), INF), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.zeros(2), torch.ones(2, dtype=torch.bool), NAN), ConfigError, "bitops"),
        (lambda: ops.accumulate_bitops(torch.zeros(1).expand(3), torch.ones(3, dtype=torch.bool), 1.0), ConfigError, "counter"),
        (lambda: ops.accumulate_bitops(torch.zeros(3, requires_grad=True), torch.ones(3, dtype=torch.bool), 1.0), ConfigError, "counter"),
        (lambda: ops.accumulate_bitops(torch.zeros(3).to_sparse(), torch.ones(3, dtype=torch.bool), 1.0), ArgumentTypeError, "counter"),
        (lambda: ops.accumulate_bitops(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), 1.0), ConfigError, "counter"),
        (lambda: ops.accumulate_bitops(torch.zeros(3), torch.ones(3, dtype=torch.bool).to_sparse(), 1.0), ArgumentTypeError, "active_mask"),
    ],
)
def test_bad_values_refused_before_the_kernel(call, error, name):
    """Refused in Python with a typed error naming the argument (never a RuntimeError from a kernel)."""
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(f"{name} must ") and ", got " in str(info.value)


@needs_compiled
def test_kernel_checks_remain_a_last_line_of_defence():
    with pytest.raises(RuntimeError, match="alpha must be finite and > 0"):
        torch.ops.ordercomp.fake_quant_act(torch.ones(3), torch.tensor(INF), 4, False)
    with pytest.raises(RuntimeError, match="counter must be contiguous"):
        torch.ops.ordercomp.accumulate_bitops(torch.zeros(6, dtype=torch.float64)[::2], torch.ones(3, dtype=torch.bool), 1.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.fake_quant_act(torch.randn(3), 1.0, 0), "bits must be an integer in 1..16, got 0"),
        (lambda: ops.fake_quant_act(torch.randn(3), 1.0, 17), "bits must be an integer in 1..16, got 17"),
        (lambda: ops.fake_quant_act(torch.randn(3), 1.0, 1, signed=True), "bits must be an integer in 2..16, got 1"),
        (lambda: ops.fake_quant_act(torch.randn(3), 0.0, 4), "alpha must be a finite number > 0"),
        (lambda: ops.fake_quant_act(torch.randn(3), torch.tensor(-1.0), 4), "alpha must be a finite number > 0, got -1.0"),
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
