"""The accuracy budget: ``target_loss`` picks each stage's strength for the most compression within it.

An adaptation of NNCF's adaptive compression-level loop to a chain of stages. The loss is
always the whole model's so far, against the original, on the calibration data.

- **Split.** Before stage *i* the loss already spent is *L*; the stage may bring it up to
  ``L + (B - L) * s_i / sum(s_j, j >= i)`` (``shares`` *s*, equal by default), so the last stage
  may use all that is left of the budget *B*, and a stage that costs less than its part leaves
  more to the next.
- **Anchor.** The stage first runs as configured, fully trained: its real loss.
- **Probes.** Strengths are then probed on a ladder from weak to strong (D: the student's width,
  P: the pruning ratio, Q: weight bits, then activation bits), each from the stage's input
  model with ``probe_epochs`` of training (D: its training phase only). A probe's estimated
  loss is the anchor's real loss plus how much less accurate it is than the anchor probed the
  same way, so short training is no handicap. From the anchor the search moves stronger while
  the estimate fits the stage's allowance and weaker while it does not, halving its step when
  the direction flips and stopping when the step reaches 0 or comes back to a probed level;
  then more levels next to the boundary until ``min_probes`` were probed.
- **Choice.** The strongest strength estimated within the allowance (else the least lossy) runs
  fully trained; it is kept when its real loss fits (or is lower than the anchor's when neither
  fits), else the anchor is kept.
- **E** probes nothing: its threshold sweep on the calibration data is the search, with the
  allowance as its bound (``max_accuracy_loss`` against the original's calibration accuracy).

``max_probes`` and ``time_budget`` (seconds of probing) bound the search; a stage whose search was
cut keeps what it found. Every probe and full run is checkpointed in a run directory
(``probes/``), so a resumed run repeats none that finished. A budget that cannot be met gives the
least lossy result and the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import nn

from .. import bitops, checkpoint, checks, results, stats
from ..errors import ConfigError
from ..stages import Context, Distill, EarlyExit, Prune, Quantize, Stage, StageResult
from ..stages.quantize import A_BITS, W_BITS
from .runner import Lineage, exit_settings_at, run_stage, spec_of, stage_calibration_accuracy

__all__ = ["BudgetConfig", "Controller", "ProbeStore", "knobs"]


@dataclass
class BudgetConfig:
    """How ``target_loss`` picks strengths (see the module text).

    ``probe_epochs``: epochs of each phase of a probe. ``min_probes``: strengths probed per varied
    setting at least (the anchor counts). ``max_probes`` / ``time_budget`` (seconds): bounds on
    the probes and full runs beyond the anchors, None for none. ``shares``: each stage's part of
    the budget, by letter (a missing letter counts 1). ``widths`` / ``ratios`` / ``w_bits`` /
    ``a_bits``: the ladders searched, from weak to strong.
    """

    probe_epochs: int = 1
    min_probes: int = 3
    max_probes: Optional[int] = None
    time_budget: Optional[float] = None
    shares: Dict[str, float] = field(default_factory=lambda: {"D": 1.0, "P": 1.0, "Q": 1.0, "E": 1.0})
    widths: Sequence[float] = (1.0, 0.75, 0.5, 0.375, 0.25)
    ratios: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    w_bits: Sequence[int] = (8, 6, 4, 3, 2)
    a_bits: Sequence[int] = (8, 6, 4)

    def __post_init__(self) -> None:
        checks.integer("budget.probe_epochs", self.probe_epochs, 1)
        checks.integer("budget.min_probes", self.min_probes, 1)
        checks.integer("budget.max_probes", self.max_probes, 0, optional=True)
        checks.number("budget.time_budget", self.time_budget, 0, optional=True)
        if not isinstance(self.shares, dict):
            raise ConfigError(f"budget.shares must be a mapping of stage letters to weights, got {self.shares!r}")
        for letter, share in self.shares.items():
            checks.number(f"budget.shares[{letter!r}]", share, 0, low_open=True)
        self.widths = _ladder("budget.widths", self.widths, lambda n, v: checks.number(n, v, 0, 1, low_open=True))
        self.ratios = _ladder("budget.ratios", self.ratios,
                              lambda n, v: checks.number(n, v, 0, 1, high_open=True))
        self.w_bits = _ladder("budget.w_bits", self.w_bits, lambda n, v: checks.bits(n, v, *W_BITS))
        self.a_bits = _ladder("budget.a_bits", self.a_bits, lambda n, v: checks.bits(n, v, *A_BITS))

    def share(self, letter: str) -> float:
        return float(self.shares.get(letter, 1.0))


def _ladder(name: str, values, check) -> Tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{name} must be a non-empty list, got {values!r}")
    for i, v in enumerate(values):
        check(f"{name}[{i}]", v)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} must not repeat a value, got {list(values)!r}")
    return tuple(values)


def knobs(stage: Stage, config: BudgetConfig) -> List[Tuple[str, Tuple]]:
    """``[(setting, ladder from weak to strong)]`` searched for ``stage`` (one after the other)."""
    if isinstance(stage, Distill):
        return [("width", config.widths)]
    if isinstance(stage, Prune):
        return [("ratio", config.ratios)]
    if isinstance(stage, Quantize):
        return [("w_bits", config.w_bits), ("a_bits", config.a_bits)]
    return []


def _current(stage: Stage, setting: str, context: Context):
    if setting == "width":
        return stage.student_width(context.spec)
    return getattr(stage, setting)


def _start(ladder: Sequence, value) -> int:
    """The ladder index nearest to ``value``."""
    return min(range(len(ladder)), key=lambda i: (abs(float(ladder[i]) - float(value)), i))


def _key(step: int, kind: str, strength: Dict[str, Any]) -> str:
    return f"{step}-{kind}-" + "-".join(f"{k}{v}" for k, v in sorted(strength.items()))


class ProbeStore:
    """``probes/`` of a run directory: ``probes.json`` (every probe and full run, in order) and
    the models of full runs as result files, so a resumed run repeats none of them.
    ``before_write`` runs before each save (the run directory writes its config and state first,
    clearing an overwritten run's files); ``resume``: the probes already there are this run's
    (otherwise they belong to a run being overwritten, and are not read)."""

    def __init__(self, path, input_shape: Sequence[int], writer: bool = True,
                 before_write: Optional[Callable[[], None]] = None, resume: bool = True):
        self.path = Path(path)
        self.input_shape = list(input_shape)
        self.writer = writer
        self.before_write = before_write
        self.resume = resume

    def entries(self) -> List[Dict[str, Any]]:
        index = self.path / "probes.json"
        return checkpoint.read_json(index) if self.resume and index.is_file() else []

    def save(self, entries: List[Dict[str, Any]], key: Optional[str] = None, result: Optional[StageResult] = None,
             lineage: Optional[Lineage] = None) -> None:
        if not self.writer:
            return
        if self.before_write is not None:
            self.before_write()
        self.path.mkdir(parents=True, exist_ok=True)
        if result is not None:
            recipe = results.recipe(result.model, original=lineage.original, base=lineage.base,
                                    input_shape=self.input_shape, info={"probe": key})
            results.save(self.path / f"{key}.pt", result.model, recipe)
        checkpoint.write_json(self.path / "probes.json", entries)

    def load_full(self, entry: Dict[str, Any], original: nn.Module, student: Optional[nn.Module],
                  context: Context) -> Tuple[StageResult, Lineage]:
        model, recipe = results.load_with_recipe(self.path / f"{entry['key']}.pt", model=original, student=student)
        saved = entry["result"]
        model = model.to(context.device)
        result = StageResult(**saved, model=model, profile=bitops.profile(model, context.example_input),
                             correct=stats.unpack_correct(entry["correct"]))
        return result, Lineage(recipe["original"], recipe["base"])


class Controller:
    """Runs a plan under an accuracy budget of ``target_loss`` pp against ``baseline`` (the
    original's calibration accuracy); see the module text. ``seed(step, salt)`` seeds a run."""

    def __init__(self, config: BudgetConfig, target_loss: float, baseline: float, seed: Callable[[int, str], None],
                 store: Optional[ProbeStore] = None, student: Optional[nn.Module] = None,
                 original: Optional[nn.Module] = None, log: Optional[Callable[[str], None]] = None):
        self.config = config
        self.target = float(target_loss)
        self.baseline = float(baseline)
        self.seed = seed
        self.store = store
        self.student = student
        self.original = original
        self.log = log
        self.entries: List[Dict[str, Any]] = store.entries() if store is not None else []
        self._cache = {e["key"]: e for e in self.entries}
        self.stopped: Optional[str] = None

    # -- accounting -----------------------------------------------------------------------------
    def allowance(self, plan: Sequence[Stage], step: int, spent: float) -> float:
        """The loss (pp) the model may have after ``plan[step]``: its share of what is left."""
        weights = [self.config.share(s.letter) for s in plan[step:]]
        return spent + (self.target - spent) * weights[0] / sum(weights)

    def loss(self, accuracy: float) -> float:
        return self.baseline - accuracy

    def _spent_probing(self) -> Tuple[int, float]:
        extra = [e for e in self.entries if not e.get("anchor")]
        return len(extra), sum(e["seconds"] for e in extra)

    def _may_probe(self) -> bool:
        count, seconds = self._spent_probing()
        if self.config.max_probes is not None and count >= self.config.max_probes:
            self.stopped = self.stopped or f"max_probes ({self.config.max_probes}) reached"
        elif self.config.time_budget is not None and seconds >= self.config.time_budget:
            self.stopped = self.stopped or f"time_budget ({self.config.time_budget:g} s) spent"
        else:
            return True
        return False

    # -- running --------------------------------------------------------------------------------
    def run(self, model: nn.Module, plan: List[Stage], context: Context, lineage: Lineage,
            done: Sequence[Dict[str, Any]] = ()) -> Iterator[Tuple[int, StageResult, nn.Module, Dict[str, Any]]]:
        """Runs the stages of ``plan`` after those ``done`` (their decisions, when resuming; ``model``
        is then the last one's), yielding ``(step, result, model, decision)`` after each stage.
        ``plan`` gets the chosen strengths and E its bound, so later stages re-choose exit
        thresholds as an uninterrupted run would."""
        for decision in done:
            self._settle(plan, decision["step"] - 1, decision)
        current, spent = model, (done[-1]["loss"] if done else 0.0)
        for step in range(len(done), len(plan)):
            allowance = self.allowance(plan, step, spent)
            self._settle(plan, step, {"allowance": allowance, "strength": {}})
            result, kept_lineage, decision = self._stage(plan, step, current, context, allowance, lineage)
            self._settle(plan, step, decision)
            lineage.original, lineage.base = kept_lineage.original, kept_lineage.base
            context.spec = spec_of(lineage.base)
            current = result.model
            spent = self.loss(stage_calibration_accuracy(result))
            decision.update(loss=spent, within=spent <= allowance + 1e-9)
            yield step, result, current, decision

    def _settle(self, plan: List[Stage], step: int, decision: Dict[str, Any]) -> None:
        """``plan[step]`` at the decided strength; an E bounded by its part of the budget."""
        stage = dataclasses.replace(plan[step], **decision["strength"])
        if isinstance(stage, EarlyExit):
            stage = dataclasses.replace(stage, max_accuracy_loss=max(0.0, min(100.0, decision["allowance"])),
                                        baseline=self.baseline)
        plan[step] = stage

    def _stage(self, plan: List[Stage], step: int, model: nn.Module, context: Context, allowance: float,
               lineage: Lineage) -> Tuple[StageResult, Lineage, Dict[str, Any]]:
        stage = plan[step]
        settings = knobs(stage, self.config)
        anchor_strength = {name: _current(stage, name, context) for name, _ in settings}
        anchor = self._full(plan, step, anchor_strength, model, context, lineage, anchor=True)
        decision = {"step": step + 1, "stage": stage.letter, "allowance": allowance, "strength": anchor_strength,
                    "searched": [name for name, _ in settings]}
        if not settings:
            return anchor[0], anchor[1], decision
        anchor_loss = self.loss(stage_calibration_accuracy(anchor[0]))
        chosen = dict(anchor_strength)
        for name, ladder in settings:
            chosen = self._search(plan, step, model, context, name, ladder, chosen, anchor_strength, anchor_loss,
                                  allowance)
        if chosen == anchor_strength:
            return anchor[0], anchor[1], decision
        if not self._may_probe():
            decision["not_run"] = chosen  # no probing budget left for its full run
            return anchor[0], anchor[1], decision
        other = self._full(plan, step, chosen, model, context, lineage)
        other_loss = self.loss(stage_calibration_accuracy(other[0]))
        if other_loss <= allowance + 1e-9 or (anchor_loss > allowance and other_loss < anchor_loss):
            decision["strength"] = chosen
            return other[0], other[1], decision
        decision["rejected"] = chosen  # the estimate was too hopeful: the anchor stays
        return anchor[0], anchor[1], decision

    def _search(self, plan, step, model, context, name: str, ladder: Sequence, base: Dict[str, Any],
                anchor_strength: Dict[str, Any], anchor_loss: float, allowance: float) -> Dict[str, Any]:
        """The strength (``base`` with ``name`` set) estimated strongest within ``allowance``."""
        reference = self._probe(plan, step, model, context, anchor_strength)
        if reference is None:
            return base
        estimates: Dict[int, float] = {}

        def estimate(i: int) -> Optional[float]:
            if i not in estimates:
                entry = self._probe(plan, step, model, context, dict(base, **{name: ladder[i]}))
                if entry is None:
                    return None
                estimates[i] = anchor_loss + reference["calibration_accuracy"] - entry["calibration_accuracy"]
                entry.setdefault("estimated_loss", estimates[i])
            return estimates[i]

        i, stride, direction = _start(ladder, base[name]), max(1, len(ladder) // 3), 0
        while (value := estimate(i)) is not None:
            d = 1 if value <= allowance + 1e-9 else -1
            if direction and d != direction:
                stride //= 2
            direction = d
            nxt = min(max(i + d * stride, 0), len(ladder) - 1)
            if stride == 0 or nxt in estimates:
                break
            i = nxt
        while len(estimates) < min(self.config.min_probes, len(ladder)):
            if estimate(_next_level(estimates, allowance, len(ladder))) is None:
                break
        if not estimates:
            return base
        within = [j for j, v in estimates.items() if v <= allowance + 1e-9]
        best = max(within) if within else min(estimates, key=lambda j: (estimates[j], j))
        return dict(base, **{name: ladder[best]})

    def _probe(self, plan, step, model, context, strength: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A short run of ``plan[step]`` at ``strength``, measured on the calibration data (cached)."""
        key = _key(step, "probe", strength)
        if key in self._cache:
            return self._cache[key]
        if not self._may_probe():
            return None
        stage = dataclasses.replace(plan[step], **strength)
        if isinstance(stage, Distill):
            stage = dataclasses.replace(stage, finetune=False)  # its training phase says enough
        probe_context = dataclasses.replace(
            context, train=dataclasses.replace(context.train, epochs=self.config.probe_epochs),
            val_loader=context.calibration)
        self.seed(step, key)
        result = run_stage(stage, copy.deepcopy(model), probe_context, exit_settings=exit_settings_at(plan, step))
        entry = self._entry(key, step, plan[step].letter, strength, result, kind="probe")
        entry["calibration_accuracy"] = result.accuracy  # measured on the calibration data
        return self._add(entry)

    def _full(self, plan, step, strength, model, context, lineage: Lineage,
              anchor: bool = False) -> Tuple[StageResult, Lineage]:
        """``plan[step]`` at ``strength``, fully trained (cached with its model in the run directory)."""
        key = _key(step, "full", strength)
        if key in self._cache and self.store is not None:
            return self.store.load_full(self._cache[key], self.original, self.student, context)
        own = Lineage(dict(lineage.original), dict(lineage.base))
        full_context = dataclasses.replace(context)
        self.seed(step, "" if anchor else key)
        result = run_stage(dataclasses.replace(plan[step], **strength), copy.deepcopy(model), full_context,
                           exit_settings=exit_settings_at(plan, step), lineage=own)
        entry = self._entry(key, step, plan[step].letter, strength, result, kind="full", anchor=anchor)
        entry["calibration_accuracy"] = stage_calibration_accuracy(result)
        entry["result"] = result.to_dict()
        entry["correct"] = stats.pack_correct(result.correct)
        self._add(entry, result, own)
        return result, own

    def _entry(self, key, step, letter, strength, result: StageResult, kind: str, anchor: bool = False) -> Dict:
        return {"key": key, "step": step + 1, "stage": letter, "kind": kind, "anchor": anchor,
                "strength": dict(strength), "bitops_cr": result.bitops_cr, "seconds": result.seconds}

    def _add(self, entry: Dict[str, Any], result: Optional[StageResult] = None,
             lineage: Optional[Lineage] = None) -> Dict[str, Any]:
        entry["loss"] = self.loss(entry["calibration_accuracy"])
        self.entries.append(entry)
        self._cache[entry["key"]] = entry
        if self.store is not None:
            self.store.save(self.entries, entry["key"] if result is not None else None, result, lineage)
        if self.log is not None:
            strength = ", ".join(f"{k}={v}" for k, v in entry["strength"].items()) or "as configured"
            kind = "anchor" if entry["anchor"] else entry["kind"]
            self.log(f"step {entry['step']} {entry['stage']} {kind} ({strength}): calibration "
                     f"{entry['calibration_accuracy']:.2f} % (loss {entry['loss']:+.2f} pp), "
                     f"BitOpsCR {entry['bitops_cr']:.0f}x, {entry['seconds']:.0f} s")
        return entry

    def summary(self, decisions: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """The report's ``budget`` section, with the stages' ``decisions`` (yielded by :meth:`run`)
        and the loss of the last one."""
        loss = decisions[-1]["loss"] if decisions else None
        return {"target_loss": self.target, "baseline": self.baseline, "shares": dict(self.config.shares),
                "calibration_loss": loss, "met": None if loss is None else loss <= self.target + 1e-9,
                "stopped": self.stopped, "decisions": list(decisions), "probes": [_public(e) for e in self.entries]}


def _public(entry: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("result", "correct")}


def _next_level(estimates: Dict[int, float], allowance: float, n: int) -> int:
    """The unprobed level next to the boundary: above the strongest one within, else the weakest."""
    within = [j for j, v in estimates.items() if v <= allowance + 1e-9]
    target = max(within) + 1 if within else 0
    free = [j for j in range(n) if j not in estimates]
    return min(free, key=lambda j: (abs(j - target), -j))
