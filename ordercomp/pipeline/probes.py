"""``probes/`` of a run directory under an accuracy budget: every probe and full run, checked when read back."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import bitops, checkpoint, data, results, stats
from ..errors import BadFileError, RunDirError, reason
from ..stages import Context, StageResult, letters, stage_class
from .runner import Lineage, exit_settings_at

__all__ = ["ProbeStore", "SharedProbes", "shared_base", "PROBES_FIX", "SHARED_FIX"]

PROBES_FIX = ("the run's probes were changed after ordercomp wrote them: compress again with --overwrite or into a "
              "new --out")
_ENTRY_FIELDS = {"key": str, "step": int, "stage": str, "kind": str, "anchor": bool, "strength": dict,
                 "bitops_cr": float, "seconds": float, "margin": float, "calibration_correct": str,
                 "calibration_accuracy": float, "loss": float}
_FULL_FIELDS = {"result": dict, "correct": str}


def run_key(step: int, kind: str, strength: Dict[str, Any]) -> str:
    """A run's name; a whole float is written as the int it equals (a ladder's 32 is the stage's 32.0)."""
    def text(v):
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    return f"{step}-{kind}-" + "-".join(f"{k}{text(v)}" for k, v in sorted(strength.items()))


def public(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A run's record as the report lists it: without its result and per-input results."""
    return {k: v for k, v in entry.items() if k not in ("result", "correct", "calibration_correct")}


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
        """The runs recorded in ``probes.json`` (none unless resuming), each checked."""
        index = self.path / "probes.json"
        if not (self.resume and index.is_file()):
            return []
        entries = checkpoint.read_record(index, {}, PROBES_FIX, kind=list)
        if any(isinstance(e, dict) and "margin" not in e for e in entries):
            raise RunDirError(f"cannot resume from {index}: its runs were recorded without the margins the "
                              "budget now needs (an older ordercomp wrote it); start the run again (overwrite)")
        for i, entry in enumerate(entries):
            where = f"{index}: run {i + 1}"
            _check_entry(entry, where, PROBES_FIX)
            if entry["kind"] == "full":
                checkpoint.file_name(f"{entry['key']}.pt", where, PROBES_FIX, self.path)
        return entries

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
        try:
            result = StageResult(**saved, model=model, profile=bitops.profile(model, context.example_input),
                                 correct=stats.unpack_correct(entry["correct"]),
                                 calibration_correct=stats.unpack_correct(entry["calibration_correct"]))
        except TypeError as e:  # a result record with keys a stage result does not have
            raise BadFileError(f"{self.path / 'probes.json'}: run {entry['key']!r} holds no stage result "
                               f"({reason(e)}); {PROBES_FIX}") from None
        return result, Lineage(recipe["original"], recipe["base"])


def _check_entry(entry: Dict[str, Any], where: str, fix: str) -> None:
    """A recorded run's fields and per-input results, checked before anything trusts them."""
    checkpoint.check_fields(entry, _ENTRY_FIELDS, where, fix)
    if entry["kind"] == "full":
        checkpoint.check_fields(entry, _FULL_FIELDS, where, fix)
    for key in ("calibration_correct", "correct"):
        if key in entry:
            try:
                stats.unpack_correct(entry[key])
            except ValueError:
                raise BadFileError(f"{where}: {key!r} is not a packed list of per-input results; {fix}") from None


SHARED_FIX = "the shared probe directory was changed after ordercomp wrote it: delete it (it is only a cache)"


class SharedProbes:
    """A directory of probes and full runs shared by budgeted runs that differ only in their
    budget (``target_loss``, ``confidence``, the search's bounds and shares) or in the stages
    after some step, which make many of the same runs: every anchor and probe before their
    choices (or plans) part. Every run is filed as
    ``<key>.json`` (and ``<key>.pt``, a result file, for a full run) under a hash of everything
    it depends on: ``base`` (the settings other than the budget's and the stages', the data's
    fingerprints, the original's), the model it starts from (its fingerprint), the plan's stages
    up to it as configured at that point and the exit settings it is measured with (not the stages
    after it), the step, kind, strength and whether it is the anchor. A run another budget already
    made is then read back, not repeated; as runs are seeded from the same keys, what is read
    back is what the run would have computed. Files are written whole (a temporary file, then
    renamed), so processes may share the directory; two that need the same run at once both make
    it. A run read back keeps the name the reading run gives it, and its margin is recomputed at
    the reader's confidence. ``writer``: whether this process writes (rank 0 of a distributed
    run). ``SharedProbes(None)`` shares nothing: it finds no run and files none."""

    def __init__(self, path, base: Optional[Dict[str, Any]] = None, input_shape: Sequence[int] = (),
                 writer: bool = True):
        self.path = Path(path) if path is not None else None
        self.base = base or {}
        settings = self.base.get("settings")
        if isinstance(settings, dict):  # the stages' sections and order: a run's plan holds those it depends on
            sections = {stage_class(letter).section_name() for letter in letters()} | {"order"}
            settings = {k: v for k, v in settings.items() if k not in sections}
        self._stage_free_base = {**self.base, "settings": settings}
        self.input_shape = list(input_shape)
        self.writer = writer and path is not None

    @classmethod
    def of_run(cls, path, config, context: Context, original: nn.Module, student: Optional[nn.Module], runner,
               optimizer, writer: bool) -> "SharedProbes":
        """The shared directory ``path`` of a run (see :func:`shared_base`); None: nothing shared."""
        if path is None:
            return cls(None)
        base = shared_base(config, context, original, student, runner, optimizer)
        return cls(path, base, list(context.example_input.shape[1:]), writer)

    def find(self, model: nn.Module, plan: Sequence[Any], step: int, kind: str, strength: Dict[str, Any],
             anchor: bool) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """``(key, run)``: the key of this run, and the run filed under it (None when not there
        yet); ``(None, None)`` when nothing is shared."""
        if self.path is None:
            return None, None
        fingerprint = checkpoint.model_fingerprint(model)
        key = self.key(fingerprint, plan, step, kind, strength, anchor)
        found = self.get(key)
        if found is None:
            legacy = self.legacy_key(fingerprint, plan, step, kind, strength, anchor)
            found = self.get(legacy)
            if found is not None and self.writer:
                self._refile(legacy, key, found)
        return key, found

    def key(self, fingerprint: str, plan: Sequence[Any], step: int, kind: str, strength: Dict[str, Any],
            anchor: bool) -> str:
        """The hash a run of ``plan[step]`` at ``strength`` on the model of ``fingerprint`` is filed
        under. A run depends on the stages up to it and on the exit settings it is measured with,
        not on the stages after it: their settings are left out, so runs that differ only there
        (another Q ``policy``, say) share D's and P's runs."""
        parts = {**self._stage_free_base, "model": fingerprint, "plan": [repr(stage) for stage in plan[: step + 1]],
                 "exits": repr(exit_settings_at(plan, step)), "step": step, "kind": kind, "strength": strength,
                 "anchor": anchor}
        return _hash(parts)

    def legacy_key(self, fingerprint: str, plan: Sequence[Any], step: int, kind: str, strength: Dict[str, Any],
                   anchor: bool) -> str:
        """The key the same run was filed under before :meth:`key` left out the later stages:
        every setting and the whole plan (such a run is read back, then filed under its key too)."""
        parts = {**self.base, "model": fingerprint, "plan": [repr(stage) for stage in plan],
                 "step": step, "kind": kind, "strength": strength, "anchor": anchor}
        return _hash(parts)

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        """The run filed under ``key`` (checked), or None."""
        path = self.path / f"{key}.json"
        if not path.is_file():
            return None
        entry = checkpoint.read_record(path, {}, SHARED_FIX)
        _check_entry(entry, str(path), SHARED_FIX)
        if entry["kind"] == "full" and not (self.path / f"{key}.pt").is_file():
            return None  # its model is not there (yet): run it
        return entry

    def _refile(self, legacy: str, key: str, entry: Dict[str, Any]) -> None:
        """The run filed under ``legacy`` filed under ``key`` too: its model first, then its record."""
        if entry["kind"] == "full":
            partial = self.path / f"{key}.pt.partial"
            shutil.copyfile(self.path / f"{legacy}.pt", partial)
            partial.replace(self.path / f"{key}.pt")
        checkpoint.write_json(self.path / f"{key}.json", entry)

    def put(self, key: str, entry: Dict[str, Any], result: Optional[StageResult] = None,
            lineage: Optional[Lineage] = None) -> None:
        """Files ``entry`` (and a full run's model) under ``key``: the model first, so an entry
        read back always has its model (``key`` None: nothing shared)."""
        if not self.writer or key is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if result is not None:
            recipe = results.recipe(result.model, original=lineage.original, base=lineage.base,
                                    input_shape=self.input_shape, info={"probe": entry["key"]})
            results.save(self.path / f"{key}.pt", result.model, recipe)
        checkpoint.write_json(self.path / f"{key}.json", entry)

    def load_full(self, key: str, entry: Dict[str, Any], original: nn.Module, student: Optional[nn.Module],
                  context: Context) -> Tuple[StageResult, Lineage]:
        """The full run filed under ``key``: its model from its result file, its measurements."""
        return ProbeStore(self.path, self.input_shape, writer=False).load_full(dict(entry, key=key), original,
                                                                               student, context)


def _hash(parts: Dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shared_base(config, context: Context, original_model: nn.Module, student: Optional[nn.Module], runner,
                optimizer) -> Dict[str, Any]:
    """What every run shared between budgets depends on beyond its own model, plan and strength:
    the settings other than the budget's (its ``probe_epochs`` set how probes train), the data,
    the original, the reference, the student and what runs and trains each stage."""
    settings = config.to_dict()
    settings.pop("target_loss")
    settings["budget"] = {"probe_epochs": settings["budget"]["probe_epochs"]}
    settings["train"].pop("progress")

    def named(f):
        return None if f is None else f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"

    fingerprint = checkpoint.model_fingerprint
    return {"format": "ordercomp-shared-probes", "torch": torch.__version__, "settings": settings,
            "data": {split: data.fingerprint(loader) for split, loader in
                     (("train", context.train_loader), ("val", context.val_loader),
                      ("calibration", context.calibration_loader))},
            "original": fingerprint(original_model), "reference": fingerprint(context.teacher),
            "student": fingerprint(student) if student is not None else None,
            "runner": named(runner), "optimizer": named(optimizer)}
