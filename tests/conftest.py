"""Shared fixtures: real MNIST digits for stage tests, seeded RNG for every test, and the device x
dtype cases the layer, exit, bitops and ops tests run on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real MNIST shipped with the tests: the first 1 024 training and 512 test digits of the official
# sets, as uint8 arrays x_train, y_train, x_test, y_test (ORDERCOMP_MNIST_DATA may name a larger file).
MNIST_DATA = Path(os.environ.get("ORDERCOMP_MNIST_DATA", REPO / "tests" / "data" / "mnist_slice.npz"))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist24k(n_train: int | None = None, n_test: int | None = None):
    """Real MNIST as normalised float tensors: (x_train [N,1,28,28], y_train, x_test, y_test)."""
    if not MNIST_DATA.exists():
        pytest.fail(f"test data missing: {MNIST_DATA} (set ORDERCOMP_MNIST_DATA to its path)")
    with np.load(MNIST_DATA) as npz:
        parts = [npz["x_train"][:n_train], npz["y_train"][:n_train], npz["x_test"][:n_test], npz["y_test"][:n_test]]
    for want, got in ((n_train, parts[0]), (n_test, parts[2])):
        if want is not None and len(got) < want:
            pytest.fail(f"{MNIST_DATA} holds {len(got)} digits of a split, {want} asked for")

    def images(a):
        return ((torch.from_numpy(a).float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

    return images(parts[0]), torch.from_numpy(parts[1]).long(), images(parts[2]), torch.from_numpy(parts[3]).long()


def count_accuracy(model, loader) -> float:
    """Top-1 accuracy (%) counted from the model's own predictions, batch by batch: dynamic early exit
    at the net's own threshold for a network with exits (``infer``), the argmax of the logits
    otherwise. The model's training mode is restored."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    correct = seen = 0
    try:
        with torch.no_grad():
            for x, y, *_ in loader:
                x, y = x.to(device), y.to(device)
                pred = model.infer(x).predictions if hasattr(model, "infer") else model(x).argmax(1)
                correct += int((pred == y).sum())
                seen += len(y)
    finally:
        model.train(was_training)
    return 100.0 * correct / seen


@pytest.fixture(scope="session")
def mnist_small():
    """1 024 training and 512 test digits: enough for a few real batches, fast on 2 cores."""
    return load_mnist24k(1024, 512)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# --------------------------------------------------------------------------- devices and dtypes

CUDA_AVAILABLE = torch.cuda.is_available()
CUDA_REASON = "needs a CUDA device: torch.cuda.is_available() is False"
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason=CUDA_REASON)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).rpartition(".")[2]


def device_param(device: str):
    """``pytest.param(device)``; a CUDA case is marked ``cuda`` and skipped (with the reason) without one."""
    marks = (pytest.mark.cuda, requires_cuda) if device == "cuda" else ()
    return pytest.param(device, marks=marks, id=device)


def device_dtype_param(device: str, dtype: torch.dtype):
    """``pytest.param(device, dtype)`` for ``parametrize("device,dtype", ...)``, marked as :func:`device_param`."""
    marks = (pytest.mark.cuda, requires_cuda) if device == "cuda" else ()
    return pytest.param(device, dtype, marks=marks, id=f"{device}-{_dtype_name(dtype)}")


# The cases every layer / model behaviour must hold on. The ops tests add the CUDA half types.
DEVICE_DTYPES = [
    device_dtype_param("cpu", torch.float32),
    device_dtype_param("cpu", torch.float64),
    device_dtype_param("cuda", torch.float32),
]

# Tolerances for comparing a computation with its reference computed the same way on the same
# device and dtype (float64 paths quantize in float32 inside, as the reference does).
_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


class DeviceDtype(NamedTuple):
    """One case of the ``device_dtype`` fixture. Random data is drawn on the CPU in float32 and then
    moved, so every case sees the same values (hand-computed expectations stay valid)."""

    device: torch.device
    dtype: torch.dtype

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def randn(self, *shape: int) -> torch.Tensor:
        return self.tensor(torch.randn(*shape))

    def rand(self, *shape: int) -> torch.Tensor:
        return self.tensor(torch.rand(*shape))

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        """``m`` (built on the CPU in float32) moved to this device and dtype."""
        return m.to(device=self.device, dtype=self.dtype)

    @property
    def tol(self) -> dict:
        """``rtol`` / ``atol`` for ``torch.testing.assert_close`` against a same-device reference."""
        return dict(_TOLERANCE[self.dtype])


@pytest.fixture(
    params=[pytest.param(DeviceDtype(torch.device(p.values[0]), p.values[1]), marks=p.marks, id=p.id)
            for p in DEVICE_DTYPES]
)
def device_dtype(request):
    """(cpu, float32), (cpu, float64) and (cuda, float32); the CUDA case is marked ``cuda`` and skipped
    without a device. On CUDA, TF32 is off for the test so float32 means float32."""
    case = request.param
    if case.device.type != "cuda":
        yield case
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield case
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def paying_exits(**settings):
    """An early-exit stage whose exits always pay off: a threshold of 0 lets every input leave at the
    first head. Tests of what E does to a model need its heads kept, which the barely trained heads
    of a smoke run would not earn (E drops heads that no input leaves at)."""
    from ordercomp.stages import EarlyExit

    return EarlyExit(thresholds=(0.0,), max_accuracy_loss=100, **settings)


_TRAIN_FIELDS = ("epochs", "max_batches", "progress")


def config_of(order=None, config=None, **fields):
    """A :class:`~ordercomp.CompressConfig` for ``compress``: ``config`` (a config, a dict or None)
    with ``order`` and the other top-level ``fields`` set; ``epochs``, ``max_batches`` and
    ``progress`` set the trainer's."""
    import dataclasses

    from ordercomp import CompressConfig

    if isinstance(config, (str, Path)):
        config = CompressConfig.load(config)
    base = config if isinstance(config, CompressConfig) else CompressConfig.from_dict(config or {})
    train = {key: fields.pop(key) for key in _TRAIN_FIELDS if key in fields}
    if order is not None:
        fields["order"] = order
    return dataclasses.replace(base, train=dataclasses.replace(base.train, **train), **fields)


def quick(order=None, config=None, **fields):
    """:func:`config_of` with every trainer cut to one epoch of two batches, without progress bars."""
    return config_of(order, config, **{"epochs": 1, "max_batches": 2, "progress": False, **fields})
