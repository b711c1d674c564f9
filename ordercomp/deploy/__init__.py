"""Deployment: ONNX export (the model's integers in QDQ form, ``exact``, or fused for ONNX Runtime, ``fast``),
an ExitNet as one graph per segment and per head with a manifest for :mod:`ordercomp.runtime`."""

from __future__ import annotations

from .api import FORMAT, VERSION, Exported, compare, export
from .twin import MODES

__all__ = ["FORMAT", "VERSION", "MODES", "Exported", "compare", "export"]
