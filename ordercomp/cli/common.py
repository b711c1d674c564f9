"""What every command shares: the config flags, reading the config, the data, model files and the teacher."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Optional, Tuple

import torch

from .. import checkpoint, data, models, results
from ..errors import ArgumentTypeError, BadFileError, ConfigError, DataError, MissingFileError, ModelError, reason
from ..pipeline import (STATE_FIX, CommandConfig, CompressConfig, Lineage, check_inputs, load_result, read_state, resolve_device,
                        save_result)
from ..train import Trainer

__all__ = ["TRUSTED", "add_config_flags", "add_stage_module_flag", "import_stage_modules", "add_model_flags", "config_from", "load_data", "loader_factories",
           "read_model", "read_run_model", "read_weights", "given_model", "check_model_data", "data_label", "trained_teacher",
           "read_run", "final_model_file", "run_data"]

TRUSTED = ("the user's own model saved whole with torch.save(model, path): trusted code, it is unpickled; "
           "or a result file ordercomp wrote (read weights-only)")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and the data / device shortcuts."""
    p.add_argument("--config", type=Path, help="YAML or JSON config file (see CommandConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set prune.ratio=0.3 (repeatable)")
    add_stage_module_flag(p)
    p.add_argument("--data", help=f"dataset: one of {', '.join(data.names())}")
    p.add_argument("--data-root", help="folder (or .npz file) holding the dataset")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--limit", type=int, help="use only this many training samples")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")


def add_stage_module_flag(p: argparse.ArgumentParser) -> None:
    """``--stage-module MODULE`` (repeatable): imported before the config is read."""
    p.add_argument("--stage-module", dest="stage_modules", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (e.g. mypkg.stages, trusted code): the stages it registers with "
                        "ordercomp.register_stage can then be used in the order and set with --config / --set, "
                        "and a run that used them read back (repeatable)")


def add_model_flags(p: argparse.ArgumentParser, what: str) -> None:
    """``--model`` / ``--model-file`` (one of them required), ``--weights``, ``--epochs`` and friends."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=models.names(), metavar="NAME", help=f"zoo model: {', '.join(models.names())}")
    source.add_argument("--model-file", type=Path, help=f"the model to {what}: {TRUSTED}")
    p.add_argument("--weights", type=Path, help="state dict for --model, read weights-only (otherwise the teacher "
                                                "is trained first)")
    p.add_argument("--epochs", type=int, help="epochs of every training phase (overrides the config)")
    p.add_argument("--max-batches", type=int, help="batches per epoch of every training phase")
    p.add_argument("--teacher-epochs", type=int, help=f"epochs to train a fresh --model before you {what} it")


def import_stage_modules(names) -> None:
    """Imports each module named (``--stage-module``), so that the stages it registers are known."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"--stage-module {name!r} cannot be imported: {exc}") from None


def config_from(args) -> CommandConfig:
    """The stage modules, the config file (or the defaults), then every ``--set``, then the shortcut flags."""
    import_stage_modules(getattr(args, "stage_modules", []))
    config = CommandConfig.load(args.config) if args.config else CommandConfig()
    config = config.override(args.overrides)
    sets = []
    for flag, key in (("data", "data.name"), ("data_root", "data.root"), ("batch_size", "data.batch_size"),
                      ("limit", "data.limit"), ("device", "device"), ("order", "order"),
                      ("target_loss", "target_loss"), ("teacher_epochs", "teacher_epochs"),
                      ("calibration_fraction", "calibration_fraction"), ("max_probes", "budget.max_probes"),
                      ("time_budget", "budget.time_budget"), ("cost", "budget.cost")):
        value = getattr(args, flag, None)
        if value is not None:  # text quoted, so that a root named 123 or yes stays text
            sets.append(f"{key}={value if isinstance(value, (int, float)) else json.dumps(value)}")
    config = config.override(sets)
    return config.with_shortcuts(epochs=getattr(args, "epochs", None), max_batches=getattr(args, "max_batches", None),
                                 progress=False if getattr(args, "quiet", False) else None)


def load_data(config: CommandConfig) -> data.DataBundle:
    """The loaders ``config.data`` describes, shuffled and augmented from the trainer's seed, with
    ``calibration_fraction`` of the training split held back (un-augmented) as calibration data."""
    return data.load(**config.data.loader_settings(config.compress.train.seed, config.compress.calibration_fraction))


def loader_factories(config: CommandConfig) -> Tuple[data.LoaderFactory, data.LoaderFactory]:
    """Picklable factories of the training and validation loaders of ``config.data`` (for worker processes)."""
    settings = config.data.loader_settings(config.compress.train.seed)
    return data.LoaderFactory(settings, "train_loader"), data.LoaderFactory(settings, "val_loader")


def read_model(path, template: Optional[torch.nn.Module] = None,
               what: str = "--model-file") -> Tuple[torch.nn.Module, Optional[Lineage]]:
    """A model file and, for a result file ordercomp wrote, its lineage. Result files are read
    weights-only (a model outside the zoo is rebuilt on ``template``'s architecture); a file
    holding pickled objects is the user's own model saved whole, and is unpickled. Errors name
    the flag ``what``."""
    try:
        try:
            return load_result(path, model=template, student=template)
        except results.NotAResultError as e:
            if not e.pickled:
                raise
        return checkpoint.load_model(path), None
    except (ModelError, MissingFileError) as e:
        hint = (" (a state dict goes to --weights, with --model NAME)" if "state dict" in str(e)
                and what == "--model-file" else "")
        raise type(e)(f"{what}: {e}{hint}") from e


def read_run_model(path, template: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """A model file of a run directory (``model.pt``, ``stageK_X.pt``): a result file, read
    weights-only and never unpickled: ordercomp writes only result files there, so a file holding
    pickled objects was put there by something else (``template``: the original, for a model
    outside the zoo)."""
    try:
        return load_result(path, model=template, student=template)[0]
    except results.NotAResultError as e:
        if not e.pickled:
            raise
        raise ModelError(f"{path} holds pickled Python objects, which ordercomp never unpickles from a run "
                         "directory (it writes result files there, so this file was replaced): compress again "
                         "into a fresh --out, or export your own model with ordercomp.export") from None


def read_weights(path, model: torch.nn.Module) -> torch.nn.Module:
    """Loads a state dict (read weights-only) into ``model``."""
    if not Path(path).is_file():
        raise MissingFileError(f"--weights: no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ModelError(f"--weights {path}: not a state dict saved with torch.save(model.state_dict(), path): "
                         f"{reason(e)}") from e
    if not isinstance(state, dict):
        raise ModelError(f"--weights {path}: must hold a state dict (a dict of tensors), got a {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines()[1:] if line.strip()]
        detail = "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "") if lines else str(e)
        raise ModelError(f"--weights {path}: not a state dict of this {type(model).__name__} "
                         f"(--model with the data's classes and channels): {detail}") from e
    return model


def given_model(args, bundle, template: Optional[torch.nn.Module] = None
                ) -> Tuple[Optional[torch.nn.Module], Optional[Lineage]]:
    """The model ``--model-file`` or ``--model`` with ``--weights`` names (and its lineage), or
    ``(None, None)`` when ``--model`` is still to be trained."""
    if args.model_file:
        return read_model(args.model_file, template)
    if args.weights:
        return read_weights(args.weights, models.create(args.model, num_classes=bundle.num_classes,
                                                        in_channels=bundle.in_channels)), None
    return None, None


def data_label(bundle: data.DataBundle, config: CommandConfig) -> str:
    """How errors about the data name it: ``--data NAME (ROOT)``."""
    return f"--data {bundle.name} ({config.data.root or 'the default root'})"


def check_model_data(model: torch.nn.Module, bundle: data.DataBundle, config: CommandConfig, out: Optional[Path],
                     reference: Optional[torch.nn.Module] = None) -> None:
    """The pre-flight check before any training (:func:`ordercomp.pipeline.check_inputs`), the
    model with as many classes as the data: a 100-class model scored on 10-class data is refused,
    not reported as 0 %."""
    check_inputs(model, {"train_loader": bundle.train_loader, "val_loader": bundle.val_loader,
                         "calibration_loader": bundle.calibration_loader}, config.compress, reference=reference, out=out,
                 classes=bundle.num_classes, data_label=data_label(bundle, config))


def read_run(run: Path, stage_modules=()) -> Tuple[dict, CompressConfig]:
    """``(state, config)`` of a run directory, its ``state.json`` checked (see :func:`read_state`);
    ``stage_modules`` are imported first (the modules registering the stages the run used)."""
    import_stage_modules(stage_modules)
    state_file = run / "state.json"
    if not state_file.exists():
        raise MissingFileError(f"{run} is not a run directory (no state.json)")
    state = read_state(run)
    try:
        return state, CompressConfig.from_dict(state["config"])
    except (ConfigError, ArgumentTypeError) as e:
        raise BadFileError(f"{state_file}: its config is not valid ({e}); {STATE_FIX}") from None


def final_model_file(run: Path, state: dict) -> Path:
    """The run's final model, or its last finished stage's."""
    if (run / "model.pt").exists():
        return run / "model.pt"
    if not state["model_file"]:
        raise ConfigError(f"{run} holds no finished stage yet")
    return run / state["model_file"]


def run_data(run: Path, state: dict, data_root: Optional[str] = None, **changes) -> data.DataBundle:
    """The run's own data, rebuilt from its record (at ``data_root`` when given; ``changes``
    override loader settings) and checked against the fingerprint of its validation data."""
    recorded = state.get("data") or {}
    origin = recorded.get("origin")
    if origin is None:
        raise ConfigError(f"{run} was made with loaders passed to compress(), so its data is not recorded: "
                          "give --data (and --data-root) to name the data")
    settings = dict(origin["settings"], **({"root": data_root} if data_root else {}))
    bundle = data.load(**dict(settings, **changes))
    found, saved = data.fingerprint(getattr(bundle, origin["loader"])), recorded.get("val")
    if saved is not None and found != saved:
        raise DataError(f"the data at {settings['root']} is not the data {run} was validated on "
                        f"({saved['size']} samples, hash {saved['hash']} then; {found['size']} samples, hash "
                        f"{found['hash']} now): give --data-root to where that data is now, or --data to use "
                        "other data")
    return bundle


def trained_teacher(name: str, config: CommandConfig, bundle, out: Optional[Path], dist,
                    reuse: bool, held=None) -> torch.nn.Module:
    """Zoo model ``name`` trained on ``bundle`` (``teacher_epochs``, else the trainer's epochs); it is
    saved to ``out/teacher.pt`` and, with ``reuse``, read back from there when that file exists.
    ``held``: the claim of ``out`` (see :func:`ordercomp.pipeline.claim`), told before the first file is written."""
    teacher_file = out / "teacher.pt" if out else None
    if reuse and teacher_file is not None and teacher_file.exists():
        return results.load(teacher_file)
    torch.manual_seed(config.compress.train.seed)  # the initial weights too: a rerun trains the same teacher
    data.reseed(bundle.train_loader, config.compress.train.seed)
    model = models.create(name, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    epochs = config.teacher_epochs or config.compress.train.epochs
    if dist.is_main:
        print(f"training the {name} teacher for {epochs} epoch(s) on {bundle.name}", flush=True)
    device = dist.device if dist.active else resolve_device(config.compress.device)
    teacher_cfg = dataclasses.replace(config.compress.train, epochs=epochs, min_steps=0)  # the epochs asked for
    Trainer(teacher_cfg, device, ddp=dist.active).fit(model, bundle.train_loader, desc="teacher")
    model.cpu()
    if teacher_file is not None and dist.is_main:
        if held is not None:
            held.begin()
        save_result(teacher_file, model, data.unpack(next(iter(bundle.val_loader)))[0].shape[1:])
    dist.barrier()
    return model
