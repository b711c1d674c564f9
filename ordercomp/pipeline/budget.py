"""The accuracy budget: ``target_loss`` picks each stage's strength for the most compression within it.

An adaptation of NNCF's adaptive compression-level loop to a chain of stages. The loss is
always the whole model's so far, against the original, on the calibration data.

- **Confidence.** A loss fits only with its margin: the upper end of a one-sided interval at
  ``confidence`` (0.95; 0.5: the point estimate), ``100 * z * sd(d) / sqrt(n)`` with
  ``d_i = original_correct_i - model_correct_i`` paired over the *n* calibration inputs
  (:func:`ordercomp.stats.paired_loss_bound`). A met budget is then a bound on the loss on
  data the choices never saw, at about that confidence (about: the strengths were chosen on
  the same calibration data), not just the loss on the calibration data.
- **Split.** Before stage *i* the model has the loss *L* (the point estimate); the stage may
  spend its share ``w_i = s_i / sum(s_j, j >= i)`` (``shares`` *s*; D 1, P 1, Q 1.5, E 0.5 by
  default) of what is left of the budget *B* once its margin *m* is set aside: a run fits when
  ``loss <= L + w_i (B - m - L)``, i.e. ``loss + w_i m <= L + w_i (B - L)`` (the stage's
  *allowance*). The margin is the whole model's, so it is counted once, not once per stage; the
  last stage (``w = 1``) must bring the upper bound ``loss + m`` within *B* itself, and a stage
  that costs less than its part leaves more to the next.
- **Anchor.** The stage first runs as configured, fully trained: its real loss and margin.
- **Probes.** Strengths are then probed on the stage's ladders from weak to strong, one setting
  after the other (:meth:`ordercomp.stages.Stage.strengths`; D: the student, then its width, P:
  the pruning ratio, Q: weight bits, then activation bits; any registered stage its own; with
  ``cost="latency"`` then the settings BitOps do not see, :meth:`~ordercomp.stages.Stage.latency_strengths`,
  P: its channel multiple ``round_up_to``), each from the stage's input model with
  ``probe_epochs`` of training (D: its training phase only). A probe's estimated loss is the
  anchor's real loss plus how much less accurate it is than the anchor probed the same way;
  its margin is estimated the same way (the share of answers the anchor changed against the
  original, plus how many more the probe changed than the anchor probed the same way); it fits
  when the estimates do. From the anchor the search moves stronger while the probe fits the
  allowance and weaker while it does not, halving its step when the direction flips and stopping
  when the step reaches 0 or comes back to a probed level; then more levels next to the
  boundary until ``min_probes`` were probed.
- **Choice.** The strongest strength that fits (else the least lossy upper bound) runs fully
  trained; it is kept when its loss fits with its margin (or is lower than the anchor's when
  neither fits). Refused, it steps back: the next strongest probed strengths whose estimates fit
  (by BitOpsCR; with ``cost="latency"`` by speed-up; only those that buy more than the anchor),
  up to ``step_backs`` (2) of them, run fully trained one after the other until one fits; else the
  anchor is kept (the decision lists the refused runs, ``rejected``).
- **Fall back.** A stage over its part leaves less to the later ones; one also over the whole
  budget (loss plus all of its margin) leaves them nothing: its probes misled it (a short probe
  is noisy: an unlucky probe of the anchor makes stronger levels look free). Then levels one step
  weaker than any run so far (the last setting not yet at its weakest) are trained fully, one
  after the other, until one fits its part or the whole budget; the least lossy upper bound is
  kept (on a tie, the stronger). The decision lists them (``fell_back``).
- **Bounded stages.** A stage with no strength is told its allowance
  (:meth:`ordercomp.stages.Stage.bounded`), to be met with its whole margin. E probes nothing:
  its threshold sweep on the calibration data is the search, bounded that way (each threshold's
  loss and margin paired against the original's per-input calibration results,
  ``early_exit.baseline="original"``), so the last stage's bound is the budget's own.
- **Resolution.** A calibration split too small to resolve the smallest share *S* (the last stage
  aside: it takes what is left) is said with the size that would do, before the first stage
  (:meth:`Controller.check_resolution`) and when the first stage's anchor has a margin above *S*
  (:meth:`Controller.check_margin`); the run goes on.
- **Cost.** ``cost="bitops"`` (the default) takes the strongest strength that fits, as above.
  ``cost="latency"`` measures every run's speed-up over the original in ONNX Runtime (a
  :class:`~ordercomp.deploy.latency.LatencyMeter`: exported as deployed, timed interleaved at
  ``latency_batch``), and takes among the probed strengths that fit the fastest, the weakest of
  those within ``LATENCY_TIE`` of it (sub-8-bit weights save size, not time: they leave the budget
  to later stages); E takes the fastest threshold within its bound, "no exit" included.
- **Shared runs.** With ``Run.open(..., probe_cache=DIR)``, a run another budget made
  (:class:`~.probes.SharedProbes`) is read back instead of run again; not with ``cost="latency"``.

``max_probes`` and ``time_budget`` (seconds of probing) bound the search; a stage whose search was
cut keeps what it found. Every probe and full run is checkpointed in a run directory
(``probes/``, with its margin and per-input calibration results), so a resumed run repeats none
that finished. A budget that cannot be met gives the least lossy result and the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import checks, stats
from ..errors import ConfigError
from ..stages import Context, Distill, Prune, Quantize, Stage, StageResult
from .probes import ProbeStore, SharedProbes, public, run_key
from .runner import Lineage, StageRunner, exit_settings_at, run_stage, zoo_spec_of
from .shares import (DEFAULT_SHARES, LATENCY_TIE, Share, fastest, fits, margin_floor, next_level, resolution,
                     smallest_part, start_index, step_backs, weaker)

__all__ = ["BudgetConfig", "Controller", "ProbeStore", "LADDER_KEYS", "start_index", "COSTS", "LATENCY_TIE"]  # ProbeStore: from .probes

COSTS = ("bitops", "latency")

# the ladders BudgetConfig held before they moved to the stages: key -> (stage section, setting, old default)
LADDER_KEYS = {"widths": ("distill", "width", (1.0, 0.75, 0.5, 0.375, 0.25)),
               "ratios": ("prune", "ratio", (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)),
               "w_bits": ("quantize", "w_bits", (8, 6, 4, 3, 2)), "a_bits": ("quantize", "a_bits", (8, 6, 4))}
_LADDER_STAGES = {"distill": Distill, "prune": Prune, "quantize": Quantize}


@dataclass
class BudgetConfig:
    """How ``target_loss`` picks strengths (see the module text).

    ``probe_epochs``: epochs of each phase of a probe. ``min_probes``: strengths probed per varied
    setting at least (the anchor counts). ``step_backs``: when the chosen strength's full run is
    refused, how many of the next strongest probed strengths whose estimates fit are trained fully
    before the anchor stays (0: none). ``max_probes`` / ``time_budget`` (seconds): bounds on
    the probes and full runs beyond the anchors, None for none. ``shares``: each stage's part of
    the budget, by letter (a missing letter counts 1; by default :data:`~.shares.DEFAULT_SHARES`).
    ``confidence``: the one-sided confidence in [0.5, 1) of the upper bound on a loss that must fit
    (0.5: the point estimate).
    ``cost``: what the budget buys, ``"bitops"`` or ``"latency"`` (measured at batch size
    ``latency_batch``; see the module text).
    The ladders searched belong to the stages (``distill.ladders``, ``prune.ladders``, ...; see
    :meth:`ordercomp.stages.Stage.strengths`); ``widths``, ``ratios``, ``w_bits`` and ``a_bits``
    here are their former names, still read (with a ``DeprecationWarning``) and moved there by
    :class:`~ordercomp.pipeline.CompressConfig`.
    """

    confidence: float = 0.95
    probe_epochs: int = 1
    min_probes: int = 3
    step_backs: int = 2
    max_probes: Optional[int] = None
    time_budget: Optional[float] = None
    shares: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    widths: Optional[Sequence[float]] = None
    ratios: Optional[Sequence[float]] = None
    w_bits: Optional[Sequence[int]] = None
    a_bits: Optional[Sequence[int]] = None
    cost: str = "bitops"
    latency_batch: int = 1

    def __post_init__(self) -> None:
        checks.one_of("budget.cost", self.cost, COSTS)
        checks.integer("budget.latency_batch", self.latency_batch, 1)
        checks.number("budget.confidence", self.confidence, 0.5, 1, high_open=True)
        checks.integer("budget.probe_epochs", self.probe_epochs, 1)
        checks.integer("budget.min_probes", self.min_probes, 1)
        checks.integer("budget.step_backs", self.step_backs, 0)
        checks.integer("budget.max_probes", self.max_probes, 0, optional=True)
        checks.number("budget.time_budget", self.time_budget, 0, optional=True)
        if not isinstance(self.shares, dict):
            raise ConfigError(f"budget.shares must be a mapping of stage letters to weights, got {self.shares!r}")
        for letter, share in self.shares.items():
            checks.number(f"budget.shares[{letter!r}]", share, 0, low_open=True)
        for key, (section, setting, _) in LADDER_KEYS.items():
            if getattr(self, key) is not None:
                try:  # checked as the stage will check it
                    _LADDER_STAGES[section](ladders={setting: getattr(self, key)})
                except ConfigError as exc:
                    raise ConfigError(f"budget.{key}: {exc}") from None
                warnings.warn(f"budget.{key} is now {section}.ladders['{setting}'] (the ladders belong to the "
                              f"stages); budget.{key} will be removed", DeprecationWarning, stacklevel=3)

    def share(self, letter: str) -> float:
        return float(self.shares.get(letter, 1.0))

    def moved_ladders(self) -> Dict[str, Dict[str, Sequence]]:
        """``{section: {setting: ladder}}`` of the former ladder keys that were set."""
        out: Dict[str, Dict[str, Sequence]] = {}
        for key, (section, setting, _) in LADDER_KEYS.items():
            if getattr(self, key) is not None:
                out.setdefault(section, {})[setting] = getattr(self, key)
        return out


class Controller:
    """Runs a plan under an accuracy budget of ``target_loss`` pp against ``baseline`` (the
    original's calibration accuracy; ``baseline_correct``: per calibration input, whether the
    original got it right, what every margin is paired against); see the module text.
    ``seed(step, salt)`` seeds a run; ``runner`` runs a stage (:func:`~.runner.run_stage` by default)."""

    def __init__(self, config: BudgetConfig, target_loss: float, baseline: float, baseline_correct: torch.Tensor,
                 seed: Callable[[int, str], None], store: Optional[ProbeStore] = None,
                 student: Optional[nn.Module] = None, original: Optional[nn.Module] = None,
                 log: Optional[Callable[[str], None]] = None, runner: Optional[StageRunner] = None,
                 meter=None, shared: Optional[SharedProbes] = None):
        self.config = config
        self.runner = runner or run_stage
        self.target = float(target_loss)
        self.baseline = float(baseline)
        self.baseline_correct = baseline_correct
        self.seed = seed
        self.store = store
        self.student = student
        self.original = original
        self.log = log
        self.meter = meter  # with cost "latency": .speedup(model), see ordercomp.deploy.latency.LatencyMeter
        # runs other budgets made (a measured speed-up is this run's own: never shared)
        self.shared = shared if shared is not None and config.cost == "bitops" else SharedProbes(None)
        if config.cost == "latency" and meter is None:
            raise ConfigError("budget.cost 'latency' needs a latency meter (compress() makes one)")
        self.entries: List[Dict[str, Any]] = store.entries() if store is not None else []
        self._cache = {e["key"]: e for e in self.entries}
        self.stopped: Optional[str] = None
        self.resolution: Optional[Dict[str, Any]] = None
        self.margin_floor: Optional[Dict[str, Any]] = None
        self._carved, self._warn = None, True  # as check_resolution was told

    # -- accounting -----------------------------------------------------------------------------
    def share(self, plan: Sequence[Stage], step: int, spent: float) -> "Share":
        """What ``plan[step]`` may spend when the model it gets has lost ``spent`` pp (see the module text)."""
        weights = [self.config.share(s.letter) for s in plan[step:]]
        weight = weights[0] / sum(weights)
        return Share(spent, weight, spent + weight * (self.target - spent), self.target)

    def loss(self, accuracy: float) -> float:
        return self.baseline - accuracy

    def margin(self, calibration_correct: Optional[torch.Tensor]) -> float:
        """The margin (pp) of a model's calibration loss at the budget's confidence, paired over the
        calibration inputs against the original (:func:`ordercomp.stats.paired_loss_bound`)."""
        if calibration_correct is None:
            raise ConfigError("the accuracy budget needs every run's per-input calibration results "
                              "(StageResult.calibration_correct), to bound its loss")
        return stats.paired_loss_bound(self.baseline_correct, calibration_correct, self.config.confidence)[1]

    def changed(self, entry: Dict[str, Any]) -> float:
        """The share of calibration inputs a run answers differently from the original (right against wrong)."""
        correct = stats.unpack_correct(entry["calibration_correct"])
        return float((correct != self.baseline_correct.to(correct.device)).double().mean())

    def estimated_margin(self, anchor: Dict[str, Any], reference: Dict[str, Any], probe: Dict[str, Any],
                         loss: float) -> float:
        """A probe's margin corrected for its short training as its loss is: the share of answers
        the anchor changed, plus how many more the probe changed than the anchor probed the same
        way (``reference``), at the estimated ``loss`` (:func:`ordercomp.stats.loss_margin`)."""
        changed = self.changed(anchor) + self.changed(probe) - self.changed(reference)
        return stats.loss_margin(changed, loss, len(self.baseline_correct), self.config.confidence)

    def check_resolution(self, plan: Sequence[Stage], n: int, carved: Optional[Tuple[int, int]] = None,
                         warn: bool = True) -> Optional[Dict[str, Any]]:
        """Whether ``n`` calibration inputs can resolve the smallest share of the budget (see
        :func:`~.shares.resolution`; ``carved``: ``(training samples, calibration samples)`` of a
        split carved from the training data); when not, says so (a warning of the
        ``ordercomp.budget`` logger, with ``warn``). Kept as the report's ``resolution``."""
        self._carved, self._warn = carved, warn
        self.resolution = resolution(self._smallest(plan), n, self.config.confidence, carved)
        if self.resolution is None:
            return None
        if warn:
            logging.getLogger("ordercomp.budget").warning(self.resolution["message"])
        return self.resolution

    def _smallest(self, plan: Sequence[Stage]) -> float:
        return smallest_part(self.target, [self.config.share(s.letter) for s in plan])

    def check_margin(self, plan: Sequence[Stage], warn: bool = True) -> Optional[Dict[str, Any]]:
        """Once the first stage's anchor ran: whether its margin alone exceeds the smallest share
        (:func:`~.shares.margin_floor`), said like :meth:`check_resolution`; kept as the report's
        ``margin_floor`` (None: it does not)."""
        first = next((e for e in self.entries if e["step"] == 1 and e["anchor"]), None)
        self.margin_floor = first and margin_floor(first["margin"], self.changed(first), len(self.baseline_correct),
                                                   self._smallest(plan), self.config.confidence, self._carved)
        if self.margin_floor and warn:
            logging.getLogger("ordercomp.budget").warning(self.margin_floor["message"])
        return self.margin_floor

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
        if done:
            self.check_margin(plan, warn=False)
        current, spent, margin = model, (done[-1]["loss"] if done else 0.0), (done[-1]["margin"] if done else 0.0)
        for step in range(len(done), len(plan)):
            share = self.share(plan, step, spent)
            self._settle(plan, step, {"allowance": share.allowance, "strength": {}})
            result, kept_lineage, decision, kept = self._stage(plan, step, current, context, share, margin, lineage)
            self._settle(plan, step, decision)
            lineage.original, lineage.base = kept_lineage.original, kept_lineage.base
            context.zoo_spec = zoo_spec_of(lineage.base)
            current = result.model
            margin, spent = kept["margin"], kept["loss"]
            decision.update(loss=spent, margin=margin, upper=spent + margin, within=share.fits(spent, margin))
            if "speedup" in kept:
                decision["speedup"] = kept["speedup"]
            yield step, result, current, decision

    def _settle(self, plan: List[Stage], step: int, decision: Dict[str, Any]) -> None:
        """``plan[step]`` at the decided strength, bounded by its allowance at the budget's
        confidence (E: its threshold's loss and margin against the original)."""
        stage = plan[step].at(**decision["strength"])
        plan[step] = stage.bounded(decision["allowance"], self.config.confidence)

    def _stage(self, plan: List[Stage], step: int, model: nn.Module, context: Context, share: "Share",
               incoming_margin: float, lineage: Lineage) -> Tuple[StageResult, Lineage, Dict[str, Any], Dict]:
        """``(result, lineage, decision, entry of the kept full run)`` of ``plan[step]``."""
        stage = plan[step]
        settings = list(stage.strengths(context).items())
        accuracy_settings = list(settings)  # what a fall back weakens (not what only the clock sees)
        anchor_strength = stage.strength(context)
        if self.config.cost == "latency":  # then the settings only the clock sees
            clock = stage.latency_strengths()
            settings += list(clock.items())
            anchor_strength.update({name: getattr(stage, name) for name in clock})
        anchor = self._full(plan, step, anchor_strength, model, context, lineage, anchor=True)
        if step == 0:
            self.check_margin(plan, warn=self._warn)
        decision = {"step": step + 1, "stage": stage.letter, "allowance": share.allowance,
                    "margin_weight": share.weight, "incoming_margin": incoming_margin, "strength": anchor_strength,
                    "searched": [name for name, _ in settings]}
        if not settings:
            return anchor[0], anchor[1], decision, anchor[2]
        chosen = dict(anchor_strength)
        for name, ladder in settings:
            chosen = self._search(plan, step, model, context, name, ladder, chosen, anchor_strength,
                                  anchor[2], share)
        fits, upper = (lambda e: share.fits(e["loss"], e["margin"])), (lambda e: share.upper(e["loss"], e["margin"]))
        kept, tried = anchor, [anchor_strength]
        # The choice, fully trained; refused (its estimate was too hopeful), the next strongest probed
        # strength whose estimate fits, up to ``step_backs`` of them, before the anchor stays.
        candidates = [] if chosen == anchor_strength else [chosen] + step_backs(
            [e for e in self.entries if e["step"] == step + 1], share, anchor[2], [chosen, anchor_strength],
            self.config.cost)[:self.config.step_backs]
        for strength in candidates:
            if not self._may_probe():
                decision["not_run"] = strength  # no probing budget left for its full run
                return kept[0], kept[1], decision, kept[2]
            other = self._full(plan, step, strength, model, context, lineage)
            tried.append(strength)
            if fits(other[2]) or (not fits(kept[2]) and upper(other[2]) < upper(kept[2])):
                decision["strength"], kept = strength, other
            else:
                decision.setdefault("rejected", []).append(strength)
            if fits(other[2]):
                break
        # Over its part, a stage leaves less to the later ones; over the whole budget, it leaves them
        # nothing: the probes misled the search (a short run is noisy). Then fully train one level
        # weaker at a time until one is not, keeping the least lossy.
        while not (fits(kept[2]) or share.within_budget(kept[2]["loss"], kept[2]["margin"])):
            level = weaker(accuracy_settings, tried, decision["strength"])
            if level is None:
                break
            if not self._may_probe():
                decision["not_run"] = level
                break
            run = self._full(plan, step, level, model, context, lineage)
            tried.append(level)
            decision.setdefault("fell_back", []).append(level)
            if fits(run[2]) or upper(run[2]) < upper(kept[2]) - 1e-9:  # a tie keeps the stronger
                decision["strength"], kept = level, run
        return kept[0], kept[1], decision, kept[2]

    def _search(self, plan, step, model, context, name: str, ladder: Sequence, base: Dict[str, Any],
                anchor_strength: Dict[str, Any], anchor: Dict[str, Any], share: "Share") -> Dict[str, Any]:
        """The strongest strength (``base`` with ``name`` set) whose estimated loss fits ``share``
        with its estimated margin (``anchor``: the entry of the stage's anchor run)."""
        reference = self._probe(plan, step, model, context, anchor_strength)
        if reference is None:
            return base
        uppers: Dict[int, float] = {}
        speedups: Dict[int, float] = {}

        def upper(i: int) -> Optional[float]:
            if i not in uppers:
                entry = self._probe(plan, step, model, context, dict(base, **{name: ladder[i]}))
                if entry is None:
                    return None
                speedups[i] = entry.get("speedup", math.nan)
                estimated = anchor["loss"] + reference["calibration_accuracy"] - entry["calibration_accuracy"]
                entry.setdefault("estimated_loss", estimated)
                entry.setdefault("estimated_margin", self.estimated_margin(anchor, reference, entry, estimated))
                uppers[i] = share.upper(estimated, entry["estimated_margin"])
            return uppers[i]

        allowance = share.allowance
        i, stride, direction = start_index(ladder, base[name]), max(1, len(ladder) // 3), 0
        while (value := upper(i)) is not None:
            d = 1 if fits(value, allowance) else -1
            if direction and d != direction:
                stride //= 2
            direction = d
            nxt = min(max(i + d * stride, 0), len(ladder) - 1)
            if stride == 0 or nxt in uppers:
                break
            i = nxt
        while len(uppers) < min(self.config.min_probes, len(ladder)):
            if upper(next_level(uppers, allowance, len(ladder))) is None:
                break
        if not uppers:
            return base
        within = [j for j, v in uppers.items() if fits(v, allowance)]
        if within and self.config.cost == "latency":
            best = fastest(within, speedups)
        else:
            best = max(within) if within else min(uppers, key=lambda j: (uppers[j], j))
        return dict(base, **{name: ladder[best]})

    def _probe(self, plan, step, model, context, strength: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A short run of ``plan[step]`` at ``strength``, measured on the calibration data (cached)."""
        key = run_key(step, "probe", strength)
        if key in self._cache:
            return self._cache[key]
        if not self._may_probe():
            return None
        shared_key, found = self.shared.find(model, plan, step, "probe", strength, False)
        if found is not None:
            return self._add(self._adopted(found, key))
        stage = plan[step].at(**strength).probing()
        probe_context = dataclasses.replace(
            context, train=dataclasses.replace(context.train, epochs=self.config.probe_epochs, min_steps=0),
            val_loader=context.calibration)
        self.seed(step, key)
        result = self.runner(stage, copy.deepcopy(model), probe_context, exit_settings=exit_settings_at(plan, step))
        entry = self._entry(key, step, plan[step].letter, strength, result, kind="probe")
        entry["calibration_accuracy"] = result.accuracy  # measured on the calibration data
        self.shared.put(shared_key, self._add(entry))
        return entry

    def _full(self, plan, step, strength, model, context, lineage: Lineage,
              anchor: bool = False) -> Tuple[StageResult, Lineage, Dict[str, Any]]:
        """``(result, lineage, entry)`` of ``plan[step]`` at ``strength``, fully trained (cached with
        its model in the run directory)."""
        key = run_key(step, "full", strength)
        if key in self._cache and self.store is not None:
            entry = self._cache[key]
            return (*self.store.load_full(entry, self.original, self.student, context), entry)
        shared_key, found = self.shared.find(model, plan, step, "full", strength, anchor)
        if found is not None:
            result, own = self.shared.load_full(shared_key, found, self.original, self.student, context)
            return result, own, self._add(self._adopted(found, key), result, own)
        own = Lineage(dict(lineage.original), dict(lineage.base))
        full_context = dataclasses.replace(context)
        self.seed(step, "" if anchor else key)
        result = self.runner(plan[step].at(**strength), copy.deepcopy(model), full_context,
                           exit_settings=exit_settings_at(plan, step), lineage=own)
        entry = self._entry(key, step, plan[step].letter, strength, result, kind="full", anchor=anchor)
        entry["calibration_accuracy"] = result.calibration_accuracy
        entry["result"] = result.to_dict()
        entry["correct"] = stats.pack_correct(result.correct)
        self.shared.put(shared_key, self._add(entry, result, own), result, own)
        return result, own, entry

    def _adopted(self, found: Dict[str, Any], key: str) -> Dict[str, Any]:
        """A run another budget made, as this run's: its name here, its margin at this confidence."""
        return dict(found, key=key, shared=True,
                    margin=self.margin(stats.unpack_correct(found["calibration_correct"])))

    def _entry(self, key, step, letter, strength, result: StageResult, kind: str, anchor: bool = False) -> Dict:
        """A run's record; its margin and per-input calibration results are kept, so a resumed run
        recomputes nothing."""
        return {"key": key, "step": step + 1, "stage": letter, "kind": kind, "anchor": anchor,
                "strength": dict(strength), "bitops_cr": result.bitops_cr, "seconds": result.seconds,
                "margin": self.margin(result.calibration_correct),
                "calibration_correct": stats.pack_correct(result.calibration_correct),
                **({"speedup": self.meter.speedup(result.model)} if self.config.cost == "latency" else {})}

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
            kind += " (shared)" if entry.get("shared") else ""
            self.log(f"step {entry['step']} {entry['stage']} {kind} ({strength}): calibration "
                     f"{entry['calibration_accuracy']:.2f} % (loss {entry['loss']:+.2f} pp, margin "
                     f"{entry['margin']:.2f}), BitOpsCR {entry['bitops_cr']:.0f}x"
                     + (f", {entry['speedup']:.2f}x faster" if "speedup" in entry else "") + f", {entry['seconds']:.0f} s")
        return entry

    def summary(self, decisions: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """The report's ``budget`` section, with the stages' ``decisions`` (yielded by :meth:`run`)
        and the loss of the last one, its margin and upper bound; ``met``: the upper bound is
        within the target."""
        last = decisions[-1] if decisions else {}
        upper = last.get("upper")
        return {"target_loss": self.target, "baseline": self.baseline, "confidence": self.config.confidence,
                "cost": self.config.cost,
                "shares": dict(self.config.shares), "calibration_loss": last.get("loss"),
                "calibration_margin": last.get("margin"), "calibration_upper": upper,
                "met": None if upper is None else fits(upper, self.target), "resolution": self.resolution,
                "margin_floor": self.margin_floor,
                "stopped": self.stopped, "decisions": list(decisions), "probes": [public(e) for e in self.entries]}

