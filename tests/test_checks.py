"""The argument checks and the typed errors: messages, what passes, and the CLI's handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ordercomp
from ordercomp import checks
from ordercomp import errors
from ordercomp.errors import ArgumentTypeError, ConfigError, OrdercompError


@pytest.mark.parametrize("name, builtin", [
    ("ConfigError", ValueError), ("ArgumentTypeError", TypeError), ("DataError", ValueError),
    ("ModelError", ValueError), ("MissingFileError", FileNotFoundError), ("MissingDependencyError", ImportError),
    ("TrainingError", FloatingPointError), ("RunError", RuntimeError),
])
def test_every_error_is_an_ordercomp_error_and_its_builtin(name, builtin):
    cls = getattr(errors, name)
    err = cls("message")
    assert isinstance(err, OrdercompError) and isinstance(err, builtin)
    assert str(err) == "message"
    assert getattr(ordercomp, cls.__name__) is cls


def test_integer():
    assert checks.integer("epochs", 3, 1) == 3
    assert checks.integer("limit", None, 1, optional=True) is None
    assert checks.integer("seed", np.int64(2).item(), 0) == 2
    cases = [
        (dict(value=0, low=1), "epochs must be an integer >= 1, got 0"),
        (dict(value=True, low=1), "epochs must be an integer >= 1, got True"),
        (dict(value=2.0, low=1), "epochs must be an integer >= 1, got 2.0"),
        (dict(value=9, low=1, high=8), "epochs must be an integer in 1..8, got 9"),
        (dict(value=None, low=1), "epochs must be an integer >= 1, got None"),
        (dict(value="x", low=1, optional=True), "epochs must be an integer >= 1 or None, got 'x'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as info:
            checks.integer("epochs", **kwargs)
        assert str(info.value) == message


def test_number():
    assert checks.number("lr", 0.1, low=0, low_open=True) == 0.1
    assert checks.number("alpha", np.float32(0.5), low=0, high=1) == 0.5
    assert checks.number("threshold", math.inf, low=0, finite=False) == math.inf
    cases = [
        (dict(value=0.0, low=0, low_open=True), "x must be a finite number > 0, got 0.0"),
        (dict(value=math.inf, low=0), "x must be a finite number >= 0, got inf"),
        (dict(value=math.nan, low=0, finite=False), "x must be a number >= 0, got nan"),
        (dict(value=1.0, low=0, high=1, high_open=True), "x must be a number in [0, 1), got 1.0"),
        (dict(value=-0.5, low=0, high=1), "x must be a number in [0, 1], got -0.5"),
        (dict(value=False, low=0, high=1), "x must be a number in [0, 1], got False"),
        (dict(value="1", high=2), "x must be a finite number <= 2, got '1'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as info:
            checks.number("x", **kwargs)
        assert str(info.value) == message


def test_bits_flag_one_of_tensor():
    assert checks.bits("a_bits", 32, 1, 16, also=(32,)) == 32
    with pytest.raises(ConfigError, match=r"^a_bits must be an integer in 1\.\.16 or 32, got 17$"):
        checks.bits("a_bits", 17, 1, 16, also=(32,))
    assert checks.flag("crd", False) is False
    with pytest.raises(ConfigError, match=r"^crd must be True or False, got 1$"):
        checks.flag("crd", 1)
    assert checks.one_of("criterion", "entropy", ("maxprob", "entropy")) == "entropy"
    with pytest.raises(ConfigError, match=r"^criterion must be one of \('maxprob', 'entropy'\), got \['x'\]$"):
        checks.one_of("criterion", ["x"], ("maxprob", "entropy"))
    with pytest.raises(ConfigError, match=r"^head must be one of \('pool',\), got \['pool'\]$"):
        checks.one_of("head", ["pool"], {"pool"})  # an unhashable value against a set
    with pytest.raises(ArgumentTypeError, match="logits must be a floating-point tensor, got torch.int64"):
        checks.tensor("logits", torch.zeros(2, dtype=torch.int64), floating=True)


def test_library_checks_raise_typed_errors():
    """A few settings across the layers: each raises a ConfigError that existing ValueError code catches."""
    from ordercomp import models, nn as onn
    from ordercomp.stages import Prune, Quantize
    from ordercomp.train import TrainConfig

    for build, message in [
        (lambda: TrainConfig(lr=math.inf), "lr must be a finite number > 0, got inf"),
        (lambda: Prune(ratio=1.0), "ratio must be a number in (0, 1), got 1.0"),
        (lambda: Quantize(w_bits=9), "w_bits must be an integer in 1..8, got 9"),
        (lambda: onn.check_a_bits(1, signed=True), "a_bits for a signed input must be an integer in 2..16 or 32, got 1"),
        (lambda: models.create("resnet20", num_classes=0), "num_classes must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ValueError) as info:
            build()
        assert isinstance(info.value, ConfigError)
        assert str(info.value) == message


def test_cli_prints_a_user_error_as_one_line_with_exit_code_2(tmp_path, capsys):
    from ordercomp.cli import main

    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ordercomp evaluate: error: {tmp_path / 'missing'} is not a run directory (no state.json)"


def test_cli_lets_a_bug_show_its_traceback(monkeypatch, tmp_path):
    """Only OrdercompError is a user error: anything else (here a planted bug) propagates."""
    from ordercomp.cli import evaluate, main

    def broken(path, stage_modules=()):
        raise KeyError("planted bug")

    monkeypatch.setattr(evaluate, "read_run", broken)
    with pytest.raises(KeyError, match="planted bug"):
        main(["evaluate", str(tmp_path)])
