"""A run directory: result files, the saved progress of a run, and what a resume must match.

``config.json``, ``state.json`` (finished stages, the original's measurements and per-input
results on the validation and calibration data, the data's fingerprints), ``stage<k>_<letter>.pt``,
``model.pt`` and the report. Models are saved as result files (tensors plus a JSON recipe, see
:mod:`ordercomp.results`): nothing written needs unpickling. A stage's model is written before
the state that points at it, and the report after, each file atomically, so an interrupted or
failed save (a full disk included) keeps the last finished stage valid.

One run per directory (:func:`claim`): a run starts only in an empty or new directory, continues
the run there with ``resume``, or clears it first with ``overwrite``; a lock keeps a second
process out while a run holds it. A resume must match the saved run: the model, every setting
that changes the result (display settings such as progress bars aside, and the data's location,
since its content is fingerprinted), and the data (its size and a hash of a sample of it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import checkpoint, data, results, stats
from ..errors import BadFileError, ConfigError, DataError, RunDirError
from ..report import write_report
from .runner import Lineage

if TYPE_CHECKING:
    from .config import CompressConfig

__all__ = ["RunDir", "data_record", "Claim", "claim", "fingerprint", "save_result", "load_result", "read_state",
           "stage_file_name", "LOCK_FILE", "DISPLAY_SETTINGS"]

STATE_FORMAT, STATE_VERSION = "ordercomp-run", 1  # runs written before the format was recorded read as version 1
STATE_FIX = "the run directory was changed after ordercomp wrote it: compress again with --overwrite or into a new --out"
_STATE_FIELDS = {"completed": int, "model_file": (str, type(None)), "original": dict, "original_correct": str,
                 "records": list, "config": dict, "fingerprint": str}
_STATE_OPTIONAL = {"calibration_correct": (str, type(None)), "data": (dict, type(None))}


def read_state(run: Path) -> Dict[str, Any]:
    """A run directory's ``state.json``, checked: every key with its type, the model file a plain
    name inside the run, each record's step and stage, the per-input results readable. A bad
    file ends in one :class:`~ordercomp.errors.BadFileError` naming it and what to do."""
    path = Path(run) / "state.json"
    state = checkpoint.read_record(path, _STATE_FIELDS, STATE_FIX, _STATE_OPTIONAL,
                                   version=(STATE_FORMAT, STATE_VERSION))
    if state["model_file"] is not None:
        checkpoint.file_name(state["model_file"], f"{path}: 'model_file'", STATE_FIX, Path(run))
    for record in state["records"]:
        if not (isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
                and isinstance(record.get("stage"), str)):
            raise BadFileError(f"{path}: each record must be an object with an integer 'step' and a text 'stage', "
                               f"got {record!r:.80}; {STATE_FIX}")
        checkpoint.file_name(stage_file_name(record), f"{path}: record {record['step']}", STATE_FIX, Path(run))
    if not 0 <= state["completed"] <= len(state["records"]):
        raise BadFileError(f"{path}: 'completed' ({state['completed']}) must count finished records "
                           f"(0..{len(state['records'])}); {STATE_FIX}")
    for key in ("original_correct", "calibration_correct"):
        if state.get(key) is not None:
            try:
                stats.unpack_correct(state[key])
            except ValueError:
                raise BadFileError(f"{path}: {key!r} is not a packed list of per-input results; {STATE_FIX}") from None
    return state


def stage_file_name(record: Dict[str, Any]) -> str:
    """The file of a finished stage's model: ``stage<step>_<letter>.pt``."""
    return f"stage{record['step']}_{record['stage']}.pt"

LOCK_FILE = ".ordercomp-lock"
# Settings that change what is shown, not what is computed: a resume may change them.
DISPLAY_SETTINGS = ("train.progress",)


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


fingerprint = checkpoint.model_fingerprint  # a resumed run must start from the same model


def data_record(context, val_loader) -> Dict[str, Any]:
    """Fingerprints of the run's data and, for loaders :func:`ordercomp.data.load` made, how to
    rebuild the validation data (for ``ordercomp evaluate``)."""
    calibration = context.calibration_loader
    return {"train": data.fingerprint(context.train_loader), "val": data.fingerprint(context.val_loader),
            "calibration": data.fingerprint(calibration) if calibration is not None else None,
            "origin": data.origin(val_loader)}


class RunDir:
    """The files of a run: config.json, state.json, stage<k>_<letter>.pt, model.pt and the report.

    ``data``: fingerprints of the run's loaders (``{"train", "val", "calibration"}``, see
    :func:`ordercomp.data.fingerprint`) and, for loaders :func:`ordercomp.data.load` made, the
    settings that rebuild them (``"origin"``, which ``ordercomp evaluate`` reads)."""

    def __init__(self, path, config: CompressConfig, model: nn.Module, input_shape: Sequence[int],
                 data: Optional[Dict[str, Any]] = None, held: Optional["Claim"] = None):
        self.path = Path(path)
        self.held = held
        self.config = config
        self.fingerprint = fingerprint(model)
        self.input_shape = list(input_shape)
        self.data = data or {}
        self._pending: Optional[Tuple[Dict, torch.Tensor, torch.Tensor]] = None

    def load(self, original: nn.Module, student: Optional[nn.Module]) -> Optional[Dict]:
        """The saved progress, or None for a fresh directory; refuses a different config, model or data.

        The last finished stage's model is rebuilt on ``original``'s architecture (or ``student``'s,
        when D distilled into a given module)."""
        state_file = self.path / "state.json"
        if not state_file.exists():
            return None
        state = read_state(self.path)
        try:  # read as this version reads it: a run saved by an earlier version compares in today's form
            saved_config = type(self.config).from_dict(state["config"]).to_dict()
        except (ConfigError, TypeError, ValueError):
            saved_config = state["config"]
        saved, now = _result_settings(saved_config), _result_settings(self.config.to_dict())
        if saved != now:
            raise ConfigError(
                f"cannot resume {self.path}: its config differs from this one ({'; '.join(_diff(saved, now))}). "
                "Resume with the same config, or start a new run directory."
            )
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError(f"cannot resume {self.path}: it was started from a different model "
                             "(structure or weights differ); resume with the same model or use a new directory")
        self._check_data(state.get("data") or {})
        if state["completed"]:
            state["model"], state["lineage"] = load_result(self.path / state["model_file"], original, student)
        else:
            state["model"] = None
        state["original_correct"] = stats.unpack_correct(state["original_correct"])
        packed = state.get("calibration_correct")  # None in a run started before it was kept
        state["calibration_correct"] = stats.unpack_correct(packed) if packed is not None else None
        return state

    def _check_data(self, saved: Dict[str, Any]) -> None:
        """The same samples in every split (fingerprints) and, for data :func:`ordercomp.data.load`
        read both times, the same loader settings (batch size, augmentation...); its location may move."""
        settings = [{k: v for k, v in json.loads(json.dumps((record.get("origin") or {}).get("settings") or {})).items()
                     if k != "root"} for record in (saved, self.data)]
        if all(settings) and settings[0] != settings[1]:
            raise ConfigError(f"cannot resume {self.path}: its data was loaded with other settings "
                              f"({'; '.join(_diff(*settings))}). Resume with the same data settings, or start a new "
                              "run directory.")
        for split in ("train", "val", "calibration"):
            if split not in saved or saved[split] == self.data.get(split):
                continue
            was, now = saved[split] or {}, self.data.get(split) or {}
            raise DataError(
                f"cannot resume {self.path}: its {split} data differs from this run's ({was.get('size')} samples, "
                f"hash {was.get('hash')} then; {now.get('size')} samples, hash {now.get('hash')} now). Resume with "
                "the same data, or start a new run directory.")

    def save_stage(self, completed: int, model: nn.Module, lineage: Lineage, original: Dict,
                   original_correct: torch.Tensor, calibration_correct: torch.Tensor, records: List[Dict],
                   report: Dict) -> None:
        """Model first, then the state that points at it, then the report: a failure in between
        keeps the last finished stage's state valid."""
        self.begin_files()
        stage = records[-1]["stage"]
        model_file = stage_file_name({"step": completed, "stage": stage})
        save_result(self.path / model_file, model, self.input_shape, lineage,
                    {"order": self.config.order, "completed": completed, "stage": stage})
        self._write_state(completed, model_file, original, original_correct, calibration_correct, records)
        write_report(self.path, report)

    def start(self, original: Dict, original_correct: torch.Tensor, calibration_correct: torch.Tensor) -> None:
        """Begins a fresh run with the original's measurements and per-input results (validation,
        calibration). Nothing is written yet: the first file the run keeps (a finished stage, a
        probe) writes the config and the state first (:meth:`begin_files`), so a run that fails
        before finishing anything leaves the directory as it was."""
        self._pending = (original, original_correct, calibration_correct)

    def begin_files(self) -> None:
        """Before the run's first file: clears the directory when it is claimed with ``overwrite``,
        then writes the config and a state with no finished stage (once)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            if self.held is not None:
                self.held.begin()
            self.config.save(self.path / "config.json")
            self._write_state(0, None, *pending, [])

    def _write_state(self, completed: int, model_file: Optional[str], original: Dict, original_correct: torch.Tensor,
                     calibration_correct: torch.Tensor, records: List[Dict]) -> None:
        checkpoint.write_json(self.path / "state.json", {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "completed": completed, "model_file": model_file, "original": original,
            "original_correct": stats.pack_correct(original_correct),
            "calibration_correct": stats.pack_correct(calibration_correct), "records": records,
            "config": self.config.to_dict(), "fingerprint": self.fingerprint, "data": self.data,
        })


def _result_settings(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config without the settings a resume may change (:data:`DISPLAY_SETTINGS`)."""
    out = json.loads(json.dumps(config))
    for key in DISPLAY_SETTINGS:
        section, _, leaf = key.rpartition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(leaf, None)
    return out


class Claim:
    """A run directory held by this process (see :func:`claim`)."""

    def __init__(self, path: Path, overwrite: bool):
        self.path, self.overwrite, self.cleared = path, overwrite, False

    def begin(self) -> None:
        """Called before a fresh run writes its first file: with ``overwrite``, clears the
        directory (the lock aside) the first time. Clearing waits until then, so a run that fails
        its checks leaves the earlier run as it was."""
        if self.overwrite and not self.cleared:
            for entry in self.path.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.cleared = True


_HELD: Dict[str, Claim] = {}  # the directories this process holds: a second claim of one is refused


def _key(path: Path) -> str:
    return str(Path(path).resolve())


@contextlib.contextmanager
def claim(path, resume: bool = False, overwrite: bool = False) -> Iterator[Claim]:
    """Holds run directory ``path`` for the block, refusing what would mix two runs in it.

    A new or empty directory starts a run. A directory holding files needs ``resume`` (continue
    the run there) or ``overwrite`` (clear it, which happens when the new run writes its first
    file: :meth:`Claim.begin`); both need it to be a run directory (it has ``state.json`` or the
    lock file), so a folder of other files is never written into nor cleared. A lock file
    (``.ordercomp-lock``) keeps a second process out while the block runs; it is released when
    the process ends, however it ends. Temporary files an interrupted write left behind are
    removed. A directory is claimed once: claiming one this process already holds is refused (a
    run holds its directory through :class:`~ordercomp.pipeline.Run`, and writes through the
    claim it got). A block that wrote nothing into the directory leaves it as it was: the lock
    file and the folders the claim created are removed."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume continues the run in the "
                          "directory, overwrite clears it")
    path = Path(path)
    if _key(path) in _HELD:
        raise RunDirError(f"{path} is already held by this process (a run claims its directory once); "
                          "give another directory")
    _check_use(path, resume, overwrite)
    created = [p for p in (path, *path.parents) if not p.exists()]
    had_lock = (path / LOCK_FILE).exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    if not _lock(fd):
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{path} is in use by another ordercomp run (process {owner}); wait for it to end, "
                          "or give another directory")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _check_use(path, resume, overwrite)  # again, now that no other run can start here
        _remove_temporary(path)
        held = _HELD[_key(path)] = Claim(path, overwrite)
        yield held
    finally:
        _HELD.pop(_key(path), None)
        _untouched(path, created, had_lock)
        os.close(fd)  # releases the lock


def _untouched(path: Path, created: List[Path], had_lock: bool) -> None:
    """Undoes the claim's own traces when the run wrote nothing: its lock file and the folders
    it created (a run that failed its checks leaves no empty run directory behind)."""
    try:
        if had_lock or any(e.name != LOCK_FILE for e in path.iterdir()):
            return
        (path / LOCK_FILE).unlink()
        for folder in created:  # innermost first
            folder.rmdir()
    except OSError:  # another process wrote there meanwhile: leave it
        pass


def _check_use(path: Path, resume: bool, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} is a file")
    entries = sorted(e.name for e in path.iterdir() if e.name != LOCK_FILE) if path.is_dir() else []
    if not entries:
        return
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not (resume or overwrite):
        raise RunDirError(
            f"{path} already holds files ({listed}): continue its run with resume=True (--resume), clear it with "
            "overwrite=True (--overwrite), or give a new directory")
    if not ((path / "state.json").exists() or (path / LOCK_FILE).exists()):
        raise RunDirError(
            f"{path} is not an ordercomp run directory (no state.json) but holds {listed}; "
            f"{'resume' if resume else 'overwrite'} works only on a run directory: give an empty or new directory")


def _lock(fd: int) -> bool:
    """Takes an exclusive lock on ``fd`` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _remove_temporary(path: Path) -> None:
    """Removes the temporary files interrupted atomic writes left (``.<name>.<random>.tmp``)."""
    for tmp in path.rglob(f".*{checkpoint.TEMPORARY}"):
        if tmp.is_file():
            tmp.unlink()


def _diff(saved: Dict, now: Dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out
