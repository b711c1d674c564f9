"""Runners: how one run (a chain of steps) becomes points, in this process or as a ``torchrun`` job.

A runner is any callable ``runner(run_spec) -> points``; :class:`CompressRunner` runs the chain's
last step with :func:`~ordercomp.pipeline.compress`, continuing from the saved model of its
prefix, and :class:`TorchrunRunner` runs it as ``torchrun ... -m ordercomp compress``.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .. import bitops, checkpoint, models, stats
from ..checks import integer
from ..data import LoaderFactory, split_loader, unpack
from ..errors import ConfigError, RunError
from ..nn import ExitNet
from ..pipeline import CommandConfig, CompressConfig, Run, load_result, resolve_device, save_result
from ..stages import NO_EXIT, sweep, thinner_copy
from ..train import Trainer
from .evidence import Point
from .grid import Chain, Step, chain_label

__all__ = ["RunSpec", "CompressRunner", "TorchrunRunner"]


@dataclass(frozen=True)
class RunSpec:
    """One run: the chain of steps, its cache key, where the models of it and its prefix are
    kept, and its seed (0, 1, ...: added to the config's ``train.seed``; a search with ``seeds``
    repeats every run with each)."""

    steps: Chain
    key: str
    parent_key: Optional[str] = None
    model_path: Optional[str] = None
    parent_model_path: Optional[str] = None
    seed: int = 0

    @property
    def order(self) -> str:
        return "".join(letter for letter, _ in self.steps)

    @property
    def label(self) -> str:
        return chain_label(self.steps)


def _loader(obj):
    """A loader, or what a zero-argument factory builds (factories travel to worker processes cheaply)."""
    if callable(obj) and not hasattr(obj, "__iter__"):
        return obj()
    return obj


def _held_out_points(model: nn.Module, report: Dict[str, Any], val, device: torch.device,
                     config: CompressConfig) -> List[Point]:
    """A run's points on the held-out data ``val``, each with its per-input correctness: one per
    threshold of the run's exit sweep when its last stage is an early exit (the thresholds were
    swept on the calibration data; here they are measured), else one."""
    stage = report["stages"][-1]
    teacher_bitops = report["original"]["bitops"]
    if isinstance(model, ExitNet) and stage.get("exit_sweep"):
        example = unpack(next(iter(val)), "val_loader")[0][:2].to(device)
        thresholds = [p["threshold"] for p in stage["exit_sweep"] if p["threshold"] != NO_EXIT]
        return [{"accuracy": p.accuracy, "bitops": p.expected_bitops, "bitops_cr": teacher_bitops / p.expected_bitops,
                 "threshold": p.threshold, "correct": stats.pack_correct(p.correct)}
                for p in sweep(model, val, thresholds, example, model.criterion, device, per_input=True)]
    correct = _trainer(config, device).correct(model, val)[-1]
    return [{"accuracy": 100.0 * float(correct.double().mean()), "bitops": stage["bitops"],
             "bitops_cr": stage["bitops_cr"], "correct": stats.pack_correct(correct)}]


def _trainer(config: CompressConfig, device: torch.device) -> Trainer:
    return Trainer(dataclasses.replace(config.train, progress=False), device, output=config.output)


class CompressRunner:
    """Runs a chain's last step with :func:`compress`, continuing from the saved model of its prefix.

    ``train_loader`` / ``val_loader`` may be loaders or picklable zero-argument factories of them
    (built once per process). ``config.calibration_fraction`` of the training data is held back
    as the calibration data every choice of a run is made on (exit thresholds, when a phase
    stops); its points are measured on the held-out ``val_loader``, with each input's
    correctness (what the verdicts' intervals resample). The empty chain evaluates the original
    model. Each run restarts the loaders' shuffling generators from ``config.train.seed`` plus the
    run's seed, so a run's result does not depend on the runs before it or on the worker that ran it.
    """

    writes_models = True

    def __init__(self, model: nn.Module, train_loader, val_loader, config: CompressConfig):
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.config = config
        self._built = None

    def __getstate__(self):
        return dict(self.__dict__, _built=None)

    def _data(self, seed: int = 0):
        if self._built is None:
            train, calibration = _loader(self.train_loader), None
            if self.config.calibration_fraction:
                train, calibration = split_loader(train, self.config.calibration_fraction, self.config.train.seed)
            self._built = (train, _loader(self.val_loader), calibration)
        train, val, calibration = self._built
        for loader in (train, val):
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(self.config.train.seed + seed)
        return train, val, calibration

    def stage_config(self, step: Step, example_input: torch.Tensor, seed: int = 0) -> CompressConfig:
        """The compress() config of one step: the base config with the step's strength set (and
        ``seed`` added to its ``train.seed``)."""
        letter, value = step
        c = self.config
        if seed:
            c = dataclasses.replace(c, train=dataclasses.replace(c.train, seed=c.train.seed + seed))
        if letter == "D":
            if isinstance(value, str):
                stage = dataclasses.replace(c.distill, student=value)
            else:
                torch.manual_seed(c.train.seed)
                student = thinner_copy(self.model.to(example_input.device), float(value), example_input)
                stage = dataclasses.replace(c.distill, student=student.cpu(), width=None)  # thinned already
            return dataclasses.replace(c, order="D", distill=stage)
        if letter == "P":
            return dataclasses.replace(c, order="P", prune=dataclasses.replace(c.prune, ratio=float(value)))
        if letter == "Q":
            return dataclasses.replace(c, order="Q", quantize=dataclasses.replace(c.quantize, w_bits=value[0],
                                                                                    a_bits=value[1]))
        if letter == "E":
            return dataclasses.replace(c, order="E", early_exit=dataclasses.replace(c.early_exit,
                                                                                    thresholds=tuple(value)))
        stage = c.stage_configs()[letter].at(**dict(value or ()))  # a registered stage at its strength
        return dataclasses.replace(c, order=letter, stages={**c.stages, type(stage).section_name(): stage})

    def __call__(self, run_spec: RunSpec) -> List[Point]:
        train, val, calibration = self._data(run_spec.seed)
        device = resolve_device(self.config.device)
        if not run_spec.steps:
            original = copy.deepcopy(self.model).to(device)
            correct = _trainer(self.config, device).correct(original, val)[-1]
            example = unpack(next(iter(val)), "val_loader")[0][:2].to(device)
            return [{"accuracy": 100.0 * float(correct.double().mean()), "bitops": bitops.profile(original, example).bitops,
                     "bitops_cr": 1.0, "correct": stats.pack_correct(correct)}]
        parent, lineage = self.model, None
        if run_spec.parent_model_path:
            parent, lineage = load_result(run_spec.parent_model_path, model=self.model)
        example = unpack(next(iter(val)), "val_loader")[0][:2].to(device)
        config = self.stage_config(run_spec.steps[-1], example, run_spec.seed)
        with Run.open(parent, train, val, config, calibration_loader=calibration, reference=self.model,
                      lineage=lineage) as run:
            result = run.compress(parent)
        points = _held_out_points(result.model, result.report, val, device, config)
        if run_spec.model_path:
            result.model.cpu()
            result.save(run_spec.model_path)
        return points  # tagged with the run's seed by the search


class TorchrunRunner(CompressRunner):
    """Like :class:`CompressRunner`, but each run is ``torchrun --nproc_per_node=N -m ordercomp compress``.

    ``config``: a :class:`~ordercomp.pipeline.CommandConfig`, whose ``data`` describes the data
    (each run's processes load it themselves), or a CompressConfig (the default data). The
    prefix model and a derived student travel as result files (tensors plus a recipe, nothing
    unpickled); the original model (the reference of the ratios) too when it is a zoo model,
    otherwise the runs read it from ``model_file``, the user's own saved model. Each run's
    directory under ``workdir`` keeps its report and model.
    """

    def __init__(self, model: nn.Module, config: Union[CommandConfig, CompressConfig], nproc: int, workdir,
                 model_file=None):
        integer("nproc", nproc, low=1)
        if model_file is None and models.identify(model) is None:
            raise ConfigError(f"model_file must be given for a model outside the zoo ({type(model).__name__}): "
                              "the file the model was saved to whole, from which each run rebuilds it")
        self.model_file = None if model_file is None else Path(model_file)
        command = config if isinstance(config, CommandConfig) else CommandConfig(config)
        settings = command.data.loader_settings(command.compress.train.seed)
        super().__init__(model, LoaderFactory(settings, "train_loader"), LoaderFactory(settings, "val_loader"),
                         command.compress)
        self.data = command.data
        self.nproc = nproc
        self.workdir = Path(workdir)

    def _original_file(self, example: torch.Tensor) -> Path:
        """The file the runs rebuild the original model from: ``model_file``, else a result file saved once."""
        if self.model_file is not None:
            return self.model_file
        original = self.workdir / "original.pt"
        if not original.exists():
            save_result(original, self.model, example.shape[1:])
        return original

    def __call__(self, run_spec: RunSpec) -> List[Point]:
        if not run_spec.steps:
            return super().__call__(run_spec)
        run_dir = self.workdir / run_spec.key  # the run's directory; its inputs go beside it
        _, val, _ = self._data(run_spec.seed)
        example = unpack(next(iter(val)), "val_loader")[0][:2]
        original = self._original_file(example)
        config = self.stage_config(run_spec.steps[-1], example, run_spec.seed)
        extra, student = [], None
        if isinstance(config.distill.student, nn.Module):
            student = config.distill.student
            extra = ["--student-file", str(save_result(self.workdir / f"{run_spec.key}.student.pt", student,
                                                       example.shape[1:]))]
            config = dataclasses.replace(config, distill=dataclasses.replace(config.distill, student=None))
        registered = {type(stage).__module__ for letter, stage in config.stage_configs().items() if letter not in "DPQE"}
        for module in sorted(registered - {"__main__"}):
            extra += ["--stage-module", module]  # each run's processes register the stages its config names
        config_file = CommandConfig(config, self.data).save(self.workdir / f"{run_spec.key}.config.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                   "-m", "ordercomp", "compress", "--model-file", str(run_spec.parent_model_path or original),
                   "--reference-file", str(original), "--config", str(config_file),
                   "--out", str(run_dir), "--overwrite", "--quiet", *extra]  # an unfinished earlier try is redone
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RunError(f"torchrun run {run_spec.label} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        if run_spec.model_path:
            data = (run_dir / "model.pt").read_bytes()
            checkpoint.atomic_write(run_spec.model_path, lambda f: f.write(data))
        model = load_result(run_dir / "model.pt", model=self.model, student=student)[0]
        device = resolve_device(config.device)
        return _held_out_points(model.to(device), checkpoint.read_json(run_dir / "report.json"), val, device, config)
