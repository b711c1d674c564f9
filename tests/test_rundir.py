"""Run directories: bit-exact resume after a kill at any point, one run per directory, nothing of a
finished stage lost on a failure, data and settings fingerprints, and evaluation on the run's data."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp import checkpoint, results
from ordercomp.errors import ConfigError, DataError, RunDirError
from ordercomp.pipeline import claim, compress
from ordercomp.pipeline.rundir import LOCK_FILE

from conftest import MNIST_DATA, REPO, config_of, quick

# Runs the command line and SIGKILLs itself: after the n-th saved stage ("stage n"), at the n-th
# optimizer step ("step n"), or just before renaming the finished temporary file of NAME into
# place ("write NAME"), which leaves that temporary file behind.
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from ordercomp.pipeline import rundir
    from ordercomp.cli import main

    mode, arg = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "stage":
        save = rundir.RunDir.save_stage
        def save_stage(self, completed, *a, **k):
            save(self, completed, *a, **k)
            if completed == int(arg):
                die()
        rundir.RunDir.save_stage = save_stage
    elif mode == "step":
        step, count = torch.optim.SGD.step, [0]
        def counted(self, *a, **k):
            count[0] += 1
            if count[0] == int(arg):
                die()
            return step(self, *a, **k)
        torch.optim.SGD.step = counted
    elif mode == "write":
        replace = os.replace
        def dying_replace(src, dst, *a, **k):
            if os.path.basename(dst) == arg:
                die()
            return replace(src, dst, *a, **k)
        os.replace = dying_replace
    if os.environ.get("ORDERCOMP_KEEP_STREAMS"):  # loaders not restarted per stage: how runs used to resume
        import ordercomp.data
        ordercomp.data.reseed = lambda loader, seed: None
    sys.exit(main(sys.argv[3:]))
""")

# DPQE on real digits, shuffled and augmented (random crops), every stage kept (exits too). Optimizer
# steps: the teacher 1-4, D 5-12, P 13-16, Q 17-20, E 21-24.
_COMPRESS = ["compress", "--model", "resnet8", "--data", "npz", "--data-root", MNIST_DATA, "--order", "DPQE",
             "--epochs", "1", "--max-batches", "4", "--teacher-epochs", "1", "--batch-size", "64", "--quiet",
             "--set", "early_exit.thresholds=[0.0]", "--set", "early_exit.max_accuracy_loss=100"]
TIMING = {"seconds"}


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")


def _cli(*args, kill=("none", "0")):
    """The command line in a process of its own; ``kill``: where it SIGKILLs itself (see _KILLER)."""
    return subprocess.run([sys.executable, "-c", _KILLER, *kill, *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=600)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def compare_runs(a: Path, b: Path, names=None):
    """``(entries compared, JSON files compared, differences)`` between two run directories: the
    file lists, every saved tensor and setting of every model file (``names``: only these files),
    and every JSON file except timing fields."""
    files = [sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) for d in (a, b)]
    if names is None and files[0] != files[1]:
        return 0, 0, [f"files: {sorted(set(files[0]) ^ set(files[1]))}"]
    out, compared, documents = [], 0, 0
    for name in names or files[0]:
        if name.endswith(".pt"):
            (ra, sa), (rb, sb) = results.read(a / name), results.read(b / name)
            out += [f"{name}: recipe"] if ra != rb else []
            for key in sa.keys() | sb.keys():
                compared += 1
                x, y = sa.get(key), sb.get(key)
                same = torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
                out += [] if same else [f"{name}: {key}"]
        elif name.endswith(".json"):
            documents += 1
            x, y = (_untimed(json.loads((d / name).read_text())) for d in (a, b))
            out += [] if x == y else [f"{name} differs"]
    return compared, documents, out


def _differences(a: Path, b: Path, names=None):
    compared, _, out = compare_runs(a, b, names)
    assert names is not None or compared > 300, "the runs' model files hold the tensors compared"
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    proc = _cli(*_COMPRESS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_cli_run_killed_after_every_stage_resumes_bit_exact(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    for k in range(1, 5):  # killed right after stage k is saved, then resumed by a new process
        proc = _cli(*_COMPRESS, "--out", out, *(["--resume"] if k > 1 else []), kill=("stage", str(k)))
        assert proc.returncode == -9, proc.stderr
        assert json.loads((out / "state.json").read_text())["completed"] == k and not (out / "model.pt").exists()
        done = [f"stage{i}_{'DPQE'[i - 1]}.pt" for i in range(1, k + 1)]
        assert _differences(uninterrupted, out, done) == [], f"after the kill at stage {k}"
    proc = _cli(*_COMPRESS, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert _differences(uninterrupted, out) == []
    state = json.loads((out / "state.json").read_text())
    assert state["records"][-1]["exit_fractions"], "E kept its exits: their heads were compared too"


@pytest.mark.slow
def test_cli_run_killed_mid_stage_and_mid_write_resumes_bit_exact(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _cli(*_COMPRESS, "--out", out, kill=("step", "14"))  # in P's fine-tuning
    assert proc.returncode == -9 and json.loads((out / "state.json").read_text())["completed"] == 1
    proc = _cli(*_COMPRESS, "--out", out, "--resume", kill=("write", "stage3_Q.pt"))
    assert proc.returncode == -9
    assert list(out.glob(".stage3_Q.pt.*.tmp")), "the interrupted write left its temporary file"
    proc = _cli(*_COMPRESS, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert not list(out.rglob("*.tmp")), "temporary files are cleaned up"
    assert _differences(uninterrupted, out) == []


@pytest.mark.slow
def test_cli_run_of_a_model_outside_the_zoo_resumes_bit_exact(tmp_path):
    from test_pipeline import UserNet

    torch.manual_seed(0)
    torch.save(UserNet(), tmp_path / "mine.pt")
    args = list(_COMPRESS)
    del args[args.index("--teacher-epochs"):args.index("--teacher-epochs") + 2]  # a given model: no teacher to train
    args[args.index("--model"):args.index("--model") + 2] = ["--model-file", tmp_path / "mine.pt"]
    proc = _cli(*args, "--out", tmp_path / "full")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "killed"
    proc = _cli(*args, "--out", out, kill=("stage", "2"))
    assert proc.returncode == -9 and json.loads((out / "state.json").read_text())["completed"] == 2
    proc = _cli(*args, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    compared, _, differences = compare_runs(tmp_path / "full", out)
    assert differences == [] and compared > 50
    assert torch.load(out / "model.pt", weights_only=True)["recipe"]["original"] == {"class": "test_pipeline.UserNet"}


@pytest.mark.slow
def test_cli_resume_checks_data_and_settings_but_not_display(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    moved = tmp_path / "moved.npz"
    shutil.copy(MNIST_DATA, moved)
    # The same data elsewhere, with progress bars shown: the same run, nothing to redo.
    before = (out / "stage4_E.pt").read_bytes()
    args = [a for a in _COMPRESS if a != "--quiet"]
    args[args.index("--data-root") + 1] = moved
    proc = _cli(*args, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert (out / "stage4_E.pt").read_bytes() == before
    with np.load(MNIST_DATA) as npz:
        arrays = dict(npz)
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][5] = (arrays["y_train"][5] + 1) % 10  # one label changed
    np.savez(moved, **arrays)
    state = (out / "state.json").read_bytes()
    proc = _cli(*args, "--out", out, "--resume")
    assert proc.returncode == 2 and "data differs from this run's" in proc.stderr, proc.stderr
    proc = _cli(*_COMPRESS, "--set", "prune.ratio=0.3", "--out", out, "--resume")
    assert proc.returncode == 2 and "prune.ratio: saved 0.5, now 0.3" in proc.stderr, proc.stderr
    proc = _cli(*_COMPRESS, "--out", out)  # neither --resume nor --overwrite
    assert proc.returncode == 2 and "already holds files" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "state.json").read_bytes() == state


@pytest.mark.slow
def test_a_tampered_state_is_refused_in_one_line(uninterrupted, tmp_path):
    """state.json is checked when read: a truncated, edited, escaping or foreign one ends in one
    BadFileError naming the file and what to do (every command that reads it: test_bad_input)."""
    good = json.loads((uninterrupted / "state.json").read_text())
    assert (good["format"], good["version"]) == ("ordercomp-run", 1)
    record = good["records"][0]
    tampered = {
        "truncated": ((uninterrupted / "state.json").read_text()[:100], "not valid JSON"),
        "a list": ("[]", "must hold an object"),
        "missing fingerprint": (json.dumps({k: v for k, v in good.items() if k != "fingerprint"}),
                                "lacks the key 'fingerprint'"),
        "completed as text": (json.dumps(dict(good, completed="4")), "'completed' must be an integer"),
        "completed beyond its records": (json.dumps(dict(good, completed=9)), "must count finished records"),
        "model file outside": (json.dumps(dict(good, model_file="../../elsewhere/model.pt")), "not the name of a file"),
        "absolute model file": (json.dumps(dict(good, model_file="/etc/passwd")), "not the name of a file"),
        "record stage escaping": (json.dumps(dict(good, records=[dict(record, stage="/../../x")] + good["records"][1:])),
                                  "not the name of a file"),
        "record without step": (json.dumps(dict(good, records=[{"stage": "D"}] + good["records"][1:])),
                                "integer 'step'"),
        "bad per-input results": (json.dumps(dict(good, original_correct="ten:ff")), "not a packed list"),
        "another version": (json.dumps(dict(good, version=2)), "this ordercomp reads 'ordercomp-run' version 1"),
    }
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for what, (text, words) in tampered.items():
        (run / "state.json").write_text(text)
        with pytest.raises(ordercomp.BadFileError, match=rf"state\.json: .*{re.escape(words)}.*--overwrite") as caught:
            ordercomp.pipeline.read_state(run)
        assert len(str(caught.value).splitlines()) == 1, what
    # a run written before the format was recorded reads as version 1
    (run / "state.json").write_text(json.dumps({k: v for k, v in good.items() if k not in ("format", "version")}))
    assert ordercomp.pipeline.read_state(run)["fingerprint"] == good["fingerprint"]
    (run / "state.json").write_text(tampered["missing fingerprint"][0])
    proc = _cli(*_COMPRESS, "--out", run, "--resume")
    assert proc.returncode == 2 and "state.json: lacks the key 'fingerprint'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_cli_evaluate_uses_the_runs_own_data(uninterrupted, tmp_path):
    report = json.loads((uninterrupted / "report.json").read_text())
    proc = _cli("evaluate", uninterrupted, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy: {report['stages'][-1]['accuracy']:.2f} % (original" in proc.stdout
    other = tmp_path / "other.npz"
    with np.load(MNIST_DATA) as npz:
        np.savez(other, x_train=npz["x_train"][:256], y_train=npz["y_train"][:256], x_test=npz["x_test"][256:],
                 y_test=npz["y_test"][256:])
    proc = _cli("evaluate", uninterrupted, "--quiet", "--data-root", other)  # "the run's data, moved here"
    assert proc.returncode == 2 and "is not the data" in proc.stderr and str(other) in proc.stderr
    proc = _cli("evaluate", uninterrupted, "--quiet", "--data", "npz", "--data-root", other)
    assert proc.returncode == 0 and "not the run's data" in proc.stdout, proc.stderr


# In-process runs on digits held in memory: the run-directory rules themselves.


@pytest.fixture
def loaders(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    return (DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(TensorDataset(xte[:128], yte[:128]), batch_size=64))


def _model():
    torch.manual_seed(0)
    return ordercomp.models.create("resnet8", num_classes=10, in_channels=1)


def _snapshot(path: Path):
    return {p.relative_to(path).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in path.rglob("*") if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.slow
def test_one_run_per_directory(loaders, tmp_path):
    train, val = loaders
    out = tmp_path / "run"
    compress(_model(), train, val, config=quick("PQ"), out=out)
    earlier = _snapshot(out)
    with pytest.raises(RunDirError, match=r"already holds files .*resume=True \(--resume\).*overwrite=True"):
        compress(_model(), train, val, config=quick("PQ"), out=out)
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        compress(_model(), train, val, config=quick("PQ"), out=out, resume=True, overwrite=True)
    # A run that fails its checks leaves the earlier run as it was, overwrite or not.
    with pytest.raises(ConfigError, match="points"):  # found when E is checked against the model
        compress(_model(), train, val, config=quick("PE", {"early_exit": {"points": [99]}}), out=out, overwrite=True)
    with pytest.raises(ConfigError, match="differs"):
        compress(_model(), train, val, config=quick("P"), out=out, resume=True)
    assert _snapshot(out) == earlier
    # overwrite clears the earlier run: no stale stage of it stays beside the new run's.
    compress(_model(), train, val, config=quick("P"), out=out, overwrite=True)
    assert not (out / "stage2_Q.pt").exists() and (out / "stage1_P.pt").exists()
    assert json.loads((out / "state.json").read_text())["config"]["order"] == "P"
    # A folder of other files is neither written into nor cleared.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for flag in ("resume", "overwrite"):
        with pytest.raises(RunDirError, match="not an ordercomp run directory"):
            compress(_model(), train, val, config=quick("P"), out=mine, **{flag: True})
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_directory_in_use_is_refused(loaders, tmp_path):
    out = tmp_path / "run"
    train, val = loaders
    with claim(out):  # this process holds it: another process is refused, and so is a second claim here
        proc = _cli(*_COMPRESS, "--out", out)
        assert proc.returncode == 2 and f"in use by another ordercomp run (process {os.getpid()})" in proc.stderr
        with pytest.raises(RunDirError, match="already held by this process"):
            compress(_model(), train, val, config=quick("P"), out=out, resume=True)
    compress(_model(), train, val, config=quick("P"), out=out)  # released: usable again


def _failing_write(real, name):
    """atomic_write that runs out of disk space half-way through writing ``name``."""
    def write(path, fill, mode="wb"):
        if Path(path).name != name:
            return real(path, fill, mode)

        def partial(f):
            f.write(b"\0" * 100 if "b" in mode else "{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, partial, mode)
    return write


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage2_Q.pt", "state.json", "report.json"])
def test_a_full_disk_while_saving_keeps_the_finished_stages(loaders, tmp_path, monkeypatch, name):
    train, val = loaders
    full = compress(_model(), train, val, config=quick("PQE"), out=tmp_path / "full")
    out = tmp_path / "run"
    real = checkpoint.atomic_write
    saved = []
    original_save = ordercomp.pipeline.rundir.RunDir.save_stage

    def save_stage(self, completed, *a, **k):  # the disk fills up after stage 1 is saved
        if completed == 2:
            snapshot = _snapshot(out)
            monkeypatch.setattr(checkpoint, "atomic_write", _failing_write(real, name))
            monkeypatch.setattr(results, "atomic_write", _failing_write(real, name))
            saved.append(snapshot)
        return original_save(self, completed, *a, **k)

    monkeypatch.setattr(ordercomp.pipeline.rundir.RunDir, "save_stage", save_stage)
    with pytest.raises(OSError, match="No space left"):
        compress(_model(), train, val, config=quick("PQE"), out=out)
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k.startswith("stage1")} == \
        {k: v for k, v in saved[0].items() if k.startswith("stage1")}, "stage 1's files are untouched"
    assert not list(out.rglob("*.tmp")), "the failed write removed its temporary file"
    completed = json.loads((out / "state.json").read_text())["completed"]
    assert completed == (2 if name == "report.json" else 1)
    monkeypatch.undo()
    resumed = compress(_model(), train, val, config=quick("PQE"), out=out, resume=True)
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    as_saved = lambda report: _untimed(json.loads(json.dumps(report["stages"])))  # noqa: E731 (tuples as lists)
    assert as_saved(full.report) == as_saved(resumed.report)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with claim(tmp_path / "run"):
            checkpoint.write_text(tmp_path / "run" / "a.txt", "x")
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    finally:
        os.umask(old)
    assert modes == {"a.txt": 0o640, LOCK_FILE: 0o640}


@pytest.mark.slow
def test_a_resume_refuses_the_same_data_loaded_with_other_settings(tmp_path):
    """The command line's data settings left the config: a resume still compares them, as
    data.load recorded them (the samples are fingerprinted; a batch size changes the run too),
    but not where the data lies."""
    def loaders(root, batch_size):
        bundle = ordercomp.data.load("npz", root, limit=128, batch_size=batch_size, calibration_fraction=0.25)
        return bundle.train_loader, bundle.val_loader, bundle.calibration_loader

    out = tmp_path / "run"
    train, val, calibration = loaders(MNIST_DATA, 64)
    compress(_model(), train, val, config=quick("P", max_batches=1), out=out, calibration_loader=calibration)
    train, val, calibration = loaders(MNIST_DATA, 32)
    with pytest.raises(ConfigError, match=r"its data was loaded with other settings \(batch_size: saved 64, now 32\)"):
        compress(_model(), train, val, config=quick("P", max_batches=1), out=out, resume=True,
                 calibration_loader=calibration)
    moved = tmp_path / "moved.npz"
    shutil.copy(MNIST_DATA, moved)
    train, val, calibration = loaders(moved, 64)
    compress(_model(), train, val, config=quick("P", max_batches=1), out=out, resume=True,
             calibration_loader=calibration)


def test_compress_refuses_to_resume_on_other_data(loaders, tmp_path):
    train, val = loaders
    out = tmp_path / "run"
    compress(_model(), train, val, config=quick("P"), out=out)
    x, y = train.dataset.tensors
    other = DataLoader(TensorDataset(x[:-1], y[:-1]), batch_size=64, shuffle=True)
    with pytest.raises(DataError, match=r"its train data differs from this run's \(\d+ samples.*hash"):
        compress(_model(), other, val, config=quick("P"), out=out, resume=True)
    # Shown progress is a display setting: the run resumes (finished, nothing to redo).
    compress(_model(), train, val, config=config_of("P", epochs=1, max_batches=2, progress=True), out=out, resume=True)
    proc = _cli("evaluate", out)  # loaders of its own: the data is not recorded, so it is never guessed
    assert proc.returncode == 2 and "give --data" in proc.stderr


class _Jittered(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + torch.rand(()), i


def test_reseed_restarts_shuffling_and_augmentation():
    bundle = ordercomp.data.load("npz", MNIST_DATA, limit=128, batch_size=32)
    loader = bundle.train_loader

    def epoch():
        return torch.cat([x for x, _ in loader])

    ordercomp.data.reseed(loader, 3)
    first = epoch()
    assert not torch.equal(first, epoch()), "a second pass is shuffled and augmented anew"
    ordercomp.data.reseed(loader, 3)
    assert torch.equal(first, epoch())
    ordercomp.data.reseed(loader, 4)
    assert not torch.equal(first, epoch())
    fp = ordercomp.data.fingerprint(loader)
    assert fp == ordercomp.data.fingerprint(loader) and fp["size"] == 128
    # Augmentation drawing from the global random state (as torchvision's does) hashes the same
    # whatever ran before, and the caller's random state is left as it was.
    jitter = DataLoader(_Jittered(torch.arange(64.0).view(16, 1, 2, 2)), batch_size=4, shuffle=True)
    prints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        prints.append(ordercomp.data.fingerprint(jitter))
        after = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(3))
    assert prints[0] == prints[1]
    assert ordercomp.data.origin(bundle.val_loader)["loader"] == "val_loader"
    assert ordercomp.data.origin(loader)["settings"]["root"] == str(Path(MNIST_DATA).resolve())
