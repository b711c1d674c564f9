"""``probes/`` of a run directory under an accuracy budget: every probe and full run, checked when read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .. import bitops, checkpoint, results, stats
from ..errors import BadFileError, RunDirError, reason
from ..stages import Context, StageResult
from .runner import Lineage

__all__ = ["ProbeStore", "PROBES_FIX"]

PROBES_FIX = ("the run's probes were changed after ordercomp wrote them: compress again with --overwrite or into a "
              "new --out")
_ENTRY_FIELDS = {"key": str, "step": int, "stage": str, "kind": str, "anchor": bool, "strength": dict,
                 "bitops_cr": float, "seconds": float, "margin": float, "calibration_correct": str,
                 "calibration_accuracy": float, "loss": float}
_FULL_FIELDS = {"result": dict, "correct": str}


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
            checkpoint.check_fields(entry, _ENTRY_FIELDS, where, PROBES_FIX)
            if entry["kind"] == "full":
                checkpoint.check_fields(entry, _FULL_FIELDS, where, PROBES_FIX)
                checkpoint.file_name(f"{entry['key']}.pt", where, PROBES_FIX, self.path)
            for key in ("calibration_correct", "correct"):
                if key in entry:
                    try:
                        stats.unpack_correct(entry[key])
                    except ValueError:
                        raise BadFileError(f"{where}: {key!r} is not a packed list of per-input results; "
                                           f"{PROBES_FIX}") from None
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
