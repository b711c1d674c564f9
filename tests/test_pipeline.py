"""compress(): reports, configs, checkpoints, resume, the command line and multi-process training."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp.errors import ConfigError
from ordercomp.pipeline import CompressConfig, compress, fingerprint
from ordercomp.stages import NO_EXIT, Prune, Quantize

from conftest import MNIST_DATA, REPO, count_accuracy, paying_exits, quick



def _loaders(mnist):
    xtr, ytr, xte, yte = mnist
    train = DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(xte[:128], yte[:128]), batch_size=64)
    return train, val


def _model():
    torch.manual_seed(0)
    return ordercomp.models.create("resnet8", num_classes=10, in_channels=1)


def _chosen_point(sweep, baseline, max_loss):
    """EarlyExit's documented rule: of the swept points whose accuracy less their margin is at most
    ``max_loss`` pp below ``baseline``, the cheapest in expected BitOps (the more accurate one on a tie)."""
    feasible = [p for p in sweep if p["accuracy"] - p["margin"] >= baseline - max_loss - 1e-9]
    return min(feasible, key=lambda p: (p["bitops"], -p["accuracy"]))


@pytest.mark.slow
def test_compress_report_and_run_directory(mnist_small, tmp_path):
    train, val = _loaders(mnist_small)
    model = _model()
    before = fingerprint(model)
    exits = ordercomp.stages.EarlyExit(thresholds=(0.0, 0.5, 0.9), max_accuracy_loss=100)
    result = compress(model, train, val, config=quick("PQE"), out=tmp_path / "run", stages={"E": exits})
    assert fingerprint(model) == before, "the input model must be left untouched"
    report = result.report
    assert [s["stage"] for s in report["stages"]] == ["P", "Q", "E"]
    original = report["original"]
    prof = ordercomp.profile(model, torch.zeros(1, 1, 28, 28))
    assert original["bitops"] == prof.bitops and original["macs"] == prof.macs
    p, q, e = report["stages"]
    assert p["macs"] < original["macs"] and p["bitops_cr"] > 1
    assert q["macs"] == p["macs"] and q["bitops_cr"] > 10 * p["bitops_cr"], "4w8a must cut BitOps far more than 2x"
    assert q["cr"] == pytest.approx(original["storage_bits"] / q["storage_bits"])
    # the threshold is the one the documented rule picks from the sweep on the calibration data (no
    # target_loss: the baseline is the sweep's no-exit point, the allowed loss max_accuracy_loss)
    assert report["config"]["target_loss"] is None
    sweep = e["exit_sweep"]
    assert [p["threshold"] for p in sweep] == [*exits.thresholds, NO_EXIT]
    chosen = _chosen_point(sweep, sweep[-1]["accuracy"], exits.max_accuracy_loss)
    assert (e["threshold"], e["calibration_accuracy"]) == (chosen["threshold"], chosen["accuracy"])
    assert e["bitops"] <= e["bitops_static"]
    run = tmp_path / "run"
    # every accuracy in the report is the one counted here from that stage's saved model on the same data
    assert original["accuracy"] == pytest.approx(count_accuracy(model, val), abs=1e-9)
    for k, s in enumerate(report["stages"], 1):
        stage_model = ordercomp.load(run / f"stage{k}_{s['stage']}.pt")
        assert s["accuracy"] == pytest.approx(count_accuracy(stage_model, val), abs=1e-9), s["stage"]
        assert s["accuracy_change"] == pytest.approx(s["accuracy"] - original["accuracy"])
        low, high = s["accuracy_change_interval"]
        assert low <= s["accuracy_change"] <= high
    for name in ("report.json", "report.md", "stages.png", "config.json", "state.json", "model.pt", "exit_sweep_3.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "report.json").read_text())
    assert saved["stages"][-1]["bitops_cr"] == pytest.approx(e["bitops_cr"])
    assert "| 2. Q |" in (run / "report.md").read_text()
    reloaded = ordercomp.load(run / "model.pt", model=_model())
    assert isinstance(reloaded, ordercomp.nn.ExitNet) and reloaded.threshold == result.model.threshold
    x = mnist_small[2][:64]
    result.model.eval()
    reloaded.eval()
    assert all(torch.equal(a, b) for a, b in zip(reloaded(x), result.model(x)))
    assert torch.equal(reloaded.infer(x).logits, result.model.infer(x).logits)
    assert "BitOpsCR" in str(result)


@pytest.mark.slow
def test_every_file_of_a_run_loads_weights_only(mnist_small, tmp_path):
    """No file a run writes needs unpickling; each stage file rebuilds to the model it saved."""
    train, val = _loaders(mnist_small)
    run = tmp_path / "run"
    result = compress(_model(), train, val, config=quick("DPQE"), out=run, stages={"E": paying_exits()})
    files = sorted(run.glob("*.pt"))
    assert [f.name for f in files] == ["model.pt", "stage1_D.pt", "stage2_P.pt", "stage3_Q.pt", "stage4_E.pt"]
    for f in files:
        payload = torch.load(f, weights_only=True)
        assert payload["format"] == "ordercomp-result" and payload["recipe"]["original"]["zoo"] == "resnet8"
    for f in run.glob("*.json"):
        json.loads(f.read_text())
    x = mnist_small[2][:64]
    stage2 = ordercomp.load(run / "stage2_P.pt")  # zoo models need no template
    assert ordercomp.stages.channel_counts(stage2)["features.stem.conv"] == 4
    final = ordercomp.load(run / "model.pt").eval()
    recipe = torch.load(run / "model.pt", weights_only=True)["recipe"]
    assert recipe["exits"]["threshold"] == result.model.threshold == final.threshold
    assert set(recipe["bits"]) and recipe["base"] == recipe["original"]  # resnet8's student: a thinner resnet8
    result.model.eval()
    assert torch.equal(final.infer(x).logits, result.model.infer(x).logits)
    safe = result.save(tmp_path / "model.safetensors")
    assert torch.equal(ordercomp.load(safe).eval().infer(x).logits, result.model.infer(x).logits)


def test_config_round_trip_and_overrides(tmp_path):
    config = CompressConfig(order="qpe", prune=Prune(ratio=0.3), quantize=Quantize(w_bits=2, a_bits=4))
    assert config.order == "QPE"
    for name in ("c.yaml", "c.json"):
        config.save(tmp_path / name)
        loaded = CompressConfig.load(tmp_path / name)
        assert loaded.to_dict() == config.to_dict()
        assert isinstance(loaded.prune, Prune) and loaded.prune.ratio == 0.3
    changed = config.override(["prune.ratio=0.6", "train.epochs=3", "order=DE"])
    assert (changed.prune.ratio, changed.train.epochs, changed.order) == (0.6, 3, "DE")
    shortcut = config.with_shortcuts(epochs=2, max_batches=5)
    assert (shortcut.train.epochs, shortcut.train.max_batches) == (2, 5)
    # compress()'s stages= as the config's sections (what an order search of order="auto" runs with)
    given = config.with_stages({"P": Prune(ratio=0.5), "Q": [Quantize(w_bits=4, a_bits=8), Quantize(w_bits=2)]})
    assert (given.prune.ratio, given.quantize.w_bits, given.quantize.a_bits, given.order) == (0.5, 4, 8, "QPE")
    assert config.prune.ratio == 0.3, "a copy"


def test_the_command_line_s_own_settings_live_beside_the_compression_config(tmp_path):
    """data and teacher_epochs are CommandConfig's: its file is a CompressConfig file with the two
    more keys, --set reaches both; a saved config of version 1 or 2 that holds them still loads
    as a CompressConfig (compress() never read them), one of version 3 is told where they went."""
    from ordercomp.pipeline import CommandConfig, DataConfig

    command = CommandConfig.from_dict({"order": "PQ", "data": {"name": "npz", "batch_size": 32}, "teacher_epochs": 2})
    assert (command.compress.order, command.data, command.teacher_epochs) == ("PQ", DataConfig("npz", batch_size=32), 2)
    changed = command.override(["data.limit=100", "prune.ratio=0.3", "teacher_epochs=4"])
    assert (changed.data.limit, changed.compress.prune.ratio, changed.teacher_epochs) == (100, 0.3, 4)
    for name in ("c.yaml", "c.json"):
        assert CommandConfig.load(command.save(tmp_path / name)).to_dict() == command.to_dict()
    saved = command.to_dict()
    assert saved["version"] == 3 and "data" not in command.compress.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in (1, 2):
            assert CompressConfig.from_dict({**saved, "version": version}).to_dict() == command.compress.to_dict()
    with pytest.raises(ConfigError, match=r"unknown config keys \['data', 'teacher_epochs'\].*command line's settings"):
        CompressConfig.from_dict(saved)
    with pytest.raises(ConfigError, match="teacher_epochs must be an integer >= 0"):
        CommandConfig.from_dict({"teacher_epochs": -1})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CompressConfig(order="DPX"), "unknown: X"),
        (lambda: CompressConfig.from_dict({"prune": {"ratio": 1.5}}), "ratio"),
        (lambda: CompressConfig.from_dict({"prunning": {}}), "unknown config keys ['prunning']"),
        (lambda: CompressConfig.from_dict({"prune": {"rate": 0.5}}), "unknown keys ['rate'] in config section 'prune'"),
        (lambda: CompressConfig().override(["prune.rate=0.5"]), "unknown key 'rate'"),
        (lambda: CompressConfig().override(["prune"]), "section.key=value"),
        (lambda: CompressConfig(target_loss=-1), "target_loss must be a number in [0, 100]"),
        (lambda: CompressConfig(device="tpu"), "device must be"),
        (lambda: CompressConfig.from_dict({"quantize": {"w_bits": 0}}), "w_bits"),
    ],
)
def test_bad_config_is_refused(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_compress_takes_its_settings_from_the_config_and_the_old_keywords_still_work(mnist_small):
    """compress() keeps to 12 parameters; the keywords that once set config fields (and the order
    given where the config now goes) still do for a release, each with a DeprecationWarning that
    says what to write instead, and give the same run as the config."""
    import inspect

    assert len([p for p in inspect.signature(compress).parameters.values() if p.kind != p.VAR_KEYWORD]) == 12
    train, val = _loaders(mnist_small)
    now = compress(_model(), train, val, config=quick("P", max_batches=1))
    with pytest.warns(DeprecationWarning) as caught:
        before = compress(_model(), train, val, "P", epochs=1, max_batches=1, progress=False)
    assert sorted(str(w.message) for w in caught) == [
        "compress(epochs=...) is deprecated and goes in the next release: use config={'train': {'epochs': ...}}",
        "compress(max_batches=...) is deprecated and goes in the next release: use "
        "config={'train': {'max_batches': ...}}",
        "compress(order=...) is deprecated and goes in the next release: use config={'order': ...}",
        "compress(progress=...) is deprecated and goes in the next release: use "
        "config={'train': {'progress': ...}}"]
    assert all(w.filename == __file__ for w in caught), "the warning points at the caller"
    assert before.report["config"] == now.report["config"]
    for (key, a), b in zip(now.model.state_dict().items(), before.model.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'; its settings are the config's"):
        compress(_model(), train, val, epoch=1)


def test_bad_input_fails_before_training(mnist_small):
    train, val = _loaders(mnist_small)
    with pytest.raises(ValueError, match="unknown: Z"):
        compress(_model(), train, val, config=quick("PZ"))
    with pytest.raises(ValueError, match="resume=True needs out="):
        compress(_model(), train, val, config=quick("P"), resume=True)


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_pipeline import _loaders, _model
    from conftest import load_mnist24k, quick
    from ordercomp.pipeline import compress

    calls = []
    def killer(model, loader):
        calls.append(1)
        if len(calls) == 3:  # original, stage 1, then die while recording stage 2
            os.kill(os.getpid(), signal.SIGKILL)
        return 0.0
    killer.__name__ = "probe"
    compress(_model(), *_loaders(load_mnist24k(1024, 512)), config=quick("PQE"), out={out!r}, metric=killer)
    """
)


@pytest.mark.slow
def test_resume_after_a_killed_run_matches_an_uninterrupted_one(mnist_small, tmp_path):
    train, val = _loaders(mnist_small)
    probe = lambda model, loader: 0.0  # noqa: E731
    probe.__name__ = "probe"
    full = compress(_model(), train, val, config=quick("PQE"), out=tmp_path / "full", metric=probe)

    killed = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(REPO / "tests"), out=str(killed))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    state = json.loads((killed / "state.json").read_text())
    assert state["completed"] == 1 and not (killed / "model.pt").exists()
    assert not list(killed.glob(".*.tmp")), "no half-written files may remain"

    resumed = compress(_model(), train, val, config=quick("PQE"), out=killed, resume=True, metric=probe)
    assert [s["stage"] for s in resumed.report["stages"]] == ["P", "Q", "E"]
    for a, b in zip(full.report["stages"], resumed.report["stages"]):
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["bitops"] == pytest.approx(b["bitops"])
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=name)
        else:  # the ExitNet's own settings: threshold, criterion, heads
            assert a == b, name


def test_resume_refuses_a_different_config_or_model(mnist_small, tmp_path):
    train, val = _loaders(mnist_small)
    compress(_model(), train, val, config=quick("P"), out=tmp_path / "run")
    with pytest.raises(ValueError, match=r"config differs.*prune.ratio: saved 0.5, now 0.3"):
        compress(_model(), train, val, config=quick("P", CompressConfig(prune=Prune(ratio=0.3))), out=tmp_path / "run",
                 resume=True)
    other = _model()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="different model"):
        compress(other, train, val, config=quick("P"), out=tmp_path / "run", resume=True)


class _Planted:
    """Unpickling this creates the file ``path``: a stand-in for malicious code in a model file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _write_npz(path: Path, n_train=512, n_test=256):
    with np.load(MNIST_DATA) as npz:
        np.savez(path, x_train=npz["x_train"][:n_train], y_train=npz["y_train"][:n_train],
                 x_test=npz["x_test"][:n_test], y_test=npz["y_test"][:n_test])
    return path


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run([sys.executable, "-m", "ordercomp", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=kw.get("cwd", REPO), timeout=600)


@pytest.mark.slow
def test_cli_compress_evaluate_profile(tmp_path):
    data = _write_npz(tmp_path / "digits.npz")
    out = tmp_path / "run"
    proc = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", data, "--order", "QE",
                "--epochs", "1", "--max-batches", "2", "--teacher-epochs", "1", "--batch-size", "64",
                "--set", "quantize.w_bits=2", "--calibration-fraction", "0.25", "--out", out, "--quiet",
                "--set", "early_exit.thresholds=[0.0]", "--set", "early_exit.max_accuracy_loss=100")  # exits kept
    assert proc.returncode == 0, proc.stderr
    assert "BitOpsCR" in proc.stdout and str(out / "report.md") in proc.stdout
    sizes = json.loads((out / "report.json").read_text())["data"]
    assert sizes["validation_inputs"] == 256 and abs(sizes["calibration_inputs"] - 128) <= 5
    assert f"choices made on {sizes['calibration_inputs']} calibration inputs" in proc.stdout
    assert (out / "teacher.pt").is_file() and (out / "model.pt").is_file()
    saved = CompressConfig.load(out / "config.json")
    assert saved.quantize.w_bits == 2 and saved.order == "QE" and saved.calibration_fraction == 0.25

    proc = _cli("evaluate", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert f"accuracy: {report['stages'][-1]['accuracy']:.2f} %" in proc.stdout
    assert "early exit at threshold" in proc.stdout
    assert "trusted code" in _cli("compress", "--help").stdout

    # A planted model.pt that would run code when unpickled is refused, and the code does not run.
    marker = tmp_path / "pwned"
    torch.save(_Planted(str(marker)), out / "model.pt")
    proc = _cli("evaluate", out, "--quiet")
    assert proc.returncode == 2 and "not an ordercomp result" in proc.stderr
    assert not marker.exists()
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):  # the deploy extra
        # export and bench read the run's models as result files too: a planted one runs nothing
        torch.save(_Planted(str(marker)), out / "stage1_Q.pt")
        for command in (["export", out], ["export", out, "--stage", "1"], ["bench", out, "--rounds", "1"]):
            proc = _cli(*command)
            assert proc.returncode == 2 and "never unpickles" in proc.stderr, (command, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert not marker.exists(), command

    proc = _cli("profile", "--model", "resnet34")
    assert proc.returncode == 0, proc.stderr
    assert "MACs 1,159,402,496  params 21,282,122" in proc.stdout

    proc = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", tmp_path / "missing.npz",
                "--out", tmp_path / "x")
    assert proc.returncode == 2 and "missing.npz" in proc.stderr
    proc = _cli("compress", "--model", "resnet8", "--order", "DPX", "--data", "npz", "--data-root", data)
    assert proc.returncode == 2 and "unknown: X" in proc.stderr


@pytest.mark.slow
def test_cli_trains_the_same_teacher_in_every_process(tmp_path):
    """Each process starts from its own random seed: the teacher's initial weights must be seeded too."""
    data = _write_npz(tmp_path / "digits.npz")
    for name in ("a", "b"):
        proc = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", data, "--order", "P",
                    "--epochs", "1", "--max-batches", "1", "--batch-size", "64", "--out", tmp_path / name, "--quiet")
        assert proc.returncode == 0, proc.stderr
    a, b = (torch.load(tmp_path / n / "teacher.pt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


class UserNet(nn.Module):
    """A model of the user's own, outside the zoo: its results rebuild on an instance of it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1))


@pytest.mark.slow
def test_cli_result_of_a_user_model_rebuilds_on_its_architecture(tmp_path):
    data = _write_npz(tmp_path / "digits.npz")
    torch.manual_seed(0)
    torch.save(UserNet(), tmp_path / "mine.pt")
    out = tmp_path / "run"
    proc = _cli("compress", "--model-file", tmp_path / "mine.pt", "--data", "npz", "--data-root", data,
                "--order", "PQ", "--epochs", "1", "--max-batches", "2", "--batch-size", "64", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    recipe = torch.load(out / "model.pt", weights_only=True)["recipe"]
    assert recipe["base"] == {"class": "test_pipeline.UserNet"} and recipe["layers"]["body.0"]["out_channels"] == 4
    proc = _cli("evaluate", out, "--quiet")
    assert proc.returncode == 2 and "give --model-file" in proc.stderr
    proc = _cli("evaluate", out, "--model-file", tmp_path / "mine.pt", "--quiet")
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "report.json").read_text())["stages"][-1]
    assert f"accuracy: {final['accuracy']:.2f} %" in proc.stdout


class ScoredNet(UserNet):
    """A user model that returns its logits under a key of its own."""

    def forward(self, x):
        return {"scores": super().forward(x)}


@pytest.mark.slow
def test_cli_compresses_a_user_model_with_exits_found_and_logits_under_a_key(tmp_path):
    data = _write_npz(tmp_path / "digits.npz")
    torch.manual_seed(0)
    torch.save(ScoredNet(), tmp_path / "mine.pt")
    out = tmp_path / "run"
    args = ["compress", "--model-file", tmp_path / "mine.pt", "--data", "npz", "--data-root", data, "--order", "PE",
            "--epochs", "1", "--max-batches", "2", "--batch-size", "64", "--out", out, "--quiet"]
    proc = _cli(*args)
    assert proc.returncode == 2 and "cannot tell the logits in the model's output, a dict with keys ['scores']" in proc.stderr
    proc = _cli(*args, "--set", "output=scores")
    assert proc.returncode == 0, proc.stderr
    assert "exit points (found automatically): body.2" in proc.stdout
    assert "exit points (found automatically): body.2" in (out / "report.md").read_text()
    proc = _cli("evaluate", out, "--model-file", tmp_path / "mine.pt", "--quiet")
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "report.json").read_text())["stages"][-1]
    assert f"accuracy: {final['accuracy']:.2f} %" in proc.stdout


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path, mnist_small):
    """torchrun with 2 CPU processes (gloo): every stage trains with DDP, only rank 0 writes."""
    data = _write_npz(tmp_path / "digits.npz")
    teacher = tmp_path / "teacher.pt"
    torch.save(_model(), teacher)  # the user's own model, saved whole
    args = ["compress", "--model-file", teacher, "--data", "npz", "--data-root", data, "--order", "PQ",
            "--epochs", "1", "--max-batches", "3", "--batch-size", "64", "--set", "data.augment=false", "--quiet"]
    single = _cli(*args, "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "ordercomp", *map(str, args), "--out", str(tmp_path / "multi")],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count("BitOpsCR") == 1, "only rank 0 prints the table"
    one = json.loads((tmp_path / "single" / "report.json").read_text())
    two = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert [s["stage"] for s in one["stages"]] == [s["stage"] for s in two["stages"]] == ["P", "Q"]
    for a, b in zip(one["stages"], two["stages"]):
        assert (a["macs"], a["params"], a["bitops_static"]) == (b["macs"], b["params"], b["bitops_static"])
    # The two runs see the data in different orders and shards, so their weights differ; what must hold
    # exactly: rank 0 scores every model on the whole validation split, as the single process does.
    origin = json.loads((tmp_path / "single" / "state.json").read_text())["data"]["origin"]
    val = ordercomp.data.load(**origin["settings"]).val_loader  # the data the run recorded it was given
    assert one["original"]["accuracy"] == two["original"]["accuracy"] == pytest.approx(
        count_accuracy(torch.load(teacher, weights_only=False), val), abs=1e-9)
    for run, report in (("single", one), ("multi", two)):
        for k, s in enumerate(report["stages"], 1):
            stage_model = ordercomp.load(tmp_path / run / f"stage{k}_{s['stage']}.pt")
            assert s["accuracy"] == pytest.approx(count_accuracy(stage_model, val), abs=1e-9), (run, s["stage"])
    assert not list((tmp_path / "multi").glob(".*.tmp"))


@pytest.mark.slow
def test_a_per_layer_bit_map_is_set_from_the_command_line_and_a_config_file(tmp_path):
    """``quantize.policy`` as a mapping of layer names to [w_bits, a_bits] (YAML and JSON give lists)."""
    data = _write_npz(tmp_path / "digits.npz")
    common = ("compress", "--model", "resnet8", "--data", "npz", "--data-root", data, "--order", "Q", "--epochs", "1",
              "--max-batches", "2", "--teacher-epochs", "1", "--batch-size", "64", "--quiet")
    proc = _cli(*common, "--set", "quantize.policy={features.layer2.0.conv1: [2, 4], classifier.fc: null}",
                "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    bits = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][0]["info"]["bits"]
    assert bits["features.layer2.0.conv1"] == [2, 4] and bits["classifier.fc"] == [32, 32]  # null: stays float
    assert CompressConfig.load(tmp_path / "run" / "config.json").quantize.policy["features.layer2.0.conv1"] == [2, 4]

    config = tmp_path / "bits.yaml"
    config.write_text("quantize:\n  policy:\n    features.layer2.0.conv1: [3, 6]\n")
    proc = _cli(*common, "--config", config, "--out", tmp_path / "run2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run2" / "report.json").read_text())["stages"][0]["info"]["bits"][
        "features.layer2.0.conv1"] == [3, 6]

    bad = _cli(*common, "--set", "quantize.policy={features.layer2.0.conv1: [9, 4]}", "--out", tmp_path / "run3")
    assert bad.returncode != 0
    assert "quantize.policy['features.layer2.0.conv1'] w_bits must be an integer in 1..8 or 32, got 9" in bad.stderr
