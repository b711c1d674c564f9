"""The stage protocol: a config dataclass with ``prepare`` -> training phases -> ``finalize``.

A stage never trains by itself. ``prepare(model, context)`` transforms the model (prunes it,
quantizes it, builds a student, attaches exit heads) and returns a :class:`Prepared`: the new
model and the :class:`Phase` list that trains it. Whoever runs the stage (the pipeline's runner,
or a user's own training loop) fits each phase, then calls ``finalize(model, context)``. So a
stage's pieces can be embedded in any training loop, and a runner can re-run a stage at another
strength cheaply. Stages may change the model they are given in place.

A stage also declares its **strength**: the settings the accuracy budget and the order search
vary, each with a ladder from weakest to strongest (``LADDERS``, overridable per config with
``ladders``), read through :meth:`Stage.strengths` / :meth:`Stage.strength` and set with
:meth:`Stage.at`; ``section`` names its settings in a config (YAML, ``--set section.key=value``).
Settings that BitOps does not see but the clock does (``LATENCY_LADDERS``, e.g. P's channel
multiple) are searched only by a budget that buys measured latency (:meth:`Stage.latency_strengths`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from .. import checks
from ..errors import ConfigError
from ..losses import DistillObjective

__all__ = ["Stage", "Phase", "Prepared", "StageResult"]


@dataclass
class Phase:
    """One training phase of a stage.

    ``objective(model, x, y, index) -> loss`` (None: cross-entropy on every output, see
    :class:`~ordercomp.losses.TaskObjective`); ``params``: what to train (None: every trainable
    parameter of the model and of the objective, e.g. CRD projections); ``frozen``: modules kept
    as they are, batch-norm statistics included; ``epochs``: None for the trainer's;
    ``lr_scale``: learning rate = ``lr * lr_scale`` (None: the fine-tuning rate,
    ``lr * finetune_lr_scale``). ``monitor``: what the calibration signal that ends the phase
    early measures: ``"final"`` (the final classifier's accuracy), ``"heads"`` (the mean accuracy
    of an ExitNet's exit heads) or None (every epoch runs). ``setup(model)`` runs just before the
    phase (e.g. lowers the bits of a quantized model). ``name`` labels the phase in the report
    (``<name>_loss``, ``<name>_epochs``).
    """

    name: str = "finetune"
    objective: Any = None
    params: Optional[Sequence[nn.Parameter]] = None
    frozen: Sequence[nn.Module] = ()
    epochs: Optional[int] = None
    lr_scale: Optional[float] = None
    monitor: Optional[str] = "final"
    setup: Optional[Callable[[nn.Module], None]] = None


@dataclass
class Prepared:
    """What ``prepare`` returns: the transformed model, its training phases and facts worth reporting.

    ``phases=None`` means one fine-tune of all parameters with the task loss at the fine-tuning
    rate; ``[]`` means no training. ``architecture``: set when the stage built a new network
    (D's student) — its description for result files (see :func:`ordercomp.results.architecture`)
    and its ``zoo_spec`` — else None (the model keeps its architecture, maybe with fewer channels).
    """

    model: nn.Module
    phases: Optional[List[Phase]] = None
    info: Dict[str, Any] = field(default_factory=dict)
    architecture: Optional[Dict[str, Any]] = None


@dataclass
class StageResult:
    """The outcome of one stage: the model, its top-1 accuracy (%) on the validation data, and details.

    ``correct``: per validation input (in the loader's order), whether the model got it right;
    ``calibration_correct``: the same per calibration input (what the accuracy budget's margins
    are paired over).

    For an ExitNet the accuracy is that of dynamic inference at the chosen threshold.

    ``info`` holds the stage's own facts (channels removed, bits, the threshold sweep, ...) and
    the training losses (``train_loss`` / ``finetune_loss``: mean loss per epoch). ``profile``
    is the model's :class:`~ordercomp.bitops.Profile` (its per-layer costs).
    """

    stage: str
    model: nn.Module
    accuracy: float
    seconds: float
    macs: float
    params: int
    bitops: float
    bitops_cr: float
    cr: float
    info: Dict[str, Any] = field(default_factory=dict)
    profile: Any = None
    correct: Any = None
    calibration_correct: Any = None

    @property
    def calibration_accuracy(self) -> Optional[float]:
        """The accuracy (%) on the calibration data (at the exit threshold for a model with exits)."""
        if self.info.get("calibration_accuracy") is not None:
            return float(self.info["calibration_accuracy"])
        return float(self.info["exit"]["accuracy"]) if self.exit is not None else None

    @property
    def exit(self) -> Optional[Dict[str, Any]]:
        """The exit threshold choice on the calibration data (:func:`~ordercomp.stages.choose_threshold`),
        None for a model without exits."""
        return self.info.get("exit")

    @property
    def heads_dropped(self) -> bool:
        """An E whose exits did not pay off: the model came back without heads."""
        return bool(self.info.get("heads_dropped"))

    @property
    def epochs(self) -> Dict[str, int]:
        """The epochs each training phase ran, by phase name."""
        return {k[: -len("_epochs")]: v for k, v in self.info.items() if k.endswith("_epochs")}

    def to_dict(self) -> Dict[str, Any]:
        """Everything but the model, its profile and the per-input results, as plain values."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("model", "profile", "correct", "calibration_correct")}


@dataclass
class Stage:
    """Base of the stages; the settings below are keyword-only.

    ``finetune``: fine-tune after the transform at ``lr * finetune_lr_scale`` for at most the
    configured epochs, on the task loss by default. ``kd_alpha`` > 0: fine-tuning distils from the
    original model (``context.teacher``) with loss ``(1 - kd_alpha) * CE + kd_alpha * KD`` (0.9
    did as well on digits, but cost 5 pp on natural images, where the original is a weak teacher).
    ``recalibrate_bn``: re-estimate the batch-norm statistics on training batches after the
    transform and again after training (P and Q change what every layer sees).

    A new method is a subclass with a one-letter class attribute ``letter`` and a ``prepare``,
    registered with :func:`ordercomp.register_stage`; every order can then use its letter. Its
    ``LADDERS`` (``{setting: values from weakest to strongest}``) make the accuracy budget and
    the order search vary it; ``section`` (default: the class name in snake case) is where its
    settings go in a config. ``ladders`` (keyword-only) replaces any of the class's ladders, e.g.
    ``Prune(ladders={"ratio": (0.3, 0.5)})`` or ``--set prune.ladders={ratio: [0.3, 0.5]}``.
    ``LATENCY_LADDERS`` are ladders of settings that change the time a model takes but not its
    BitOps (``ladders`` replaces them too): the accuracy budget searches them, after ``LADDERS``,
    only when it buys measured latency (``budget.cost="latency"``).
    """

    letter: ClassVar[str] = "?"
    section: ClassVar[str] = ""
    LADDERS: ClassVar[Mapping[str, Tuple]] = {}
    LATENCY_LADDERS: ClassVar[Mapping[str, Tuple]] = {}
    finetune: bool = field(default=True, kw_only=True)
    kd_alpha: float = field(default=0.0, kw_only=True)
    recalibrate_bn: bool = field(default=False, kw_only=True)
    mixup: float = field(default=0.0, kw_only=True)
    ladders: Optional[Dict[str, Sequence]] = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.check()
        self._check_ladders()

    @classmethod
    def section_name(cls) -> str:
        """``section``, or the class name in snake case (``EarlyExit`` -> ``early_exit``)."""
        return cls.section or re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def check(self) -> None:
        """Checks the settings alone (no model needed); raises a ConfigError naming the bad one."""
        checks.flag("finetune", self.finetune)
        checks.number("kd_alpha", self.kd_alpha, low=0, high=1)
        checks.flag("recalibrate_bn", self.recalibrate_bn)
        checks.number("mixup", self.mixup, low=0)

    def _check_ladders(self) -> None:
        if self.ladders is None:
            return
        names = sorted({**self.LADDERS, **self.LATENCY_LADDERS})
        if not isinstance(self.ladders, Mapping):
            raise ConfigError(f"ladders must be a mapping of {names} to lists of values, got {self.ladders!r}")
        checked = {}
        for name, values in self.ladders.items():
            if name not in names:
                raise ConfigError(f"ladders has the key {name!r}; {type(self).__name__}'s strength settings are "
                                  f"{names}")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"ladders[{name!r}] must be a non-empty list, got {values!r}")
            values = tuple(tuple(v) if isinstance(v, list) else v for v in values)
            if len(set(values)) != len(values):
                raise ConfigError(f"ladders[{name!r}] must not repeat a value, got {list(values)!r}")
            for i, value in enumerate(values):
                try:
                    dataclasses.replace(self, ladders=None, **{name: value})
                except (ConfigError, TypeError, ValueError) as exc:
                    raise ConfigError(f"ladders[{name!r}][{i}]: {exc}") from None
            checked[name] = values
        self.ladders = checked

    # -- strength -------------------------------------------------------------------------------
    def strengths(self, context=None) -> Dict[str, Tuple]:
        """``{setting: ladder from weakest to strongest}`` that the accuracy budget searches, one
        setting after the other, and the order search draws from ({}: the stage has no strength).
        ``context`` (optional) lets a ladder depend on the model (D's student ladder)."""
        return {name: tuple((self.ladders or {}).get(name, ladder)) for name, ladder in self.LADDERS.items()}

    def strength(self, context=None) -> Dict[str, Any]:
        """The value of each setting of :meth:`strengths` this config runs at."""
        return {name: getattr(self, name) for name in self.strengths(context)}

    def latency_strengths(self) -> Dict[str, Tuple]:
        """``{setting: ladder from weakest to strongest}`` of the settings BitOps does not see but
        the clock does (``LATENCY_LADDERS``, with ``ladders`` applied): the accuracy budget searches
        them after :meth:`strengths` when it buys measured latency, and only then."""
        return {name: tuple((self.ladders or {}).get(name, ladder)) for name, ladder in self.LATENCY_LADDERS.items()}

    def at(self, **strength) -> "Stage":
        """A copy of this config set to ``strength`` (``{setting: value}``)."""
        return dataclasses.replace(self, **strength)

    def label(self, strength: Optional[Mapping[str, Any]] = None) -> str:
        """``P(ratio=0.3)``: the letter and ``strength`` (default: the settings of :meth:`strengths`)."""
        strength = self.strength() if strength is None else strength
        values = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in strength.items())
        return f"{self.letter}({values})" if values else self.letter

    def probing(self) -> "Stage":
        """This config as the accuracy budget's short probe runs it (itself by default; D drops
        its fine-tuning, since its training phase says enough)."""
        return self

    def bounded(self, loss: float, confidence: float) -> "Stage":
        """This config when the accuracy budget lets the model lose at most ``loss`` pp against the
        original on the calibration data, upper bound at ``confidence`` included (itself by
        default: its strength is searched instead; E bounds its own threshold choice)."""
        return self

    def begin(self, model: nn.Module, context, *, exit_settings=None, lineage=None):
        """A :class:`~ordercomp.stages.StageSession` of this stage on ``model``: validated and
        prepared; drive its ``phases`` with any loop, then ``end()`` it for the result."""
        from .session import StageSession  # the session drives stages: imported when one begins

        return StageSession(self, model, context, exit_settings=exit_settings, lineage=lineage)

    def check_model(self, model: nn.Module, context) -> None:
        """:meth:`check`, then the checks that need the model; raises before any training.
        Subclasses extend it."""
        self.check()

    def validate(self, model: nn.Module, context) -> None:
        """Deprecated name of :meth:`check_model`."""
        warnings.warn("Stage.validate(model, context) is now Stage.check_model(model, context)", DeprecationWarning,
                      stacklevel=2)
        self.check_model(model, context)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "validate" in cls.__dict__ and "check_model" not in cls.__dict__:  # a stage written before the rename
            warnings.warn(f"{cls.__name__}.validate(model, context) is now check_model(model, context); "
                          f"it runs under that name", DeprecationWarning, stacklevel=2)
            cls.check_model = cls.__dict__["validate"]

    def prepare(self, model: nn.Module, context) -> Prepared:
        """Transforms ``model`` and says how to train the result. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare(model, context)")

    def finalize(self, model: nn.Module, context) -> Dict[str, Any]:
        """Runs after the phases were trained; returns facts worth reporting (none by default)."""
        return {}

    def objective(self, context):
        """The fine-tuning objective: task loss, or KD from the original model when ``kd_alpha`` > 0."""
        if not self.kd_alpha:
            return None
        return DistillObjective(context.teacher, alpha=self.kd_alpha, gamma=1.0 - self.kd_alpha,
                                output=context.output, mixup=self.mixup)

    def finetune_phases(self, context) -> List[Phase]:
        """``[fine-tune]`` (with :meth:`objective`) when ``finetune`` is on, else ``[]``."""
        return [Phase("finetune", self.objective(context))] if self.finetune else []
