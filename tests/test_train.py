"""Trainer, losses (KD, CRD), the index wrapper and the context: values, determinism, bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ordercomp.data import IndexedDataset, with_indices
from ordercomp.losses import CRDLoss, DistillObjective, TaskObjective, distillation_loss, kd_loss
from ordercomp.nn import ExitNet, PenultimateFeatures, attach_exits, exit_outputs, final_classifier
from ordercomp.stages import Context
from ordercomp.train import TrainConfig, Trainer


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Six thousand parameters; above 50 % on MNIST digits after 64 batches."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, num_classes),
    )


def loaders(mnist_small, batch_size: int = 32, n_val: int = 256):
    xtr, ytr, xte, yte = mnist_small
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(xte[:n_val], yte[:n_val]), batch_size=128)
    return train, val


def quiet(**kw) -> TrainConfig:
    return TrainConfig(progress=False, **kw)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"max_batches": 0}, "max_batches must be an integer >= 1 or None"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"momentum": 1.5}, "momentum must be a number in [0, 1], got 1.5"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"finetune_lr_scale": 0}, "finetune_lr_scale must be a number in (0, 1], got 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kwargs)


def test_finetuning_config_scales_lr_only():
    cfg = TrainConfig(lr=0.2, epochs=3, finetune_lr_scale=0.1)
    ft = cfg.finetuning()
    assert ft.lr == pytest.approx(0.02) and ft.epochs == 3 and cfg.lr == 0.2


# ----------------------------------------------------------------------------- trainer


def test_fit_learns_digits_and_is_deterministic(mnist_small):
    train, val = loaders(mnist_small)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = small_cnn()
        trainer = Trainer(quiet(epochs=2, lr=0.1, seed=7))
        before = trainer.evaluate(model, val)
        fit = trainer.fit(model, train)
        runs.append((model, fit, before, trainer.evaluate(model, val)))
    (m1, fit1, before, after), (m2, fit2, _, after2) = runs
    assert len(fit1.batch_losses) == 64 and len(fit1.epoch_losses) == 2
    assert fit1.epoch_losses[1] < fit1.epoch_losses[0] < fit1.batch_losses[0]
    assert after > 50.0 and after > before + 30
    assert fit1.batch_losses == fit2.batch_losses and after == after2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("schedule", ["cosine", "step", "none"])
def test_schedules_and_finetune_lr(mnist_small, schedule):
    train, _ = loaders(mnist_small)
    trainer = Trainer(quiet(epochs=2, max_batches=4, lr=0.1, schedule=schedule))
    lrs = trainer.fit(small_cnn(), train).lrs
    assert len(lrs) == 8 and lrs[0] == pytest.approx(0.1)
    if schedule == "cosine":
        assert lrs[4] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs, lrs[1:]))
    elif schedule == "step":
        assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    else:
        assert lrs == pytest.approx([0.1] * 8)
    assert trainer.fit(small_cnn(), train, finetune=True).lrs[0] == pytest.approx(0.03)  # finetune_lr_scale 0.3


def test_progress_bars_can_be_silenced(mnist_small, capsys):
    train, val = loaders(mnist_small)
    Trainer(quiet(max_batches=2)).fit(small_cnn(), train)
    Trainer(quiet()).evaluate(small_cnn(), val)
    assert capsys.readouterr().err == ""
    Trainer(TrainConfig(max_batches=2, progress=True)).fit(small_cnn(), train)
    assert "train 1/1" in capsys.readouterr().err


class _Lookup(nn.Module):
    """Outputs a fixed list of logits per input index (x holds the index)."""

    def __init__(self, *outputs):
        super().__init__()
        self.outputs = outputs
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        i = x.long().flatten()
        outs = [o[i] for o in self.outputs]
        return outs if len(outs) > 1 else outs[0]


def test_evaluate_counts_top1_of_the_logits_and_scores_the_final_exit():
    y = torch.tensor([0, 1, 2, 0])
    right = F.one_hot(y, 3).float()
    half = right.clone()
    half[:2] = F.one_hot(torch.tensor([2, 2]), 3).float()
    loader = DataLoader(TensorDataset(torch.arange(4).float(), y), batch_size=3)
    trainer = Trainer(quiet())
    assert trainer.evaluate(_Lookup(half), loader) == 50.0
    assert trainer.evaluate(_Lookup(half, right), loader) == 50.0  # a list's first element is the logits
    assert Trainer(quiet(), output=1).evaluate(_Lookup(half, right), loader) == 100.0
    assert Trainer(quiet(), output=lambda out: out[-1]).evaluate(_Lookup(half, right), loader) == 100.0
    net = ExitNet([nn.Identity(), _Lookup(right)], [_Lookup(half)])
    assert trainer.evaluate(net, loader) == 100.0
    assert trainer.evaluate(net, loader, exit=0) == 50.0


def test_fit_refuses_empty_loaders_and_frozen_models(mnist_small):
    model = small_cnn()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0).long()), batch_size=4)
    with pytest.raises(ValueError, match="yielded no batches"):
        Trainer(quiet()).fit(model, empty)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        Trainer(quiet()).fit(model, loaders(mnist_small)[0])


# ----------------------------------------------------------------------------- losses


def test_kd_loss_matches_the_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    p_t, p_s = F.softmax(t / 4, 1), F.softmax(s / 4, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * 16
    assert kd_loss(s, t) == pytest.approx(float(expected), rel=1e-5)
    assert kd_loss(t, t) == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_weights_ce_and_kd():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10), torch.randint(0, 10, (6,))
    total = distillation_loss(s, t, y, alpha=0.7, beta=0.0, gamma=0.3, T=2.0)
    expected = 0.3 * F.cross_entropy(s, y) + 0.7 * kd_loss(s, t, 2.0)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    total.backward()
    # the gradient is that of the formula written out: 0.3 CE + 0.7 T^2 KL(p_t || p_s) at T = 2
    s2 = s.detach().clone().requires_grad_(True)
    p_t = F.softmax(t / 2, 1)
    formula = 0.3 * F.cross_entropy(s2, y) + 0.7 * 4 * (p_t * (p_t.log() - F.log_softmax(s2 / 2, 1))).sum(1).mean()
    formula.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="beta > 0 needs crd"):
        distillation_loss(s, t, y, beta=1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        DistillObjective(nn.Linear(2, 2), alpha=-1)
    with pytest.raises(ValueError, match="T must be a finite number > 0"):
        DistillObjective(nn.Linear(2, 2), T=0)


def test_mixup_distils_on_mixed_images_with_mixed_labels():
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    objective = DistillObjective(teacher, alpha=0.7, gamma=0.3, T=2.0, mixup=0.4)
    torch.manual_seed(5)
    loss = objective(student, x, y)
    # by hand: the same draws, teacher and student on the same mixed batch, the labels mixed alike
    torch.manual_seed(5)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    mixed = lam * x + (1 - lam) * x[perm]
    s, t = student(mixed), teacher(mixed).detach()
    ce = lam * F.cross_entropy(s, y) + (1 - lam) * F.cross_entropy(s, y[perm])
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(6))
    assert float(loss.detach()) == pytest.approx(float((0.3 * ce + 0.7 * kd_loss(s, t, 2.0)).detach()), rel=1e-5)
    student.eval()  # evaluation never mixes
    with torch.no_grad():
        assert float(objective(student, x, y)) == pytest.approx(
            float(distillation_loss(student(x), teacher(x), y, 0.7, 0.0, 0.3, 2.0)), rel=1e-6)
    with pytest.raises(ValueError, match="mixup must be a finite number >= 0"):
        DistillObjective(teacher, mixup=-1)


def test_crd_memory_bank_negatives_and_gradients():
    torch.manual_seed(0)
    crd = CRDLoss(student_dim=12, teacher_dim=20, num_samples=50, feat_dim=8)
    assert crd.num_negatives == 49  # fewer negatives than 16384 when the data set is smaller
    f_s, f_t = torch.randn(4, 12, requires_grad=True), torch.randn(4, 20)
    index = torch.tensor([3, 7, 11, 42])
    old_t = crd.memory_t[index].clone()
    loss = crd(f_s, f_t, index)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    assert f_s.grad.abs().sum() > 0 and crd.embed_s.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        v_t = crd.embed_t(f_t)
    expected = F.normalize(old_t * 0.5 + v_t * 0.5, dim=1)
    assert torch.allclose(crd.memory_t[index], expected, atol=1e-6)
    assert torch.allclose(crd.memory_t[index].norm(dim=1), torch.ones(4))
    assert float(crd.z[0]) > 0  # normalisation constant fixed on the first batch
    with pytest.raises(ValueError, match="index must be dataset indices in 0..49"):
        crd(f_s, f_t, torch.tensor([0, 1, 2, 50]))


def test_crd_loss_falls_when_student_matches_teacher():
    torch.manual_seed(0)
    n = 64
    teacher_feats = torch.randn(n, 16)
    crd = CRDLoss(16, 16, n, feat_dim=16, num_negatives=32)
    student = nn.Linear(16, 16)
    opt = torch.optim.SGD([*student.parameters(), *crd.parameters()], lr=0.5, momentum=0.9)
    losses = []
    for epoch in range(30):
        for start in range(0, n, 16):
            idx = torch.arange(start, start + 16)
            loss = crd(student(teacher_feats[idx]), teacher_feats[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_indexed_dataset_and_with_indices():
    ds = TensorDataset(torch.arange(10).float(), torch.arange(10) % 3)
    wrapped = IndexedDataset(ds)
    assert len(wrapped) == 10 and wrapped[4] == (ds[4][0], ds[4][1], 4)
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    indexed = with_indices(loader)
    assert indexed.batch_size == 4 and with_indices(indexed) is indexed
    seen = []
    for x, y, i in indexed:
        assert torch.equal(x, i.float())
        seen += i.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_penultimate_features_hook_the_classifier_input():
    model = small_cnn()
    hook = PenultimateFeatures(model)
    assert hook.layer is model[-1] and hook.dim == 128
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert torch.allclose(model[-1](hook.features), out)
    hook.remove()
    with pytest.raises(ValueError, match="no final nn.Linear"):
        final_classifier(nn.Sequential(nn.Conv2d(1, 2, 1)))


def test_exit_objectives_keep_head_gradients_off_the_backbone():
    torch.manual_seed(0)
    backbone = nn.Sequential(small_cnn())
    net = attach_exits(backbone[0], points=["2", "5"], example_input=torch.randn(2, 1, 28, 28))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    outs = exit_outputs(net, x)
    assert len(outs) == 3 and all(o.shape == (4, 10) for o in outs)
    TaskObjective(heads=1.0, final=0.0)(net, x, y).backward()
    assert all(p.grad is None for p in net.backbone_parameters())
    # each head's gradient is that of its own cross-entropy on the features after its segment
    with torch.no_grad():
        f0 = net.segments[0](x)
        f1 = net.segments[1](f0)
    heads = list(net.head_parameters())
    want = torch.autograd.grad(sum(F.cross_entropy(h(f), y) for h, f in zip(net.heads, (f0, f1))), heads)
    for p, g in zip(heads, want, strict=True):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(ValueError, match="heads must be a finite number >= 0"):
        TaskObjective(heads=-1)


def test_context_infers_example_input_and_classes(mnist_small):
    train, val = loaders(mnist_small)
    ctx = Context.create(small_cnn(7), train, val, quiet(epochs=2))
    assert ctx.num_classes == 7 and ctx.example_input.shape == (2, 1, 28, 28)
    assert ctx.trainer.config.epochs == 2 and ctx.progress is False
    # conv 1->16 (3x3, stride 2: 14x14), conv 16->32 (3x3, stride 2: 7x7), linear 128->7
    assert ctx.teacher_profile.macs == 9 * 1 * 16 * 14 * 14 + 9 * 16 * 32 * 7 * 7 + 128 * 7
