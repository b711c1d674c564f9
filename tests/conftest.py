"""Shared fixtures: real MNIST digits for stage tests, seeded RNG for every test."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def mnist_small():
    """1 024 training and 512 test digits: enough for a few real batches, fast on 2 cores."""
    return load_mnist24k(1024, 512)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
