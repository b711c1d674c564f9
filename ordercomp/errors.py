"""The errors ordercomp raises for a problem with what it was given.

Every one derives from :class:`OrdercompError`, so ``except ordercomp.OrdercompError`` catches a
user error and lets a bug through; the command line prints these as one line (exit code 2) and
shows a traceback for anything else. Each also derives from the built-in type callers caught
before typed errors existed (``ValueError``, ``TypeError``, ``FileNotFoundError``, ...), so
existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "OrdercompError",
    "ConfigError",
    "ArgumentTypeError",
    "DataError",
    "ModelError",
    "MissingFileError",
    "MissingDependencyError",
    "TrainingError",
    "RunError",
    "RunDirError",
    "BadFileError",
    "reason",
]


class OrdercompError(Exception):
    """Base of every error ordercomp raises for a problem with its input (not a bug)."""


class ConfigError(OrdercompError, ValueError):
    """A setting or argument has a value outside what is allowed (the message names both)."""


class ArgumentTypeError(OrdercompError, TypeError):
    """An argument has the wrong type (the message names the argument and the types allowed)."""


class DataError(OrdercompError, ValueError):
    """The data cannot be used: unreadable, wrong layout, wrong shapes or labels."""


class ModelError(OrdercompError, ValueError):
    """The model cannot be used as asked: no classifier, not traceable, a bad cut point, a bad file."""


class MissingFileError(OrdercompError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class MissingDependencyError(OrdercompError, ImportError):
    """An optional package this feature needs is not installed (the message says which)."""


class TrainingError(OrdercompError, FloatingPointError):
    """Training diverged (the loss became NaN or infinite)."""


class RunDirError(ConfigError):
    """A run directory cannot be used as asked: it holds another run (and neither resume nor
    overwrite was asked for), another process is running in it, or it is not a run directory."""


class BadFileError(OrdercompError, ValueError):
    """A file ordercomp wrote earlier (a run's state, report or probes, an export's manifest) cannot
    be read or does not hold what it must: truncated, edited, or from another version. The message
    names the file, what is wrong and what to do."""


class RunError(OrdercompError, RuntimeError):
    """A run in a child process (``torchrun``) failed; the message carries its exit code and output."""


def reason(exc: BaseException) -> str:
    """The gist of a library's exception for a one-line message: its first sentence, after its
    type name when the text alone would not say what happened (``KeyError: 101``)."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    head, dot, rest = text.partition(". ")
    text = head + ("." if dot and rest else "") if len(head) >= 20 else text
    if isinstance(exc, (RuntimeError, ValueError)) and len(text) >= 20:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
