"""The stage protocol: every training happens in the runner, methods of one's own, the pieces in a
plain PyTorch loop, and the trainer's options (optimizer factory, its own random state, DDP on request)."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp import distributed
from ordercomp.nn import ExitNet, QuantLayer
from ordercomp.pipeline import compress
from ordercomp.search import search_order
from ordercomp.stages import (
    Distill,
    EarlyExit,
    Prepared,
    Stage,
    channel_counts,
    letters,
    register_stage,
    thinner_copy,
)
from ordercomp.stages.registry import unregister_stage
from ordercomp.train import TrainConfig, Trainer

from conftest import REPO, count_accuracy
from test_stages import loaders, teacher

FAST = dict(epochs=1, max_batches=2, progress=False)


def _loaders(mnist, n_train=256, n_val=128):
    xtr, ytr, xte, yte = mnist
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(xtr[:n_train], ytr[:n_train]), batch_size=64, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(xte[:n_val], yte[:n_val]), batch_size=64)


def _model():
    torch.manual_seed(0)
    return ordercomp.models.create("resnet8", num_classes=10, in_channels=1)


# ----------------------------------------------------------------------------- every fit in the runner


def test_every_fit_is_called_by_the_runner(monkeypatch, mnist_small):
    calls = []
    fit = Trainer.fit

    def counting(self, *args, **kwargs):
        caller = inspect.stack()[1]
        calls.append((Path(caller.filename).name, caller.function, kwargs.get("desc")))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", counting)
    train, val = _loaders(mnist_small)
    config = {"distill": {"crd": True, "crd_negatives": 64}, "early_exit": {"finetune": True}}
    result = compress(_model(), train, val, order="DPQE", config=config, **FAST)
    assert [c[:2] for c in calls] == [("runner.py", "fit_phase")] * 6
    assert [c[2] for c in calls] == ["D train", "D finetune", "P finetune", "Q finetune", "E train", "E finetune"]
    d, p, q, e = (s["info"] for s in result.report["stages"])
    assert len(d["train_loss"]) == 1 and len(d["finetune_loss"]) == 1
    assert len(e["train_loss"]) == 1 and len(e["finetune_loss"]) == 1


def test_heads_phase_freezes_the_body_and_its_batch_norm(mnist_small):
    train, val = _loaders(mnist_small)
    model = _model()
    context = ordercomp.Context.create(model, train, val, TrainConfig(**FAST))
    prepared = EarlyExit().prepare(model, context)
    (heads,) = prepared.phases
    assert heads.lr_scale == 1.0 and list(heads.frozen) == [prepared.model.segments]
    body = {k: v.clone() for k, v in prepared.model.segments.state_dict().items()}
    ordercomp.pipeline.fit_phase(context.trainer, prepared.model, train, heads, "E train")
    assert all(torch.equal(body[k], v) for k, v in prepared.model.segments.state_dict().items())
    assert all(p.requires_grad for p in prepared.model.parameters()), "frozen only during the phase"


# ----------------------------------------------------------------------------- a method of one's own


@dataclass
class Sparsify(Stage):
    """L: zeroes the smallest-magnitude ``fraction`` of every conv's weights (a method defined only here)."""

    letter = "L"
    fraction: float = 0.5

    def _zero(self, model: nn.Module) -> int:
        zeroed = 0
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    k = int(m.weight.numel() * self.fraction)
                    m.weight.view(-1)[m.weight.abs().flatten().argsort()[:k]] = 0
                    zeroed += k
        return zeroed

    def prepare(self, model: nn.Module, context) -> Prepared:
        return Prepared(model, None, {"zeroed": self._zero(model)})  # None: one fine-tune with the task loss

    def finalize(self, model: nn.Module, context) -> dict:
        """Fine-tuning moved the zeros: zero again, and count the exact zeros that are left."""
        moved = sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, nn.Conv2d))
        self._zero(model)
        zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Conv2d))
        return {"nonzero_before_finalize": moved, "zeros": zeros}


@pytest.fixture
def sparsify():
    register_stage(Sparsify)
    yield Sparsify
    unregister_stage("L")


def test_a_registered_method_runs_in_any_order(sparsify, mnist_small):
    train, val = _loaders(mnist_small)
    result = compress(_model(), train, val, order="DLPQE", stages={"L": Sparsify(fraction=0.25)}, **FAST)
    assert [s["stage"] for s in result.report["stages"]] == list("DLPQE")
    student = thinner_copy(_model(), 0.5, torch.zeros(2, 1, 28, 28))  # what L receives from D
    expected = sum(int(m.weight.numel() * 0.25) for m in student.modules() if isinstance(m, nn.Conv2d))
    info = result.report["stages"][1]["info"]
    assert info["zeroed"] == expected and len(info["finetune_loss"]) == 1
    total = sum(m.weight.numel() for m in student.modules() if isinstance(m, nn.Conv2d))
    assert info["nonzero_before_finalize"] == total, "finalize runs after the fine-tune, which moved every zero"
    assert info["zeros"] == expected
    with pytest.raises(ValueError, match="letter 'L' is taken by Sparsify"):
        register_stage(type("Other", (Sparsify,), {"__doc__": "x"}))


def test_a_registered_method_takes_part_in_the_search(sparsify, mnist_small, tmp_path):
    train, val = _loaders(mnist_small)
    plan = search_order(_model(), train, val, "LQ", "tiny", epochs=1, max_batches=2, out=tmp_path, verbose=False)
    assert set(plan.pairwise) == {"LQ"}
    evidence = plan.pairwise["LQ"]
    assert set(evidence.points) == {"LQ", "QL"} and all(evidence.points.values())
    # the order is the one the evidence supports: a decisive verdict's winner; on a tie the order the
    # margin favours (both are consistent), and on an exact tie the registry's letter order
    if evidence.winner:
        expected = evidence.winner
    elif evidence.margin:
        expected = "LQ" if evidence.margin > 0 else "QL"
    else:
        expected = min(("LQ", "QL"), key=lambda o: [letters().index(c) for c in o])
    assert plan.order == expected
    assert plan.unique == bool(evidence.winner)


def test_registry_refuses_bad_classes():
    with pytest.raises(TypeError, match="dataclass subclass of ordercomp.stages.Stage"):
        register_stage(int)

    @dataclass
    class NoLetter(Stage):
        pass

    with pytest.raises(ValueError, match="NoLetter.letter must be one uppercase letter"):
        register_stage(NoLetter)
    with pytest.raises(ValueError, match="built-in stage 'D' cannot be removed"):
        unregister_stage("D")


# ----------------------------------------------------------------------------- pieces in a plain loop


def _readme_block(title: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_plain_loop_runs():
    """The README's own-training-loop example, as written, on real digits."""
    train, val = loaders()
    train, calib = ordercomp.data.split_loader(train, 0.2)
    model = teacher()
    original = Trainer(TrainConfig(progress=False)).evaluate(model, val)
    before = channel_counts(model)
    scope = {"model": model, "train_loader": train, "val_loader": val, "calib_loader": calib}
    exec(compile(_readme_block("### In your own training loop"), "README.md", "exec"), scope)
    net, choice, losses = scope["net"], scope["choice"], scope["losses"]
    assert isinstance(net, ExitNet) and any(isinstance(m, QuantLayer) for m in net.modules())
    after = channel_counts(net)
    assert after["segments.0.stem.conv"] == before["features.stem.conv"] // 2
    assert original > 80 and choice["accuracy"] > 50, "pruned to half, 4w8a and trained 64 steps: well above chance"
    assert net.threshold == choice["threshold"]
    sweep = {p["threshold"]: p["accuracy"] for p in choice["sweep"]}
    margin = {p["threshold"]: p["margin"] for p in choice["sweep"]}
    chosen = choice["threshold"]
    assert choice["accuracy"] == sweep[chosen] >= choice["baseline"] - 1.0 + margin[chosen] - 1e-9
    assert choice["baseline"] == choice["sweep"][-1]["accuracy"]  # the no-exit point
    feasible = [p for p in choice["sweep"] if p["accuracy"] - p["margin"] >= choice["baseline"] - 1.0 - 1e-9]
    assert choice["expected_bitops"] == min(p["expected_bitops"] for p in feasible)  # the cheapest allowed
    assert choice["accuracy"] == pytest.approx(count_accuracy(net, calib), abs=1e-9), "chosen on calibration data"
    assert sum(losses[-4:]) < sum(losses[:4]), "the loop must learn"


# ----------------------------------------------------------------------------- the trainer's options


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


def test_optimizer_factory_gets_the_phase_settings(mnist_small):
    train, _ = _loaders(mnist_small)
    seen = []

    def adam(params, config):
        seen.append(config.lr)
        return torch.optim.Adam(params, lr=config.lr)

    trainer = Trainer(TrainConfig(lr=0.02, max_batches=2, progress=False), optimizer=adam)
    fit = trainer.fit(_tiny(), train, finetune=True)
    trainer.fit(_tiny(), train, lr_scale=0.5)
    assert seen == [pytest.approx(0.006), pytest.approx(0.01)] and fit.lrs[0] == pytest.approx(0.006)  # 0.3 x lr
    with pytest.raises(ValueError, match="optimizer must be a callable"):
        Trainer(optimizer="adam")


def test_fit_leaves_the_global_random_state_alone(mnist_small):
    train, _ = _loaders(mnist_small)
    train = DataLoader(train.dataset, batch_size=64, shuffle=True)  # shuffles from the random state fit sets
    runs = []
    for outer_seed in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Dropout(0.3), _tiny())
        torch.manual_seed(outer_seed)
        state = torch.get_rng_state()
        fit = Trainer(TrainConfig(max_batches=3, seed=5, progress=False)).fit(model, train)
        assert torch.equal(torch.get_rng_state(), state), "fit must not move the caller's random state"
        runs.append(fit.batch_losses)
    assert runs[0] == runs[1], "the fit's randomness comes from its own seed only"


def test_ddp_only_when_asked(monkeypatch, mnist_small):
    monkeypatch.setattr(distributed, "active", lambda: True)
    step = distributed.training_step(_tiny(), lambda m, x, y, i: m(x).sum())
    assert type(step).__name__ == "_Step", "no DistributedDataParallel unless asked"

    def no_shard(*args):
        raise AssertionError("the data must not be sharded without ddp=True")

    monkeypatch.setattr(distributed, "shard", no_shard)
    train, _ = _loaders(mnist_small)
    Trainer(TrainConfig(max_batches=1, progress=False)).fit(_tiny(), train)
    with pytest.raises(AssertionError, match="must not be sharded"):
        Trainer(TrainConfig(max_batches=1, progress=False), ddp=True).fit(_tiny(), train)


def test_distill_prepare_does_not_train(mnist_small):
    train, val = _loaders(mnist_small)
    model = _model()
    context = ordercomp.Context.create(model, train, val, TrainConfig(**FAST))
    prepared = Distill().prepare(model, context)
    assert [p.name for p in prepared.phases] == ["train", "finetune"]
    assert prepared.phases[0].lr_scale == 1.0 and prepared.phases[1].lr_scale is None  # None: fine-tuning rate
    assert prepared.architecture is None, "resnet8 is the smallest member: a thinner copy keeps its architecture"
    assert channel_counts(prepared.model)["features.stem.conv"] == channel_counts(model)["features.stem.conv"] // 2
    big = ordercomp.models.create("resnet20", num_classes=10, in_channels=1)
    context = ordercomp.Context.create(big, train, val, TrainConfig(**FAST))
    assert Distill().prepare(big, context).architecture["zoo"] == "resnet8"
