"""Loads the compiled library ``ordercomp._C``, or records why it is not in use.

Set ``ORDERCOMP_DISABLE_EXT=1`` to force the pure-PyTorch path even when the library is built.
"""

from __future__ import annotations

import importlib
import json
import os

import torch

_REASON = ""
_BUILD: dict = {}


def _load() -> bool:
    global _REASON, _BUILD
    if os.environ.get("ORDERCOMP_DISABLE_EXT", "0") not in ("", "0"):
        _REASON = "disabled by ORDERCOMP_DISABLE_EXT"
        return False
    try:
        # Importing registers the ops with torch.library. By module name, so that the import graph
        # does not read it as an import of the package root (which imports every layer).
        importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        _REASON = f"compiled library not importable ({exc}); using pure-PyTorch references"
        return False
    _BUILD = json.loads(torch.ops.ordercomp.build_info())
    _REASON = "compiled library loaded"
    return True


COMPILED = _load()
CUDA = COMPILED and bool(_BUILD.get("cuda")) and torch.cuda.is_available()


def info() -> dict:
    """What :func:`ordercomp.backend_info` reports."""
    reason = _REASON
    if COMPILED and not CUDA:
        why = "built without CUDA kernels" if not _BUILD.get("cuda") else "no CUDA device visible"
        reason += f"; CUDA kernels not in use ({why})"
    return {"compiled": COMPILED, "cuda": CUDA, "reason": reason, "build": dict(_BUILD)}
