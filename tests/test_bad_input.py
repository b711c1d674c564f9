"""Bad input, as a new user gives it: every case is refused before any training, by one typed error
that names the argument, and leaves the run directory as it was.

Each case of :data:`CASES` runs one call (the command line in process, ``compress()``,
``profile()``, ``data.load``, the config, the ops) and states the error type and the words its
message must hold. The harness checks, for every case: the error type; the words (the argument
named); on the command line, one line on stderr and exit code 2; no optimizer step taken; the
run directory byte for byte as before (absent stays absent, an earlier run stays untouched).
``benchmarks/bad_inputs.py`` runs the same cases and counts how each ends.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import ordercomp
from ordercomp import checkpoint, data, models, ops
from ordercomp.cli import main
from ordercomp.errors import (ArgumentTypeError, ConfigError, DataError, MissingFileError, ModelError,
                              OrdercompError, RunDirError)
from ordercomp.pipeline import CommandConfig, CompressConfig, check_run
from ordercomp.stages import Prune
from ordercomp.train import Trainer, TrainConfig

from conftest import config_of

MNIST = Path(__file__).resolve().parent / "data" / "mnist_slice.npz"


# --------------------------------------------------------------------------- the inputs


class TinyNet(nn.Module):
    """conv -> flatten -> linear: runs on 1 x 28 x 28 inputs only (a size mismatch fails)."""

    def __init__(self, classes: int = 10, channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 28 * 28, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class DictNet(TinyNet):
    """TinyNet whose output is ``{"logits": ...}``."""

    def forward(self, x):
        return {"logits": super().forward(x)}


def _digits(n: int = 64):
    with np.load(MNIST) as npz:
        x = torch.from_numpy(npz["x_train"][:n]).float().div(255).unsqueeze(1)
        y = torch.from_numpy(npz["y_train"][:n]).long()
    return x, y


def _loader(x=None, y=None, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    if x is None:
        x, y = _digits()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class _Items(Dataset):
    """A map-style dataset of whatever ``item(i)`` returns (no readable labels)."""

    def __init__(self, item: Callable[[int], object], n: int = 64):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(i)


class _Stream(IterableDataset):
    """An iterable dataset of the digits whose label ``bad_at`` is ``bad_label``."""

    def __init__(self, bad_at: int, bad_label: int = 12):
        self.bad_at, self.bad_label = bad_at, bad_label

    def __iter__(self):
        x, y = _digits()
        for i in range(len(y)):
            yield x[i], (self.bad_label if i == self.bad_at else int(y[i]))


def _with(x=None, y=None, **changes):
    """The digits with some inputs or labels changed: ``{index: value}`` per tensor."""
    dx, dy = _digits()
    dx, dy = dx.clone(), dy.clone()
    for i, v in (x or {}).items():
        dx[i] = v
    for i, v in (y or {}).items():
        dy[i] = v
    return dx, dy


def _nan_weight(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    return model


def _inf_buffer(model: nn.Module) -> nn.Module:
    model.bn.running_var[1] = float("inf")
    return model


@dataclass
class Env:
    """What a case works with: a scratch folder, the run directory it must leave as it was, and files."""

    tmp: Path
    out: Path
    files: Dict[str, Path] = field(default_factory=dict)


def _files(tmp: Path) -> Dict[str, Path]:
    """The bad (and good) files the command-line cases name."""
    with np.load(MNIST) as npz:
        xtr, ytr, xte, yte = (npz[k][:n] for k, n in (("x_train", 128), ("y_train", 128), ("x_test", 64),
                                                        ("y_test", 64)))
    f = {}

    def npz(name, **arrays):
        f[name] = tmp / f"{name}.npz"
        np.savez(f[name], **arrays)

    npz("small", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    bad = ytr.copy()
    bad[5] = 12
    npz("badlabels", x_train=xtr, y_train=bad, x_test=xte, y_test=yte)
    npz("rgb", x_train=np.repeat(xtr[..., None], 3, -1), y_train=ytr, x_test=np.repeat(xte[..., None], 3, -1),
        y_test=yte)
    npz("empty")
    npz("floats", x_train=xtr.astype(np.float32), y_train=ytr, x_test=xte.astype(np.float32), y_test=yte)
    model = models.create("resnet8", num_classes=10, in_channels=1)
    for name, obj in (("model", model), ("sd", model.state_dict()), ("list", [1, 2, 3]),
                      ("sd3", models.create("resnet8", num_classes=10, in_channels=3).state_dict()),
                      ("model100", models.create("resnet8", num_classes=100, in_channels=1)),
                      ("nanmodel", _nan_weight(TinyNet()))):
        f[name] = tmp / f"{name}.pt"
        torch.save(obj, f[name])
    blob = f["model"].read_bytes()
    f["trunc"] = tmp / "trunc.pt"
    f["trunc"].write_bytes(blob[: len(blob) // 2])
    for name, text in (("text", "hello, not a model\n"), ("bad.yaml", "train: {lr: 0.1\n"), ("bad.json", '{"train": '),
                       ("list.yaml", "- 1\n- 2\n"), ("unknown.yaml", "trian: {lr: 0.1}\n")):
        f[name] = tmp / (name if "." in name else f"{name}.txt")
        f[name].write_text(text)
    f["binary.yaml"] = tmp / "binary.yaml"
    f["binary.yaml"].write_bytes(b"\xff\xfe\x00\x81")
    f["afile"] = tmp / "afile"
    f["afile"].write_text("a file, not a folder")
    # A finished budgeted run (state, report, probes, stage and final models) that the run-file cases tamper
    # with, and a finished export that the manifest cases tamper with.
    f["finished"] = tmp / "finished"
    assert main(["compress", "--model-file", str(f["model"]), "--data", "npz", "--data-root", str(f["small"]),
                 *RESUME, "--out", str(f["finished"])]) == 0
    f["exported"] = tmp / "exported"
    ordercomp.export(models.create("resnet8", num_classes=10, in_channels=1).eval(), f["exported"], "exact",
                     input_shape=[1, 28, 28])
    return f


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One bad input: ``call(env)`` must raise ``error`` (or, for ``cli``, exit 2 with one line)
    whose message holds every one of ``words``; ``check`` names the check it exercises."""

    id: str
    check: str
    call: Callable[[Env], object]
    error: type
    words: Sequence[str]
    cli: bool = False
    setup: Optional[Callable[[Env], None]] = None


def _cli(*argv) -> Callable[[Env], object]:
    """A command line; ``{name}`` picks a file of :func:`_files`, ``{out}`` the run directory."""
    def call(env: Env):
        args = [a.format(out=env.out, **{k.replace(".", "_"): v for k, v in env.files.items()}) for a in argv]
        return main(args)
    return call


QUICK = ("--epochs", "1", "--max-batches", "1", "--quiet", "--order", "P", "--out", "{out}")
SMALL = ("--data", "npz", "--data-root", "{small}")


_SETTINGS = ("order", "epochs", "max_batches", "progress", "target_loss", "device", "output")


def _compress(model=None, train=None, val=None, **kwargs) -> Callable[[Env], object]:
    """A case calling compress(): ``kwargs`` are its keywords, or config settings (:data:`_SETTINGS`)."""
    def call(env: Env):
        m = model() if callable(model) and not isinstance(model, nn.Module) else model
        settings = {"order": "P", "epochs": 1, "max_batches": 1, "progress": False,
                    **{k: v for k, v in kwargs.items() if k in _SETTINGS}}
        keywords = {"out": env.out, **{k: v for k, v in kwargs.items() if k not in _SETTINGS}}
        config = config_of(config=keywords.pop("config", None), **settings)
        return ordercomp.compress(TinyNet() if m is None else m, train() if train else _loader(),
                                  val() if val else _loader(), config=config, **keywords)
    return call


def _deny_writes(env: Env) -> None:
    """The run directory's parent refuses writes (as a read-only folder does for a non-root user)."""
    real = os.access
    parent = env.out.parent

    def access(path, mode, *a, **k):
        return False if Path(path) == parent and mode & os.W_OK else real(path, mode, *a, **k)

    env.restore = lambda: setattr(os, "access", real)  # type: ignore[attr-defined]
    os.access = access


def _earlier_run(env: Env) -> None:
    """The run directory holds an earlier run's files."""
    env.out.mkdir()
    (env.out / "state.json").write_text('{"completed": 1}')
    (env.out / "model.pt").write_bytes(b"earlier")


# The finished run's settings: a --resume with them reaches its saved state and probes.
RESUME = ("--epochs", "1", "--max-batches", "1", "--quiet", "--order", "P", "--target-loss", "50", "--max-probes", "1")
PLANTED = "pwned"  # the file a planted pickle creates in the scratch folder when it is unpickled


class _Planted:
    """Unpickling this creates ``path``: a stand-in for malicious code in a run's model file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _tampered(name: str, change: Callable[[Path, Env], None], source: str = "finished") -> Callable[[Env], None]:
    """A setup: the run directory is a copy of the finished run (or export), then ``change(file, env)``
    is made to its file ``name``."""
    def setup(env: Env) -> None:
        shutil.copytree(env.files[source], env.out)
        change(env.out / name, env)
    return setup


def _truncate(path: Path, env: Env) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _edit(**changes):
    """Replaces top-level keys of a JSON object (a key given None is removed)."""
    def change(path: Path, env: Env) -> None:
        value = json.loads(path.read_text())
        for key, new in changes.items():
            value.pop(key) if new is None else value.__setitem__(key, new)
        path.write_text(json.dumps(value))
    return change


def _edit_first(**changes):
    """Replaces keys of the first entry of a JSON list."""
    def change(path: Path, env: Env) -> None:
        value = json.loads(path.read_text())
        value[0].update(changes)
        path.write_text(json.dumps(value))
    return change


def _plant(path: Path, env: Env) -> None:
    torch.save(_Planted(env.tmp / PLANTED), path)


def _edit_segment(relative: bool):
    """The manifest's graph becomes another export's (a valid graph of another model), named by a
    path relative to the folder ("../...") or an absolute one."""
    def change(path: Path, env: Env) -> None:
        manifest = json.loads(path.read_text())
        other = env.files["exported"] / "model.onnx"
        manifest["segments"][0]["file"] = os.path.relpath(other, path.parent) if relative else str(other)
        path.write_text(json.dumps(manifest))
    return change


def _unfinished_with_planted_probe(env: Env) -> None:
    """The finished run, set back to before its first stage (as a run killed there is), with a
    planted pickle in place of the budget's saved full run: a resume reads that file."""
    shutil.copytree(env.files["finished"], env.out)
    state = json.loads((env.out / "state.json").read_text())
    (env.out / "state.json").write_text(json.dumps(dict(state, completed=0, model_file=None, records=[])))
    for name in ("model.pt", "stage1_P.pt", "report.json", "report.md"):
        (env.out / name).unlink()
    full = next((env.out / "probes").glob("*-full-*.pt"))
    _plant(full, env)


def _run_file_cases() -> List[Case]:
    """Every file of a run and an export, truncated, mistyped, missing a key or hostile, on every
    command that reads it: one line naming the file, nothing run, nothing changed."""
    cases = []
    readers = {"evaluate": ("evaluate", "{out}", "--quiet"), "export": ("export", "{out}"),
               "bench": ("bench", "{out}", "--rounds", "1", "--model-file", "{model}"),
               "resume": ("compress", "--model-file", "{model}", *SMALL, *RESUME, "--out", "{out}", "--resume")}
    state_changes = {
        "truncated": (_truncate, ["state.json", "not valid JSON"]),
        "list": (lambda p, e: p.write_text("[]"), ["state.json", "must hold an object"]),
        "no-fingerprint": (_edit(fingerprint=None), ["state.json", "lacks the key 'fingerprint'"]),
        "completed-text": (_edit(completed="1"), ["state.json", "'completed' must be an integer"]),
        "model-file-escapes": (_edit(model_file="../../elsewhere/model.pt"), ["state.json", "not the name of a file"]),
        "records-not-list": (_edit(records={"step": 1}), ["state.json", "'records' must be a list"]),
    }
    for change_id, (change, words) in state_changes.items():
        for reader, argv in readers.items():
            cases.append(Case(f"run-state-{change_id}-{reader}", f"state.json checked ({change_id})", _cli(*argv),
                              OrdercompError, words, cli=True, setup=_tampered("state.json", change)))
    for reader in ("evaluate", "export", "bench"):
        cases.append(Case(f"run-model-planted-{reader}", "run models never unpickled", _cli(*readers[reader]),
                          OrdercompError, ["model.pt" if reader != "bench" else "stage1_P.pt", "pickled"], cli=True,
                          setup=_tampered("model.pt" if reader != "bench" else "stage1_P.pt", _plant)))
    cases.append(Case("run-stage-planted-export", "run models never unpickled",
                      _cli("export", "{out}", "--stage", "1"), OrdercompError, ["stage1_P.pt", "pickled"], cli=True,
                      setup=_tampered("stage1_P.pt", _plant)))
    cases.append(Case("run-teacher-planted-bench", "run models never unpickled", _cli("bench", "{out}", "--rounds", "1"),
                      OrdercompError, ["teacher.pt", "pickled"], cli=True, setup=_tampered("teacher.pt", _plant)))
    cases.append(Case("run-probe-model-planted-resume", "probe models never unpickled", _cli(*readers["resume"]),
                      OrdercompError, ["probes", ".pt", "pickled"], cli=True, setup=_unfinished_with_planted_probe))
    cases.append(Case("run-state-another-version-evaluate", "state.json version", _cli(*readers["evaluate"]),
                      OrdercompError, ["state.json", "version 1"], cli=True,
                      setup=_tampered("state.json", _edit(version=2))))
    cases.append(Case("run-model-truncated-evaluate", "run models read weights-only", _cli(*readers["evaluate"]),
                      OrdercompError, ["model.pt", "torch cannot read it"], cli=True,
                      setup=_tampered("model.pt", _truncate)))
    cases.append(Case("run-report-another-version-bench", "report.json version", _cli(*readers["bench"]),
                      OrdercompError, ["report.json", "version 1"], cli=True,
                      setup=_tampered("report.json", _edit(version=2))))
    cases.append(Case("run-report-truncated-bench", "report.json checked", _cli(*readers["bench"]), OrdercompError,
                      ["report.json", "not valid JSON"], cli=True, setup=_tampered("report.json", _truncate)))
    for change_id, change, words in (
            ("truncated", _truncate, ["probes.json", "not valid JSON"]),
            ("no-strength", _edit_first(strength=None), ["probes.json", "'strength' must be an object"]),
            ("margin-text", _edit_first(margin="0.5"), ["probes.json", "'margin' must be a number"]),
            ("escaping-key", _edit_first(key="../../elsewhere", kind="full", result={}, correct="1:1"),
             ["probes.json", "not the name of a file"])):
        cases.append(Case(f"run-probes-{change_id}-resume", "probes.json checked", _cli(*readers["resume"]),
                          OrdercompError, words, cli=True, setup=_tampered("probes/probes.json", change)))
    for change_id, change, error, words in (
            ("truncated", _truncate, ModelError, ["manifest.json", "not valid JSON"]),
            ("graph-outside", _edit_segment(True), ModelError, ["is not inside the export folder"]),
            ("graph-absolute", _edit_segment(False), ModelError,
             ["is not inside the export folder"])):
        cases.append(Case(f"runtime-manifest-{change_id}", "manifest checked", lambda env: ordercomp.runtime.load(
            env.out), error, words, setup=_tampered("manifest.json", change, "exported")))
    return cases


def _dict_items(keys):
    x, y = _digits()
    return lambda: DataLoader(_Items(lambda i: {k: (x[i] if k in data.INPUT_KEYS else int(y[i])) for k in keys}),
                              batch_size=16)


CASES: List[Case] = [
    # ---- command line: files
    Case("cli-yaml-syntax", "config file syntax", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--config",
                                                       "{bad_yaml}"), ConfigError, ["bad.yaml", "line 2"], cli=True),
    Case("cli-json-syntax", "config file syntax", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--config",
                                                       "{bad_json}"), ConfigError, ["bad.json", "JSON"], cli=True),
    Case("cli-config-binary", "config file text", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--config",
                                                       "{binary_yaml}"), ConfigError, ["binary.yaml"], cli=True),
    Case("cli-config-list", "config file mapping", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--config",
                                                        "{list_yaml}"), ConfigError, ["list.yaml", "mapping"], cli=True),
    Case("cli-config-unknown-key", "config keys", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--config",
                                                       "{unknown_yaml}"), ConfigError, ["trian"], cli=True),
    Case("cli-config-missing", "config file exists", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--config",
                                                          "nowhere.yaml"), MissingFileError, ["nowhere.yaml"], cli=True),
    Case("cli-model-file-text", "model file readable", _cli("compress", "--model-file", "{text}", *SMALL, *QUICK),
         ModelError, ["--model-file", "text.txt"], cli=True),
    Case("cli-model-file-state-dict", "model file holds a model", _cli("compress", "--model-file", "{sd}", *SMALL,
                                                                       *QUICK), ModelError,
         ["--model-file", "sd.pt", "state dict", "--weights"], cli=True),
    Case("cli-model-file-truncated", "model file readable", _cli("compress", "--model-file", "{trunc}", *SMALL, *QUICK),
         ModelError, ["--model-file", "trunc.pt"], cli=True),
    Case("cli-model-file-list", "model file holds a model", _cli("compress", "--model-file", "{list}", *SMALL, *QUICK),
         ModelError, ["--model-file", "list.pt", "list"], cli=True),
    Case("cli-model-file-missing", "model file exists", _cli("compress", "--model-file", "gone.pt", *SMALL, *QUICK),
         MissingFileError, ["--model-file", "gone.pt"], cli=True),
    Case("cli-model-file-nan", "weights finite", _cli("compress", "--model-file", "{nanmodel}", *SMALL, *QUICK),
         ModelError, ["conv.weight", "NaN"], cli=True),
    Case("cli-weights-shape", "weights fit the model", _cli("compress", "--model", "resnet8", "--weights", "{sd3}",
                                                            *SMALL, *QUICK), ModelError,
         ["--weights", "sd3.pt", "size mismatch"], cli=True),
    Case("cli-weights-list", "weights are a state dict", _cli("compress", "--model", "resnet8", "--weights", "{list}",
                                                              *SMALL, *QUICK), ModelError,
         ["--weights", "list.pt", "state dict"], cli=True),
    Case("cli-weights-text", "weights readable", _cli("compress", "--model", "resnet8", "--weights", "{text}", *SMALL,
                                                      *QUICK), ModelError, ["--weights", "text.txt"], cli=True),
    Case("cli-weights-missing", "weights file exists", _cli("compress", "--model", "resnet8", "--weights", "gone.pt",
                                                            *SMALL, *QUICK), MissingFileError, ["--weights", "gone.pt"],
         cli=True),
    Case("cli-reference-text", "reference file readable", _cli("compress", "--model-file", "{model}",
                                                               "--reference-file", "{text}", *SMALL, *QUICK),
         ModelError, ["--reference-file", "text.txt"], cli=True),
    Case("cli-student-state-dict", "student file holds a model", _cli("compress", "--model-file", "{model}",
                                                                      "--student-file", "{sd}", *SMALL, *QUICK),
         ModelError, ["--student-file", "sd.pt"], cli=True),
    # ---- command line: data against the model
    Case("cli-rgb-for-gray-model", "input channels", _cli("compress", "--model-file", "{model}", "--data", "npz",
                                                          "--data-root", "{rgb}", *QUICK), DataError,
         ["--data npz", "rgb.npz", "1 channel", "got 3"], cli=True),
    Case("cli-empty-npz", "npz arrays present", _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root",
                                                     "{empty}", *QUICK), DataError, ["empty.npz", "x_train"], cli=True),
    Case("cli-float-npz", "npz images uint8", _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root",
                                                   "{floats}", *QUICK), DataError, ["floats.npz", "uint8"], cli=True),
    # The validation data is checked first (nothing the training data costs to read is read before
    # the model is known to fit): its labels run to 12, so the data has 13 classes, the model 10.
    Case("cli-labels-beyond-classes", "labels in [0, classes)", _cli("compress", "--model-file", "{model}", "--data",
                                                                     "npz", "--data-root", "{badlabels}", *QUICK),
         DataError, ["--data npz", "the model has 10 classes but the data has 13"], cli=True),
    Case("cli-model-classes-differ", "model classes match the data", _cli("compress", "--model-file", "{model100}",
                                                                          *SMALL, *QUICK),
         DataError, ["--data npz", "the model has 100 classes but the data has 10"], cli=True),
    Case("cli-data-root-missing", "data root exists", _cli("compress", "--model", "resnet8", "--data", "npz",
                                                           "--data-root", "nowhere.npz", *QUICK), MissingFileError,
         ["nowhere.npz"], cli=True),
    # ---- command line: settings
    Case("cli-set-lr-inf", "train.lr finite", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                   "train.lr=.inf"), ConfigError, ["train.lr", "finite", "inf"], cli=True),
    Case("cli-set-lr-text", "train.lr a number", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                      "train.lr=fast"), ConfigError, ["train.lr", "fast"], cli=True),
    Case("cli-set-bad-yaml", "--set value syntax", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                        "train.lr=["), ConfigError, ["train.lr=[", "YAML"], cli=True),
    Case("cli-set-no-equals", "--set form", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                 "train.lr"), ConfigError, ["train.lr", "section.key=value"], cli=True),
    Case("cli-set-unknown-key", "config keys", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                    "prune.rate=0.3"), ConfigError, ["rate", "ratio"], cli=True),
    Case("cli-set-prune-ratio", "prune.ratio range", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                          "prune.ratio=1.5"), ConfigError, ["prune.ratio", "1.5"],
         cli=True),
    Case("cli-set-w-bits", "quantize.w_bits range", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--set",
                                                         "quantize.w_bits=0"), ConfigError, ["quantize.w_bits", "0"],
         cli=True),
    Case("cli-set-thresholds", "early_exit.thresholds range", _cli("compress", "--model", "resnet8", *SMALL, *QUICK,
                                                                   "--set", "early_exit.thresholds=[2]"), ConfigError,
         ["early_exit.thresholds"], cli=True),
    Case("cli-batch-size-0", "data.batch_size range", _cli("compress", "--model", "resnet8", *SMALL, *QUICK,
                                                           "--batch-size", "0"), ConfigError,
         ["data.batch_size", "got 0"], cli=True),
    Case("cli-data-name", "data.name known", _cli("compress", "--model", "resnet8", "--data", "imagenet-1k", *QUICK),
         ConfigError, ["data.name", "imagenet-1k"], cli=True),
    Case("cli-limit-0", "data.limit range", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--limit", "0"),
         ConfigError, ["data.limit", "got 0"], cli=True),
    Case("cli-epochs-0", "train.epochs range", _cli("compress", "--model", "resnet8", *SMALL, "--quiet", "--order", "P",
                                                    "--out", "{out}", "--epochs", "0"), ConfigError,
         ["epochs", "got 0"], cli=True),
    Case("cli-order", "order letters", _cli("compress", "--model", "resnet8", *SMALL, "--epochs", "1", "--quiet",
                                            "--out", "{out}", "--order", "DPX"), ConfigError, ["order", "DPX"], cli=True),
    Case("cli-target-loss", "target_loss range", _cli("compress", "--model", "resnet8", *SMALL, *QUICK,
                                                      "--target-loss", "200"), ConfigError, ["target_loss", "200"],
         cli=True),
    Case("cli-calibration-fraction", "calibration_fraction range", _cli("compress", "--model", "resnet8", *SMALL,
                                                                        *QUICK, "--calibration-fraction", "1"),
         ConfigError, ["calibration_fraction", "1"], cli=True),
    Case("cli-device", "device known", _cli("compress", "--model", "resnet8", *SMALL, *QUICK, "--device", "tpu"),
         ConfigError, ["device", "tpu"], cli=True),
    Case("cli-resume-without-out", "--resume needs --out", _cli("compress", "--model", "resnet8", *SMALL, "--resume"),
         ConfigError, ["--resume", "--out"], cli=True),
    Case("cli-out-under-file", "out can be created", _cli("compress", "--model-file", "{model}", *SMALL, "--quiet",
                                                          "--out", "{afile}/run"), RunDirError, ["out", "afile", "file"],
         cli=True),
    Case("cli-out-read-only", "out writable", _cli("compress", "--model-file", "{model}", *SMALL, *QUICK), RunDirError,
         ["out", "write permission"], cli=True, setup=_deny_writes),
    Case("cli-out-holds-a-run", "out holds no other run", _cli("compress", "--model-file", "{model}", *SMALL, *QUICK),
         RunDirError, ["already holds files", "--resume", "--overwrite"], cli=True, setup=_earlier_run),
    Case("cli-max-probes-without-budget", "probe bounds need a budget", _cli(
        "compress", "--model", "resnet8", *SMALL, *QUICK, "--max-probes", "3"), ConfigError,
        ["--max-probes", "--target-loss"], cli=True),
    Case("cli-time-budget-without-budget", "probe bounds need a budget", _cli(
        "compress", "--model", "resnet8", *SMALL, *QUICK, "--time-budget", "60"), ConfigError,
        ["--time-budget", "--target-loss"], cli=True),
    Case("cli-bench-rounds-0", "bench --rounds range", _cli("bench", "{out}", "--rounds", "0"),
         ConfigError, ["--rounds", "got 0"], cli=True),
    Case("cli-bench-batch-0", "bench --batch-sizes range", _cli("bench", "{out}", "--batch-sizes", "1", "0"),
         ConfigError, ["--batch-sizes", "got 0"], cli=True),
    Case("cli-profile-size-0", "profile --size range", _cli("profile", "--model", "resnet8", "--size", "0"),
         ConfigError, ["--size", "got 0"], cli=True),
    Case("cli-profile-classes-0", "profile --num-classes range", _cli("profile", "--model", "resnet8",
                                                                      "--num-classes", "0"),
         ConfigError, ["--num-classes", "got 0"], cli=True),
    Case("cli-search-rgb-for-gray-model", "input channels (search)", _cli(
        "search-order", "--model-file", "{model}", "--data", "npz", "--data-root", "{rgb}", "--methods", "PQ", "--out",
        "{out}", "--quiet"), DataError, ["--data npz", "1 channel", "got 3"], cli=True),
    Case("cli-search-workers", "search workers range", _cli("search-order", "--model-file", "{model}", *SMALL,
                                                            "--workers", "0", "--out", "{out}"), ConfigError,
         ["workers", "got 0"], cli=True),
    Case("cli-search-methods", "search methods letters", _cli("search-order", "--model-file", "{model}", *SMALL,
                                                              "--methods", "DX", "--out", "{out}"), ConfigError,
         ["methods", "DX"], cli=True),
    Case("cli-search-out-under-file", "out can be created (search)", _cli(
        "search-order", "--model-file", "{model}", *SMALL, "--methods", "PQ", "--out", "{afile}/search"), RunDirError,
         ["out", "afile"], cli=True),
    Case("cli-evaluate-not-a-run", "evaluate needs a run directory", _cli("evaluate", "{afile}"), MissingFileError,
         ["afile", "run directory"], cli=True),
    # ---- compress(): the model
    Case("api-model-not-module", "model is a module", _compress(model="resnet8"), ArgumentTypeError,
         ["model", "nn.Module", "str"]),
    Case("api-model-nan-weight", "weights finite", _compress(model=lambda: _nan_weight(TinyNet())), ModelError,
         ["model", "conv.weight", "NaN"]),
    Case("api-model-inf-buffer", "buffers finite", _compress(model=lambda: _inf_buffer(TinyNet())), ModelError,
         ["model", "bn.running_var", "infinite"]),
    Case("api-reference-nan", "reference weights finite", _compress(reference=_nan_weight(TinyNet())), ModelError,
         ["reference", "conv.weight"]),
    Case("api-model-returns-3d", "logits [batch, classes]", _compress(model=lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3))), ModelError, ["logits", "[batch, classes]"]),
    # ---- compress(): the data
    Case("api-batch-bare-tensor", "batch form", _compress(train=lambda: DataLoader(_digits()[0], batch_size=16)),
         DataError, ["train_loader", "(input, label)", "tensor"]),
    Case("api-batch-dict-no-label", "batch form (dict)", _compress(val=_dict_items(["image"])), DataError,
         ["val_loader", "label key", "['image']"]),
    Case("api-batch-dict-two-inputs", "batch form (dict)", _compress(val=_dict_items(["image", "x", "label"])),
         DataError, ["val_loader", "more than one input key"]),
    Case("api-batch-4-tuple", "batch form", _compress(train=lambda: DataLoader(_Items(lambda i: (
        _digits(1)[0][0], 1, i, "extra")), batch_size=16)), DataError, ["train_loader", "of 4"]),
    Case("api-inputs-3d", "input layout", _compress(val=lambda: _loader(_digits()[0][:, 0], _digits()[1])), DataError,
         ["val_loader", "[batch, channels, height, width]", "(16, 28, 28)"]),
    Case("api-inputs-rgb", "input channels", _compress(train=lambda: _loader(_digits()[0].repeat(1, 3, 1, 1),
                                                                             _digits()[1])),
         DataError, ["train_loader", "1 channel", "got 3"]),
    Case("api-inputs-size", "input size", _compress(val=lambda: _loader(torch.zeros(64, 1, 32, 32), _digits()[1])),
         DataError, ["val_loader", "cannot run", "(16, 1, 32, 32)"]),
    Case("api-inputs-uint8", "input dtype", _compress(train=lambda: _loader((_digits()[0] * 255).to(torch.uint8),
                                                                            _digits()[1])),
         DataError, ["train_loader", "floating-point", "uint8"]),
    Case("api-inputs-nan", "inputs finite", _compress(train=lambda: _loader(*_with(x={3: float("nan")}))), DataError,
         ["train_loader", "finite", "NaN"]),
    Case("api-inputs-inf", "inputs finite", _compress(val=lambda: _loader(*_with(x={0: float("inf")}))), DataError,
         ["val_loader", "finite", "infinite"]),
    Case("api-labels-float", "labels integer", _compress(train=lambda: _loader(_digits()[0], _digits()[1].float())),
         DataError, ["train_loader", "integer", "float32"]),
    Case("api-labels-one-hot", "labels one index per input", _compress(
        train=lambda: _loader(_digits()[0], nn.functional.one_hot(_digits()[1], 10))),
         DataError, ["train_loader", "one class index per input", "(16, 10)"]),
    Case("api-labels-beyond-classes-val", "labels in [0, classes) (all, readable)", _compress(
        val=lambda: _loader(*_with(y={60: 10}))), DataError, ["val_loader", "[0, 10)", "found 10"]),
    Case("api-labels-negative-train", "labels in [0, classes) (all, readable)", _compress(
        train=lambda: _loader(*_with(y={40: -1}), shuffle=True)), DataError, ["train_loader", "found -1"]),
    Case("api-labels-beyond-model-classes", "labels in [0, classes) (model too small)", _compress(
        model=lambda: TinyNet(classes=5)), DataError, ["_loader", "[0, 5)", "the model has 5 classes"]),
    Case("api-labels-calibration", "labels in [0, classes) (calibration)", _compress(
        calibration_loader=_loader(*_with(y={33: 99}))), DataError, ["calibration_loader", "found 99"]),
    Case("api-labels-stream-val", "labels as batches come (iterable)", _compress(
        val=lambda: DataLoader(_Stream(bad_at=40), batch_size=16), config={"calibration_fraction": 0.0}), DataError,
         ["evaluation loader", "[0, 10)", "found 12"]),
    Case("api-labels-map-dataset-val", "labels as batches come (map-style, unreadable)", _compress(
        val=lambda: DataLoader(_Items(lambda i: (_digits()[0][i], 10 if i == 50 else int(_digits()[1][i]))),
                               batch_size=16)), DataError, ["[0, 10)", "found 10"]),
    Case("api-loader-empty", "loader yields batches", _compress(val=lambda: _loader(torch.zeros(0, 1, 28, 28),
                                                                                    torch.zeros(0, dtype=torch.long))),
         DataError, ["val_loader", "no batches"]),
    Case("api-loader-not-iterable", "loader iterable", _compress(train=lambda: 42), ArgumentTypeError,
         ["train_loader", "iterable", "int"]),
    # ---- compress(): settings and the run directory
    Case("api-order", "order letters", _compress(order="DPZ"), ConfigError, ["order", "DPZ"]),
    Case("api-epochs-0", "train.epochs range", _compress(epochs=0), ConfigError, ["epochs", "got 0"]),
    Case("api-max-batches-negative", "train.max_batches range", _compress(max_batches=-1), ConfigError,
         ["max_batches", "-1"]),
    Case("api-target-loss", "target_loss range", _compress(target_loss=-1.0), ConfigError, ["target_loss", "-1"]),
    Case("api-device", "device known", _compress(device="tpu"), ConfigError, ["device", "tpu"]),
    Case("api-stages-type", "stages entries", _compress(stages={"P": "half"}), ArgumentTypeError,
         ["stages['P']", "Prune", "str"]),
    Case("api-stages-letter", "stages letters", _compress(stages={"Z": Prune()}), ConfigError, ["stages", "'Z'"]),
    Case("api-config-missing", "config file exists", _compress(config="nowhere.yaml"), MissingFileError,
         ["nowhere.yaml"]),
    Case("api-config-unknown-key", "config keys", _compress(config={"trian": {}}), ConfigError, ["trian"]),
    Case("api-config-calibration", "calibration_fraction range", _compress(config={"calibration_fraction": 1.0}),
         ConfigError, ["calibration_fraction", "1.0"]),
    Case("api-metric", "metric callable", _compress(metric="f1"), ArgumentTypeError, ["metric", "callable", "str"]),
    Case("api-optimizer", "optimizer callable", _compress(optimizer="adam"), ConfigError, ["optimizer", "callable"]),
    Case("api-output-key", "output names the logits", _compress(model=lambda: DictNet(), output="logits2"),
         ModelError, ["logits2"]),
    Case("api-resume-without-out", "resume needs out", lambda env: ordercomp.compress(
        TinyNet(), _loader(), _loader(), config=config_of("P"), resume=True), ConfigError, ["resume", "out"]),
    Case("api-out-is-file", "out a directory", lambda env: _compress()(Env(env.tmp, env.files["afile"], env.files)),
         RunDirError, ["out", "afile", "file"]),
    Case("api-out-read-only", "out writable", _compress(), RunDirError, ["out", "write permission"],
         setup=_deny_writes),
    Case("api-out-holds-a-run", "out holds no other run", _compress(), RunDirError, ["already holds files"],
         setup=_earlier_run),
    Case("api-exit-point", "stage fits the model", _compress(order="E", stages={
        "E": ordercomp.stages.EarlyExit(points=("nowhere",))}), ConfigError, ["early_exit.points", "nowhere"]),
    # ---- the trainer, in a loop of the user's own (no probe before it: its own checks)
    Case("trainer-nan-weights", "non-finite loss blamed on the weights", lambda env: Trainer(
        TrainConfig(epochs=1, progress=False)).fit(_nan_weight(TinyNet()), _loader()), ModelError,
         ["parameter", "NaN", "weights"]),
    Case("trainer-nan-inputs", "non-finite loss blamed on the inputs", lambda env: Trainer(
        TrainConfig(epochs=1, progress=False)).fit(TinyNet(), _loader(*_with(x={2: float("nan")}))), DataError,
         ["train_loader", "batch 1", "NaN"]),
    Case("trainer-labels", "labels as batches come (trainer)", lambda env: Trainer(
        TrainConfig(epochs=1, progress=False), num_classes=10).fit(TinyNet(), _loader(*_with(y={0: 10}))),
         DataError, ["train_loader", "[0, 10)", "found 10"]),
    # ---- profile()
    Case("profile-model", "profile model a module", lambda env: ordercomp.profile("resnet8", torch.zeros(1, 3, 32, 32)),
         ArgumentTypeError, ["model", "nn.Module", "str"]),
    Case("profile-input-type", "profile example_input", lambda env: ordercomp.profile(TinyNet(), [[1.0]]),
         ConfigError, ["example_input", "list"]),
    Case("profile-input-shape", "profile example_input fits", lambda env: ordercomp.profile(
        TinyNet(), torch.zeros(1, 3, 28, 28)), ModelError, ["TinyNet", "(1, 3, 28, 28)"]),
    # ---- data.load
    Case("load-name", "data.load name", lambda env: data.load("imagenet-1k"), ConfigError, ["imagenet-1k"]),
    Case("load-batch-size", "data.load batch_size", lambda env: data.load("npz", env.files["small"], batch_size=0),
         ConfigError, ["batch_size", "got 0"]),
    Case("load-split-val", "data.load split_val", lambda env: data.load("npz", env.files["small"], split_val=1.5),
         ConfigError, ["split_val", "1.5"]),
    Case("load-root-missing", "data.load root", lambda env: data.load("npz", env.tmp / "gone.npz"),
         MissingFileError, ["gone.npz"]),
    Case("load-empty-npz", "npz arrays present", lambda env: data.load("npz", env.files["empty"]), DataError,
         ["empty.npz", "x_train"]),
    Case("load-text-as-npz", "npz readable", lambda env: data.load("npz", env.files["text"]), DataError,
         ["text.txt", ".npz"]),
    Case("load-limit", "data.load limit", lambda env: data.load("npz", env.files["small"], limit=0), ConfigError,
         ["limit", "got 0"]),
    # ---- the config
    Case("config-order", "order letters", lambda env: CompressConfig(order="PQX"), ConfigError, ["order", "PQX"]),
    Case("config-lr-text", "train.lr a number", lambda env: CompressConfig.from_dict({"train": {"lr": "fast"}}),
         ConfigError, ["train.lr", "fast"]),
    Case("config-section-type", "config section mapping", lambda env: CompressConfig.from_dict({"prune": 5}),
         ConfigError, ["prune", "mapping"]),
    Case("config-data-batch-size", "data.batch_size range", lambda env: CommandConfig.from_dict(
        {"data": {"batch_size": 0}}), ConfigError, ["data.batch_size", "got 0"]),
    Case("config-data-name", "data.name known", lambda env: CommandConfig.from_dict({"data": {"name": "foo"}}),
         ConfigError, ["data.name", "foo"]),
    Case("config-teacher-epochs", "teacher_epochs range", lambda env: CommandConfig(teacher_epochs=-1), ConfigError,
         ["teacher_epochs", "-1"]),
    Case("config-budget", "budget settings", lambda env: CompressConfig.from_dict({"budget": {"max_probes": -1}}),
         ConfigError, ["budget.max_probes", "-1"]),
    # ---- deployment
    Case("cli-export-not-a-run", "export reads a run directory", _cli("export", "{out}"), MissingFileError,
         ["is not a run directory", "state.json"], cli=True),
    Case("cli-bench-not-a-run", "bench reads a run directory", _cli("bench", "{out}"), MissingFileError,
         ["is not a run directory", "state.json"], cli=True),
    Case("export-mode", "export mode known", lambda env: ordercomp.export(TinyNet().eval(), env.out, "int4"),
         ConfigError, ["mode", "'int4'"]),
    Case("export-fast-needs-calibration", "fast export calibrated", lambda env: ordercomp.export(
        TinyNet().eval(), env.out, "fast"), ConfigError, ["calibration="]),
    Case("export-input-shape", "export knows the input shape", lambda env: ordercomp.export(
        TinyNet().eval(), env.out, "exact"), ConfigError, ["input_shape", "[C, H, W]"]),
    Case("export-opset", "opset range", lambda env: ordercomp.export(TinyNet().eval(), env.out, "exact", opset=9,
                                                                     input_shape=[1, 28, 28]),
         ConfigError, ["opset", "9"]),
    Case("export-fast-16-bit-inputs", "fast export has 8-bit inputs", lambda env: ordercomp.export(
        ordercomp.nn.quantize_model(TinyNet(), 4, 16, policy="all")[0].eval(), env.out, "fast",
        calibration=torch.zeros(2, 1, 28, 28), int8_min_channels=0),
         ConfigError, ["16-bit inputs", "mode='exact'"]),
    Case("runtime-no-export", "runtime reads an export folder", lambda env: ordercomp.runtime.load(env.out),
         MissingFileError, ["does not exist", "manifest.json"]),
    # ---- the files of a run and of an export
    *_run_file_cases(),
    # ---- ops
    Case("ops-alpha-inf", "alpha finite", lambda env: ops.fake_quant_act(torch.zeros(4), float("inf"), 4),
         ConfigError, ["alpha", "inf"]),
    Case("ops-alpha-nan-tensor", "alpha finite", lambda env: ops.fake_quant_act(torch.zeros(4),
                                                                                torch.tensor([float("nan")]), 4),
         ConfigError, ["alpha", "nan"]),
    Case("ops-alpha-zero", "alpha positive", lambda env: ops.fake_quant_act(torch.zeros(4), 0.0, 4), ConfigError,
         ["alpha", "0"]),
    Case("layer-alpha-beyond-float32", "layer alpha in float32", lambda env: ordercomp.nn.QuantConv2d(
        1, 2, 3, alpha=1e39), ConfigError, ["alpha", "float32", "1e+39"]),
    Case("ops-bits", "bits range", lambda env: ops.quantize_weight(torch.zeros(4), 0), ConfigError, ["bits", "0"]),
    Case("ops-weight-int", "w floating", lambda env: ops.quantize_weight(torch.zeros(4, dtype=torch.long), 4),
         ArgumentTypeError, ["w", "floating-point"]),
    Case("ops-threshold", "threshold range", lambda env: ops.exit_check(torch.zeros(2, 3), 1.5), ConfigError,
         ["threshold", "1.5"]),
    Case("ops-logits-1d", "logits 2-D", lambda env: ops.exit_check(torch.zeros(3), 0.5), ConfigError,
         ["logits", "2-D"]),
    Case("ops-criterion", "criterion known", lambda env: ops.exit_check(torch.zeros(2, 3), 0.5, "margin"), ConfigError,
         ["criterion", "margin"]),
    Case("ops-counter-fraction", "integer counter takes integers", lambda env: ops.accumulate_bitops(
        torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), 2.5), ConfigError, ["bitops", "2.5"]),
    Case("ops-counter-overflow", "integer counter overflow", lambda env: ops.accumulate_bitops(
        torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), 1e30), ConfigError, ["bitops", "int64"]),
    Case("ops-mask-dtype", "mask bool", lambda env: ops.accumulate_bitops(torch.zeros(3, dtype=torch.float64),
                                                                         torch.ones(3), 1.0),
         ArgumentTypeError, ["active_mask", "bool"]),
]


# --------------------------------------------------------------------------- the harness


def snapshot(path: Path) -> Optional[Dict[str, str]]:
    """Every file under ``path`` with a hash of its bytes (None when ``path`` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


class Steps:
    """Counts optimizer steps taken anywhere while it is installed."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def _hook(self, *args):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()


@dataclass
class Outcome:
    """How a case ended: ``kind`` is "clear" (the error asked for, naming what it must),
    "traceback" (another exception escaped, or the command line printed more than one line or
    exited otherwise), "silent" (no error), "unclear" (the right kind of ending, a message
    missing words); ``steps`` optimizer steps were taken; ``changed`` the run directory changed."""

    kind: str
    message: str
    steps: int = 0
    changed: bool = False


def run_case(case: Case, env: Env, read_err: Callable[[], str]) -> Outcome:
    """Runs ``case`` in ``env`` and says how it ended (without asserting); ``read_err()`` returns
    what was printed on stderr since the last call."""
    restore = None
    if case.setup is not None:
        case.setup(env)
        restore = getattr(env, "restore", None)
    before = snapshot(env.out)
    kind, message = "silent", ""
    try:
        with Steps() as steps:
            try:
                result = case.call(env)
            except OrdercompError as exc:
                kind, message = ("clear" if isinstance(exc, case.error) else "unclear"), str(exc)
            except Exception as exc:  # noqa: BLE001 - an escaped exception is what this counts
                kind, message = "traceback", f"{type(exc).__name__}: {exc}"
            else:
                if case.cli:
                    err = read_err()
                    lines = [line for line in err.splitlines() if line.strip()]
                    message = err.strip()
                    if result == 2 and len(lines) == 1 and lines[0].startswith("ordercomp ") and ": error: " in lines[0]:
                        kind = "clear"
                    elif result == 0:
                        kind = "silent"
                    else:
                        kind = "traceback"
    finally:
        if restore is not None:
            restore()
    if kind == "clear" and not all(w.lower() in message.lower() for w in case.words):
        kind = "unclear"
    return Outcome(kind, message, steps.count, snapshot(env.out) != before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("bad-input-files"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_before_training(case: Case, files, tmp_path, capsys):
    env = Env(tmp_path, tmp_path / "run", files)
    capsys.readouterr()
    outcome = run_case(case, env, lambda: capsys.readouterr().err)
    assert outcome.kind == "clear", f"{case.id}: {outcome.kind}: {outcome.message}"
    assert outcome.steps == 0, f"{case.id}: {outcome.steps} optimizer step(s) before the error"
    assert not outcome.changed, f"{case.id}: the run directory changed"
    assert not (tmp_path / PLANTED).exists(), f"{case.id}: a planted pickle ran"


def test_cases_cover_the_surfaces():
    """At least 60 inputs over at least 40 distinct checks, across every surface the issue names."""
    assert len(CASES) >= 60 and len({c.check for c in CASES}) >= 40
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"cli", "api", "profile", "load", "config", "ops"} <= prefixes
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_bad_label_in_an_iterable_training_stream_stops_before_its_step(tmp_path):
    """Labels an iterable loader yields cannot be read ahead: each batch is checked as it comes,
    and the bad one fails before the optimizer steps on it (batch 3 of 16: two steps taken)."""
    out = tmp_path / "run"
    with Steps() as steps, pytest.raises(DataError, match=r"train_loader: labels must be integers in \[0, 10\)"):
        ordercomp.compress(TinyNet(), DataLoader(_Stream(bad_at=40), batch_size=16), _loader(),
                           config=config_of("P", {"calibration_fraction": 0.0}, epochs=1, progress=False), out=out)
    assert steps.count == 2
    assert not out.exists()


def test_set_reads_exponent_numbers(files):
    """``--set train.lr=1e-3`` is the number 0.001 (YAML 1.1 alone would read the text "1e-3")."""
    config = CompressConfig().override(["train.lr=1e-3", "prune.ratio=5E-1", "distill.width=.25"])
    assert (config.train.lr, config.prune.ratio, config.distill.width) == (0.001, 0.5, 0.25)


def test_text_flags_stay_text():
    """``--data-root`` and friends are text, whatever YAML would make of them (123, yes, 1e-3)."""
    from ordercomp.cli import build_parser
    from ordercomp.cli.common import config_from

    for root in ("123", "yes", "1e-3", "null"):
        args = build_parser().parse_args(["compress", "--model", "resnet8", "--data", "npz", "--data-root", root])
        assert config_from(args).data.root == root


def test_a_model_with_more_classes_than_the_labels_use_is_warned_about():
    """A 100-class model on 10-class data is not wrong in form (every label is in range) but
    scores near 0 %: compress() warns before training (the command line refuses it)."""
    with pytest.warns(UserWarning, match=r"val_loader: the labels use classes 0..9 but the model has 100 outputs"):
        with pytest.raises(ConfigError, match="nowhere"):  # stop at the stage checks, after the probe
            ordercomp.compress(TinyNet(classes=100), _loader(), _loader(), config=config_of("E", progress=False),
                               stages={"E": ordercomp.stages.EarlyExit(points=("nowhere",))})


def test_dict_batches_are_read_everywhere(tmp_path):
    """The documented dict form trains, prunes and evaluates like (input, label) tuples."""
    x, y = _digits()
    loader = DataLoader(_Items(lambda i: {"pixel_values": x[i], "labels": int(y[i])}), batch_size=16)
    result = ordercomp.compress(TinyNet(), loader, loader, config=config_of("P", {"calibration_fraction": 0.0}, epochs=1,
                                                                            max_batches=2, progress=False))
    assert result.report["stages"][0]["stage"] == "P"
    assert 0.0 <= result.report["stages"][0]["accuracy"] <= 100.0


def test_resume_with_nothing_saved_says_it_starts_the_run(files, tmp_path, capsys):
    """--resume on a folder with no saved progress (new, or killed before its first stage) runs from
    the first stage, and says so instead of starting silently."""
    out = tmp_path / "new"
    code = main(["compress", "--model-file", str(files["model"]), "--data", "npz", "--data-root", str(files["small"]),
                 "--epochs", "1", "--max-batches", "1", "--quiet", "--order", "P", "--out", str(out), "--resume"])
    assert code == 0 and (out / "model.pt").is_file()
    assert f"--resume: {out} holds no saved progress yet; starting the run from the first stage" in capsys.readouterr().err


def test_a_full_disk_while_saving_is_one_line(files, tmp_path, capsys, monkeypatch):
    """An OSError from the file system (here: no space left) ends the command line with one line
    naming the file, exit code 2, not a traceback."""
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    code = main(["profile", "--model", "resnet8", "--size", "8"])  # writes nothing: still fine
    assert code == 0
    capsys.readouterr()
    code = main(["compress", "--model-file", str(files["model"]), "--data", "npz", "--data-root", str(files["small"]),
                 "--epochs", "1", "--max-batches", "1", "--quiet", "--order", "P", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err


@pytest.mark.parametrize("size,outcome", [(1, "refused"), (4, "warned"), (8, "fine")])
def test_inputs_too_small_for_the_models_downsampling(size, outcome):
    """resnet8 halves its maps twice with 3x3 stride-2 convolutions: at 1x1 the second one would
    downsample a single pixel (refused: 3x3 is the smallest size where no stride-2 layer gets less
    than 2 pixels); at 4x4 it gets 2x2, less than its kernel (warned: 5x5 avoids it)."""
    model = models.create("resnet8", num_classes=10, in_channels=1)
    loader = DataLoader(TensorDataset(torch.randn(10, 1, size, size), torch.arange(10)), batch_size=5)
    run = functools.partial(check_run, model, {"train_loader": loader})
    if outcome == "refused":
        with pytest.raises(DataError, match=r"inputs of 1x1 are too small.*'features.layer2.0.conv1' \(stride 2, "
                                            r"kernel 3\) gets a map of 1 pixel.*smallest input size .* is 3x3"):
            run()
    elif outcome == "warned":
        with pytest.warns(UserWarning, match=r"inputs of 4x4 .*'features.layer3.0.conv1'.* 2 pixel.*kernel.* 5x5"):
            run()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert run() == 10
