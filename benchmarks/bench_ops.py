"""Op benchmarks: each compiled op against its pure-PyTorch reference and the nearest native op.

Run: ``python -m pytest benchmarks/bench_ops.py`` (prints the pytest-benchmark table, then ratios
and the targets). Inputs: a 16M-element tensor and the activation / weight / logit shapes of a
CIFAR ResNet34 forward at batch 128. ``x.clone()`` is the memory-bandwidth floor.
"""

from __future__ import annotations

import pytest
import torch

import ordercomp
from ordercomp import ops, reference

DEVICES = ["cpu"] + (["cuda"] if ordercomp.backend_info()["cuda"] else [])
BIG = (16 * 1024 * 1024,)
# Conv input activations of a CIFAR ResNet34 at batch 128, one per stage.
RESNET34_ACTS = {"big16M": BIG, "stage1": (128, 64, 32, 32), "stage2": (128, 128, 16, 16),
                 "stage3": (128, 256, 8, 8), "stage4": (128, 512, 4, 4)}
# Conv weights of a CIFAR ResNet34: the smallest and largest 3x3 kernels.
RESNET34_WEIGHTS = {"big16M": BIG, "w64x64x3x3": (64, 64, 3, 3), "w512x512x3x3": (512, 512, 3, 3)}
LOGITS = {"b8192c10": (8192, 10), "b1024c1000": (1024, 1000)}


def _timed(fn, device):
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


def _require_kernel(device):
    info = ordercomp.backend_info()
    if not info["compiled"] or (device == "cuda" and not info["cuda"]):
        pytest.skip(info["reason"])


@pytest.mark.parametrize("impl", ["ordercomp", "reference", "torch_fake_quantize", "clone"])
@pytest.mark.parametrize("shape_name", list(RESNET34_ACTS))
@pytest.mark.parametrize("device", DEVICES)
def test_fake_quant_act(benchmark, impl, shape_name, device):
    _require_kernel(device)
    benchmark.group = f"fake_quant_act 8bit {shape_name} {device}"
    x = torch.randn(RESNET34_ACTS[shape_name], device=device)
    alpha = torch.tensor(1.0, device=device)
    fn = {
        "ordercomp": lambda: ops.fake_quant_act(x, alpha, 8),
        "reference": lambda: reference.fake_quant_act(x, alpha, 8),
        "torch_fake_quantize": lambda: torch.fake_quantize_per_tensor_affine(x, 1.0 / 255, 0, 0, 255),
        "clone": lambda: x.clone(),
    }[impl]
    benchmark(_timed(fn, device))


@pytest.mark.parametrize("impl", ["ordercomp", "reference", "torch_tanh", "clone"])
@pytest.mark.parametrize("shape_name", list(RESNET34_WEIGHTS))
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_weight(benchmark, impl, shape_name, device):
    _require_kernel(device)
    benchmark.group = f"quantize_weight 4bit {shape_name} {device}"
    w = torch.randn(RESNET34_WEIGHTS[shape_name], device=device) * 0.1
    fn = {
        "ordercomp": lambda: ops.quantize_weight(w, 4),
        "reference": lambda: reference.quantize_weight(w, 4),
        "torch_tanh": lambda: torch.tanh(w),
        "clone": lambda: w.clone(),
    }[impl]
    benchmark(_timed(fn, device))


def _softmax_max_compare(logits, threshold):
    conf, pred = torch.softmax(logits, dim=1).max(dim=1)
    return conf, pred, conf >= threshold


@pytest.mark.parametrize("impl", ["ordercomp", "reference", "softmax_max_compare"])
@pytest.mark.parametrize("shape_name", list(LOGITS))
@pytest.mark.parametrize("device", DEVICES)
def test_exit_check(benchmark, impl, shape_name, device):
    _require_kernel(device)
    benchmark.group = f"exit_check maxprob {shape_name} {device}"
    logits = torch.randn(LOGITS[shape_name], device=device) * 3
    fn = {
        "ordercomp": lambda: ops.exit_check(logits, 0.5),
        "reference": lambda: reference.exit_check(logits, 0.5),
        "softmax_max_compare": lambda: _softmax_max_compare(logits, 0.5),
    }[impl]
    benchmark(_timed(fn, device))


@pytest.mark.parametrize("impl", ["ordercomp", "reference", "index_put"])
@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_bitops(benchmark, impl, device):
    _require_kernel(device)
    benchmark.group = f"accumulate_bitops b8192 {device}"
    counter = torch.zeros(8192, dtype=torch.float64, device=device)
    mask = torch.rand(8192, device=device) > 0.3

    def index_put():
        counter[mask] += 1.5e9

    fn = {
        "ordercomp": lambda: ops.accumulate_bitops(counter, mask, 1.5e9),
        "reference": lambda: reference.accumulate_bitops(counter, mask, 1.5e9),
        "index_put": index_put,
    }[impl]
    benchmark(_timed(fn, device))
