"""A run directory: result files, the saved progress of a run, and what a resume must match.

``config.json``, ``state.json`` (finished stages, the original's measurements), ``stage<k>_<letter>.pt``,
``model.pt`` and the report. Models are saved as result files (tensors plus a JSON recipe, see
:mod:`ordercomp.results`): nothing written needs unpickling. The model is written before the
state that points at it, so an interrupted save keeps the previous state valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import checkpoint, results, stats
from ..errors import ConfigError
from ..report import write_report
from .runner import Lineage

if TYPE_CHECKING:
    from .config import CompressConfig

__all__ = ["RunDir", "fingerprint", "save_result", "load_result"]


def save_result(path, model: nn.Module, input_shape: Sequence[int], lineage: Optional[Lineage] = None,
                info: Optional[Dict[str, Any]] = None) -> Path:
    """Writes ``model`` as a result file (see :func:`ordercomp.results.save`); ``lineage``: the
    architectures it came from (default: its own, for a model not compressed yet)."""
    lineage = lineage or Lineage.of(model)
    recipe = results.recipe(model, original=lineage.original, base=lineage.base, input_shape=list(input_shape),
                            info=info)
    return results.save(path, model, recipe)


def load_result(path, model: Optional[nn.Module] = None,
                student: Optional[nn.Module] = None) -> Tuple[nn.Module, Lineage]:
    """A result file's model (see :func:`ordercomp.results.load`) and the lineage to continue it with."""
    net, recipe = results.load_with_recipe(path, model=model, student=student)
    return net, Lineage(recipe["original"], recipe["base"])


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's structure and weights: a resumed run must start from the same model."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):  # an ExitNet's own settings
            h.update(json.dumps(t, sort_keys=True).encode())
            continue
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


class RunDir:
    """The files of a run: config.json, state.json, stage<k>_<letter>.pt, model.pt and the report."""

    def __init__(self, path, config: CompressConfig, model: nn.Module, input_shape: Sequence[int]):
        self.path = Path(path)
        self.config = config
        self.fingerprint = fingerprint(model)
        self.input_shape = list(input_shape)

    def load(self, original: nn.Module, student: Optional[nn.Module]) -> Optional[Dict]:
        """The saved progress, or None for a fresh directory; refuses a different config or model.

        The last finished stage's model is rebuilt on ``original``'s architecture (or ``student``'s,
        when D distilled into a given module)."""
        state_file = self.path / "state.json"
        if not state_file.exists():
            return None
        state = checkpoint.read_json(state_file)
        saved = state["config"]
        now = json.loads(json.dumps(self.config.to_dict()))
        if saved != now:
            diffs = _diff(saved, now)
            raise ConfigError(
                f"cannot resume {self.path}: its config differs from this one ({'; '.join(diffs)}). "
                "Resume with the same config, or start a new run directory."
            )
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError(f"cannot resume {self.path}: it was started from a different model "
                             "(structure or weights differ); resume with the same model or use a new directory")
        if state["completed"]:
            state["model"], state["lineage"] = load_result(self.path / state["model_file"], original, student)
        else:
            state["model"] = None
        state["original_correct"] = stats.unpack_correct(state["original_correct"])
        return state

    def save_stage(self, completed: int, model: nn.Module, lineage: Lineage, original: Dict,
                   original_correct: torch.Tensor, records: List[Dict], report: Dict) -> None:
        """Model first, then the state that points at it: a crash in between keeps the old state valid."""
        stage = records[-1]["stage"]
        model_file = f"stage{completed}_{stage}.pt"
        save_result(self.path / model_file, model, self.input_shape, lineage,
                    {"order": self.config.order, "completed": completed, "stage": stage})
        self.config.save(self.path / "config.json")
        write_report(self.path, report)
        self._write_state(completed, model_file, original, original_correct, records)

    def start(self, original: Dict, original_correct: torch.Tensor) -> None:
        self.config.save(self.path / "config.json")
        self._write_state(0, None, original, original_correct, [])

    def _write_state(self, completed: int, model_file: Optional[str], original: Dict, original_correct: torch.Tensor,
                     records: List[Dict]) -> None:
        checkpoint.write_json(self.path / "state.json", {
            "completed": completed, "model_file": model_file, "original": original,
            "original_correct": stats.pack_correct(original_correct), "records": records,
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
