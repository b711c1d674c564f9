"""Atomic files for run directories: nothing half-written survives a crash or Ctrl-C.

Every write goes to a temporary file in the target folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows); a failed write removes its temporary
file, and files get the permissions the umask allows, as ``open`` would give them. Models
ordercomp writes are result files (:mod:`ordercomp.results`); :func:`load_model` reads a user's
own model saved whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch

from .errors import BadFileError, MissingFileError, ModelError, reason

__all__ = ["atomic_write", "model_fingerprint", "write_json", "write_text", "load_model", "read_json", "read_record", "check_fields", "file_name", "check_creatable",
           "TEMPORARY"]

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


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's structure and weights (a resumed run must start from the same model)."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):  # an ExitNet's own settings
            h.update(json.dumps(t, sort_keys=True).encode())
            continue
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def check_creatable(path: Path, name: str, error: type) -> None:
    """Raises ``error`` naming ``name`` when the folder ``path`` cannot be created or written: its
    nearest existing ancestor is a file, or gives no write permission."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{name}: cannot create {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{name}: {path} cannot be written: no write permission on {existing}")


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


Kinds = Union[type, Tuple[type, ...]]
_KIND_NAMES = {dict: "an object", list: "a list", str: "text", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def read_record(path, fields: Mapping[str, Kinds], fix: str, optional: Mapping[str, Kinds] = (),
                kind: Kinds = dict, version: Optional[Tuple[str, int]] = None) -> Any:
    """The JSON file ``path`` that ordercomp wrote, checked before anyone reads it: it must parse,
    be a ``kind`` (an object by default) and, when an object, pass :func:`check_fields` and, with
    ``version`` ``(format, number)``, record that format and number (a file written before they
    were recorded has neither, and is read as that version). Anything
    else ends in one :class:`BadFileError` naming the file, what is wrong and ``fix`` (what the
    user can do), never a traceback from deeper down."""
    path = Path(path)
    try:
        value = read_json(path)
    except FileNotFoundError:
        raise MissingFileError(f"no file at {path}; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFileError(f"{path}: not valid JSON ({reason(e)}): truncated or edited; {fix}") from None
    if not _is(value, kind):
        raise BadFileError(f"{path}: must hold {_names(kind)}, got {_names(type(value))}; {fix}")
    if kind is dict:
        check_fields(value, fields, str(path), fix, optional)
        if version is not None and (value.get("format", version[0]), value.get("version", version[1])) != version:
            raise BadFileError(f"{path}: format {value.get('format')!r} version {value.get('version')!r}; this "
                               f"ordercomp reads {version[0]!r} version {version[1]} (another ordercomp wrote it, "
                               f"or it was edited); {fix}")
    return value


def check_fields(value: Any, fields: Mapping[str, Kinds], where: str, fix: str,
                 optional: Mapping[str, Kinds] = ()) -> dict:
    """``value``, checked to be an object holding every key of ``fields`` (and any key of
    ``optional`` it has) with a value of the types given there (``float`` takes integers too)."""
    if not isinstance(value, dict):
        raise BadFileError(f"{where}: must be an object, got {_names(type(value))}; {fix}")
    missing = [k for k in fields if k not in value]
    if missing:
        raise BadFileError(f"{where}: lacks the key{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(repr, missing))}; {fix}")
    for key, kinds in list(fields.items()) + [(k, v) for k, v in dict(optional).items() if k in value]:
        if not _is(value[key], kinds):
            raise BadFileError(f"{where}: {key!r} must be {_names(kinds)}, got {_names(type(value[key]))}; {fix}")
    return value


def _is(value, kinds: Kinds) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _names(kinds: Kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def file_name(value: Any, where: str, fix: str, folder: Optional[Path] = None) -> str:
    """``value``, a file name a record gives, checked to name a file directly inside its folder
    (no folder part, no ``..``, not absolute; and, with ``folder``, no link out of it)."""
    name = value if isinstance(value, str) else None
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name or Path(name).is_absolute():
        raise BadFileError(f"{where}: {value!r} is not the name of a file in its folder; {fix}")
    if folder is not None and (folder / name).is_symlink():
        target = (folder / name).resolve()
        if target.parent != Path(folder).resolve():
            raise BadFileError(f"{where}: {name} links outside its folder (to {target}); {fix}")
    return name


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
