"""The compression recipe: calibration data that no training and no report sees, phases that end on
the calibration signal, batch-norm re-estimation, distillation switches, progressive bits,
exit heads dropped when they do not pay, and paired intervals."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ordercomp
from ordercomp import data, stats
from ordercomp.errors import ConfigError, DataError
from ordercomp.losses import DistillObjective, TaskObjective, kd_loss
from ordercomp.nn import ExitNet, QuantLayer
from ordercomp.pipeline import CompressConfig, compress
from ordercomp.stages import Context, EarlyExit, Prune, Quantize, SweepPoint, choose_threshold, threshold_choice
from ordercomp.train import Trainer, TrainConfig, planned_epochs

from conftest import MNIST_DATA, config_of, paying_exits, quick


class _Logged(Dataset):
    """A dataset that records every index read while ``log`` is on."""

    def __init__(self, x, y):
        self.x, self.y, self.labels, self.read, self.log = x, y, y, [], True

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.log:
            self.read.append(int(i))
        return self.x[i], self.y[i]


def _resnet8():
    torch.manual_seed(0)
    return ordercomp.models.create("resnet8", num_classes=10, in_channels=1)


# --- calibration data -------------------------------------------------------------------------------


def test_split_loader_is_disjoint_stratified_and_keeps_the_loader_settings(mnist_small):
    xtr, ytr, _, _ = mnist_small
    ds = _Logged(xtr[:500], ytr[:500])
    loader = DataLoader(ds, batch_size=32, shuffle=True, drop_last=True)
    train, calib = data.split_loader(loader, 0.2, seed=3)
    kept, held = set(train.dataset.indices), set(calib.dataset.indices)
    assert not kept & held and kept | held == set(range(500))
    for c in range(10):  # each class gives 20 %
        n = int((ytr[:500] == c).sum())
        assert sum(int(ytr[i]) == c for i in held) == round(0.2 * n)
    assert train.batch_size == calib.batch_size == 32 and train.drop_last and not calib.drop_last
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(calib.sampler, torch.utils.data.SequentialSampler)
    again = data.split_loader(loader, 0.2, seed=3)[1]
    assert again.dataset.indices == calib.dataset.indices, "the split is a function of the seed"
    with pytest.raises(ConfigError, match="calibration_loader="):
        data.split_loader([(xtr[:4], ytr[:4])], 0.1)
    with pytest.raises(ConfigError, match="calibration_fraction"):
        data.split_loader(loader, 1.0)


def test_load_holds_back_unaugmented_calibration_digits(tmp_path):
    bundle = data.load("npz", MNIST_DATA, batch_size=64, calibration_fraction=0.1, seed=0, augment=True)
    train_idx = set(bundle.train_loader.dataset.indices)
    calib_idx = set(bundle.calibration_loader.dataset.indices)
    assert not train_idx & calib_idx
    assert len(calib_idx) == pytest.approx(0.1 * (len(train_idx) + len(calib_idx)), abs=10)
    first = [x for x, _ in bundle.calibration_loader]
    second = [x for x, _ in bundle.calibration_loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "calibration digits are not augmented"
    assert data.load("npz", MNIST_DATA).calibration_loader is None
    with pytest.raises(ConfigError, match="calibration_fraction"):
        data.load("npz", MNIST_DATA, calibration_fraction=1.5)


def test_compress_never_trains_or_reports_on_calibration_data(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    ds = _Logged(xtr[:320].clone(), ytr[:320])
    train = DataLoader(ds, batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xte[:96], yte[:96]), batch_size=32)
    calib_idx = data.split_loader(train, 0.25, seed=0)[1].dataset.indices
    # poisoned: one calibration digit in a training batch would make the loss NaN and stop the run
    # (finite inputs, so that the probe before training lets them through: they overflow in the model)
    ds.x[calib_idx] = 3e38
    config = CompressConfig.from_dict({"calibration_fraction": 0.25, "train": {"patience": 1}})
    result = compress(_resnet8(), train, val, config=config_of("PQ", config, epochs=2, max_batches=3, progress=False))
    report = result.report
    assert report["data"] == {"validation_inputs": 96, "calibration_inputs": len(calib_idx)}
    assert set(calib_idx) <= set(ds.read), "the calibration split was evaluated"
    assert set(ds.read) - set(calib_idx), "and the rest trained on"
    for s in report["stages"]:
        assert s["calibration_accuracy"] is not None
        low, high = s["accuracy_change_interval"]
        assert low <= s["accuracy_change"] <= high


@pytest.mark.slow
def test_threshold_is_chosen_on_calibration_data_only(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    calib = DataLoader(TensorDataset(xtr[:128], ytr[:128]), batch_size=64)
    garbage = DataLoader(TensorDataset(xte[:128], torch.randint(0, 10, (128,))), batch_size=64)
    model = _resnet8()
    Trainer(TrainConfig(epochs=1, max_batches=8, progress=False)).fit(model, DataLoader(
        TensorDataset(xtr[128:], ytr[128:]), batch_size=64, shuffle=True))
    picks = []
    for val in (DataLoader(TensorDataset(xte[:128], yte[:128]), batch_size=64), garbage):
        context = Context.create(model, calib, val, TrainConfig(epochs=1, max_batches=4, progress=False),
                                 calibration_loader=calib)
        torch.manual_seed(0)
        net = EarlyExit(max_accuracy_loss=5).prepare(model, context).model
        choice = choose_threshold(net, context, EarlyExit(max_accuracy_loss=5))
        picks.append((choice["threshold"], [p["accuracy"] for p in choice["sweep"]]))
    assert picks[0] == picks[1], "the validation labels must not move the choice"


def test_a_threshold_must_clear_the_bound_by_its_paired_standard_error():
    from ordercomp.stages.early_exit import no_exit_margins as _margins

    base = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    early = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    points = [SweepPoint(0.5, 75.0, 1.0, [], early), SweepPoint(2.0, 87.5, 2.0, [], base)]
    d = np.array([0, -1, 0, 0, 1, -1, 0, 0], dtype=float)
    z = 1.6448536269514722
    assert _margins(points, 0.95) == pytest.approx([100 * z * d.std(ddof=1) / math.sqrt(8), 0.0])
    assert _margins(points, 0.5) == [0.0, 0.0]
    one = [SweepPoint(0.5, 0.0, 1.0, [], early[1:2]), SweepPoint(2.0, 100.0, 2.0, [], base[1:2])]
    assert _margins(one, 0.95) == [math.inf, 0.0], "one input says nothing about a change, and all about no change"
    with pytest.raises(ConfigError, match="confidence"):
        EarlyExit(confidence=0.3)


def test_a_threshold_bounded_against_the_original_pairs_with_the_originals_answers():
    """``baseline="original"`` (what the accuracy budget gives E): each threshold's loss and margin are
    paired with the original's per-input results, not with the network without exits."""
    original = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)   # 80 %
    no_exit = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)    # 90 %: better than the original
    early = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)      # 80 %, one answer changed each way
    points = [SweepPoint(0.5, 80.0, 1.0, [1.0], early), SweepPoint(2.0, 90.0, 2.0, [0.0], no_exit)]
    z = 1.6448536269514722
    d = np.array([0, 0, 0, 0, 0, 0, 0, 1, -1, 0], dtype=float)                   # original - early: loss 0
    margin = 100 * z * d.std(ddof=1) / math.sqrt(10)
    assert margin == pytest.approx(24.520, abs=1e-3)  # sd sqrt(2 / 9)
    settings = EarlyExit(baseline="original", confidence=0.95, thresholds=(0.5,))
    chosen = threshold_choice(points, dataclasses.replace(settings, max_accuracy_loss=margin + 0.01), original)
    assert chosen["threshold"] == 0.5 and chosen["baseline"] == pytest.approx(80.0) and chosen["pays_off"]
    assert [p["margin"] for p in chosen["sweep"]] == pytest.approx(
        [margin, 100 * z * np.array([0] * 8 + [-1, 0]).std(ddof=1) / math.sqrt(10)])
    assert threshold_choice(points, dataclasses.replace(settings, max_accuracy_loss=margin - 0.01),
                            original)["threshold"] == 2.0
    with pytest.raises(ConfigError, match="needs the original's per-input results"):
        threshold_choice(points, settings)
    # Against the network without exits (baseline None) the same threshold loses 10 pp, one input
    # changed, margin 16.45 (sd sqrt(0.1)): it fits a bound of 26.46 pp, not one of 26.44.
    alone = 100 * z * np.array([0] * 7 + [-1, 0, 0]).std(ddof=1) / math.sqrt(10)
    assert threshold_choice(points, EarlyExit(max_accuracy_loss=10 + alone + 0.01))["threshold"] == 0.5
    assert threshold_choice(points, EarlyExit(max_accuracy_loss=10 + alone - 0.01))["threshold"] == 2.0
    with pytest.raises(ConfigError, match="baseline must be None, 'original' or an accuracy"):
        EarlyExit(baseline="teacher")


def test_the_originals_calibration_answers_are_measured_once_when_not_given(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    calib = DataLoader(TensorDataset(xtr[:96], ytr[:96]), batch_size=32)
    model = _resnet8()
    context = Context.create(model, calib, DataLoader(TensorDataset(xte[:64], yte[:64]), batch_size=32),
                             TrainConfig(progress=False), calibration_loader=calib)
    expected = Trainer(TrainConfig(progress=False)).correct(context.teacher, calib)[-1]
    assert torch.equal(context.teacher_correct(), expected) and context.reference_correct is context.teacher_correct()
    given = torch.zeros(96, dtype=torch.bool)
    assert dataclasses.replace(context, reference_correct=given).teacher_correct() is given

# --- training phases end on the calibration signal --------------------------------------------------


def test_a_fit_drops_the_rate_then_stops_when_the_monitor_stops_improving():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=16)
    # two epochs without improvement: back to the best weights at a tenth of the rate; two more: stop
    for scores, stop, best in (([50.0, 60.0, 55.0, 54.0, 58.0, 57.0, 99.0], 6, 2),
                               ([50.0, 60.0, 60.0, 10.0, 10.0, 10.0, 99.0], 6, 3)):  # a tie keeps the later weights
        values, snapshots = iter(scores), []

        def monitor(m):
            snapshots.append(m[1].weight.detach().clone())
            return next(values)

        trainer = Trainer(TrainConfig(epochs=7, patience=2, lr=0.1, schedule="none", progress=False))
        fit = trainer.fit(model, loader, monitor=monitor)
        assert fit.epochs == stop and fit.monitored == scores[:stop] and fit.best_epoch == best
        assert fit.lr_dropped_after == 4
        assert fit.lrs[:16] == pytest.approx([0.1] * 16) and fit.lrs[16:] == pytest.approx([0.01] * 8)
        assert torch.equal(model[1].weight, snapshots[best - 1])
        assert not torch.equal(snapshots[best - 1], snapshots[-1])
    full = Trainer(TrainConfig(epochs=3, patience=0, progress=False)).fit(model, loader, monitor=lambda m: 1.0)
    assert full.epochs == 3, "patience 0 runs every epoch"


def test_an_epoch_within_the_monitor_standard_error_of_the_best_counts_as_no_worse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=16)
    scores = [40.0, 46.0, 43.5, 44.0, 45.0, 41.0, 42.0, 44.0]  # the noise of a few hundred inputs: SE 3 pp
    for tolerance, stop, best, dropped in ((1.0, 8, 8, 7), (0.0, 6, 2, 4), (2.0, 8, 8, None)):
        values, snapshots = iter(scores), []

        def monitor(m):
            snapshots.append(m[1].weight.detach().clone())
            return next(values), 3.0

        config = TrainConfig(epochs=8, patience=2, lr=0.1, schedule="none", progress=False, tolerance=tolerance)
        fit = Trainer(config).fit(model, loader, monitor=monitor)
        # tolerance 1: 41 and 42 are more than 3 below 46 (patience runs out after epoch 7, the rate drops, and
        # 44 at epoch 8 is within 3 again: kept); tolerance 0: today's rule, 46 is never beaten; 2: nothing is worse
        assert (fit.epochs, fit.best_epoch, fit.lr_dropped_after) == (stop, best, dropped), tolerance
        assert torch.equal(model[1].weight, snapshots[best - 1])
    with pytest.raises(ConfigError, match="tolerance"):
        TrainConfig(tolerance=-1)


def test_the_report_says_how_many_epochs_each_phase_ran(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    train = DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xte[:64], yte[:64]), batch_size=32)
    config = CompressConfig.from_dict({"train": {"patience": 1}})
    result = compress(_resnet8(), train, val, config=config_of("DP", config, epochs=4, max_batches=2, progress=False))
    d, p = result.report["stages"]
    assert set(d["epochs"]) == {"train", "finetune"} and set(p["epochs"]) == {"finetune"}
    for s in (d, p):
        for phase, n in s["epochs"].items():
            assert 1 <= n <= 4
            assert len(s["info"][f"{phase}_calibration"]) == n == len(s["info"][f"{phase}_loss"])
    assert "epochs" in str(result).splitlines()[0]


# --- recipe components ------------------------------------------------------------------------------


def test_bn_re_estimation_replaces_the_running_statistics_by_the_data_average():
    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.used(x)

    model = Net()
    used, unused = model.used, model.unused
    for bn in (used, unused):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(7.0)
    batches = [torch.randn(8, 2, 3, 3) * 2 + 1 for _ in range(3)]
    loader = [(b, torch.zeros(8, dtype=torch.long)) for b in batches]
    model.train(False)
    n = Trainer(TrainConfig(progress=False)).recalibrate_bn(model, loader)
    assert n == 3
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(used.running_mean, means, atol=1e-6)
    assert torch.allclose(used.running_var, variances, atol=1e-5)
    assert torch.equal(unused.running_mean, torch.full((2,), 5.0)), "a layer that does not run keeps its statistics"
    assert used.momentum == 0.1 and not used.training, "momentum and mode are restored"


def test_prune_and_quantize_re_estimate_batch_norm_by_default(mnist_small, monkeypatch):
    xtr, ytr, xte, yte = mnist_small
    train = DataLoader(TensorDataset(xtr[:128], ytr[:128]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xte[:64], yte[:64]), batch_size=32)
    calls = []
    original = Trainer.recalibrate_bn
    monkeypatch.setattr(Trainer, "recalibrate_bn", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    compress(_resnet8(), train, val, config=quick("PQ"))
    assert len(calls) == 4, "after the transform and after training, for P and for Q"
    calls.clear()
    compress(_resnet8(), train, val, config=quick("PQ"), stages={"P": Prune(recalibrate_bn=False),
                                                         "Q": Quantize(recalibrate_bn=False)})
    assert calls == []


def test_fine_tuning_learns_from_the_labels_by_default_and_from_the_original_with_kd_alpha(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    loader = DataLoader(TensorDataset(xte[:32], yte[:32]), batch_size=32)
    context = Context.create(_resnet8(), loader, loader)
    assert Prune().objective(context) is None, "the default: the task loss"
    objective = Prune(kd_alpha=0.9).objective(context)
    assert isinstance(objective, DistillObjective) and objective.alpha == 0.9 and objective.gamma == pytest.approx(0.1)
    assert objective.teacher is context.teacher


def test_exit_heads_learn_from_the_final_classifier_with_head_kd(mnist_small):
    xtr, ytr, _, _ = mnist_small
    x, y = xtr[:16], ytr[:16]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    context = Context.create(_resnet8(), loader, loader)
    net = EarlyExit().prepare(_resnet8(), context).model
    net.eval()
    with torch.no_grad():
        outs = net(x)
        plain = TaskObjective(heads=1, final=0)(net, x, y)
        mixed = TaskObjective(heads=1, final=0, head_kd=0.25, T=4)(net, x, y)
    ce = sum(nn.functional.cross_entropy(o, y) for o in outs[:-1])
    kd = sum(kd_loss(o, outs[-1], 4.0) for o in outs[:-1])
    assert torch.allclose(plain, ce) and torch.allclose(mixed, 0.75 * ce + 0.25 * kd, atol=1e-5)
    phase = EarlyExit(head_kd=0.25).prepare(_resnet8(), context).phases[0]
    assert phase.objective.head_kd == 0.25 and phase.monitor == "heads"
    with pytest.raises(ConfigError, match="head_kd"):
        EarlyExit(head_kd=2)


def test_activation_clips_start_at_the_largest_input_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(16, 1, 8, 8) * 3
    with torch.no_grad():
        hidden = model[1](model[0](x))
        last_in = model[4](model[3](model[2](hidden)))
    quantized, _ = ordercomp.nn.quantize_model(model, 4, 8, "all", example_input=x, alpha="calibrated", inplace=False)
    first, middle, last = (quantized[i] for i in (0, 2, 5))
    assert first.signed_input and float(first.alpha) == pytest.approx(float(x.abs().max()))
    assert float(middle.alpha) == pytest.approx(float(hidden.max())) and float(hidden.max()) > 1
    assert float(last.alpha) == pytest.approx(float(last_in.max()))
    fixed, _ = ordercomp.nn.quantize_model(model, 4, 8, "all", example_input=x, inplace=False)
    assert float(fixed[2].alpha) == 1.0, "DoReFa's fixed clip"
    with pytest.raises(ConfigError, match="example_input"):
        ordercomp.nn.quantize_model(model, 4, 8, alpha="calibrated", inplace=False)
    with pytest.raises(ConfigError, match="clip must be one of"):
        Quantize(clip="percentile")


def test_progressive_quantization_lowers_the_weight_bits_phase_by_phase(mnist_small):
    xtr, ytr, _, _ = mnist_small
    loader = DataLoader(TensorDataset(xtr[:32], ytr[:32]), batch_size=32)
    context = Context.create(_resnet8(), loader, loader)
    assert Quantize(w_bits=2, progressive=True).bit_steps() == [8, 4, 2]
    assert Quantize(w_bits=4).bit_steps() == [4]
    prepared = Quantize(w_bits=2, progressive=True).prepare(_resnet8(), context)
    assert [p.name for p in prepared.phases] == ["finetune_w8", "finetune_w4", "finetune"]
    layers = [m for m in prepared.model.modules() if isinstance(m, QuantLayer)]
    for phase, bits in zip(prepared.phases, (8, 4, 2)):
        phase.setup(prepared.model)
        assert sorted({m.w_bits for m in layers}) == sorted({8, bits}), "first and last layers stay at 8 bits"


def test_e_keeps_no_heads_when_no_exit_pays_off(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    train = DataLoader(TensorDataset(xtr[:128], ytr[:128]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xte[:64], yte[:64]), batch_size=32)
    # a threshold of 1.0 (maxprob) lets no input of barely trained heads leave: the heads only cost
    result = compress(_resnet8(), train, val, config=quick("E"), stages={"E": EarlyExit(thresholds=(1.0,))})
    assert not isinstance(result.model, ExitNet)
    stage = result.report["stages"][0]
    assert stage["heads_dropped"] and "threshold" not in stage
    assert stage["bitops"] == result.report["original"]["bitops"]
    assert "no exit paid off" in str(result)
    kept = compress(_resnet8(), train, val, config=quick("E"), stages={"E": paying_exits()})
    assert isinstance(kept.model, ExitNet) and not kept.report["stages"][0].get("heads_dropped")


# --- paired intervals -------------------------------------------------------------------------------


def test_paired_change_matches_a_hand_computation():
    a = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    d = np.array([0, -1, 0, 0, 1, 0, -1, 0], dtype=float)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(8)
    change, low, high = stats.paired_change(a, b)
    assert change == pytest.approx(100 * d.mean())
    assert (low, high) == pytest.approx((100 * (d.mean() - half), 100 * (d.mean() + half)))
    assert stats.paired_change(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(DataError, match="same inputs"):
        stats.paired_change(a, b[:4])
    for v in (a, torch.zeros(0, dtype=torch.bool), torch.ones(37, dtype=torch.bool)):
        assert torch.equal(stats.unpack_correct(stats.pack_correct(v)), v)


def test_a_compression_run_plans_every_phase_for_at_least_min_steps():
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=16)  # 4 steps
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    for min_steps, max_batches, epochs in ((0, None, 3), (10, None, 3), (30, None, 8), (30, 2, 3)):
        config = TrainConfig(epochs=3, min_steps=min_steps, max_batches=max_batches, progress=False)
        assert planned_epochs(config, min(4, max_batches or 4)) == epochs
        fit = Trainer(config).fit(model, loader)
        assert fit.epochs == epochs and len(fit.lrs) == epochs * min(4, max_batches or 4)
        assert fit.lrs[-1] < 0.2 * fit.lrs[0], "the cosine schedule spans the stretched fit"
    assert TrainConfig().min_steps == 0, "the trainer alone does what it is told"
    assert CompressConfig().train.min_steps == 400 == CompressConfig.from_dict({"train": {"epochs": 2}}).train.min_steps
    with pytest.raises(ConfigError, match="min_steps"):
        TrainConfig(min_steps=-1)
