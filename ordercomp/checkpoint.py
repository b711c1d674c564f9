"""Atomic files for run directories: nothing half-written survives a crash or Ctrl-C.

Every write goes to a temporary file in the target folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows); a failed write removes its temporary
file, and files get the permissions the umask allows, as ``open`` would give them. Models
ordercomp writes are result files (:mod:`ordercomp.results`); :func:`load_model` reads a user's
own model saved whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MissingFileError, ModelError, reason

__all__ = ["atomic_write", "write_json", "write_text", "load_model", "read_json", "TEMPORARY"]

TEMPORARY = ".tmp"  # the suffix of atomic_write's temporary files: ``.<name>.<random>.tmp``


def atomic_write(path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path) -> Any:
    with open(path) as f:
        return json.load(f)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def load_model(path, map_location="cpu") -> torch.nn.Module:
    """Loads the user's own model saved whole with ``torch.save(model, path)``: trusted code, it is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no saved model at {path}")
    try:
        model = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # unpickling arbitrary bytes can raise anything
        raise ModelError(f"{path} cannot be read as a model saved with torch.save(model, path) (a text file, a "
                         f"truncated or corrupt file, or a model whose class cannot be imported here): "
                         f"{reason(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        kind = ("a state dict (weights without the architecture)" if isinstance(model, dict)
                else f"a {type(model).__name__}")
        raise ModelError(f"{path} holds {kind}, not a model saved whole with torch.save(model, path)")
    return model
