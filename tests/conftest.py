"""Shared fixtures: real MNIST digits for stage tests, seeded RNG for every test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MNIST24K = Path(os.environ.get("ORDERCOMP_MNIST24K", REPO.parent / "shared" / "data" / "mnist24k.npz"))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist24k(n_train: int | None = None, n_test: int | None = None):
    """Real MNIST as normalised float tensors: (x_train [N,1,28,28], y_train, x_test, y_test)."""
    if not MNIST24K.exists():
        pytest.fail(f"test data missing: {MNIST24K} (set ORDERCOMP_MNIST24K to its path)")
    with np.load(MNIST24K) as npz:
        parts = [npz["x_train"][:n_train], npz["y_train"][:n_train], npz["x_test"][:n_test], npz["y_test"][:n_test]]

    def images(a):
        return ((torch.from_numpy(a).float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

    return images(parts[0]), torch.from_numpy(parts[1]).long(), images(parts[2]), torch.from_numpy(parts[3]).long()


@pytest.fixture(scope="session")
def mnist_small():
    """1 024 training and 512 test digits: enough for a few real batches, fast on 2 cores."""
    return load_mnist24k(1024, 512)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
