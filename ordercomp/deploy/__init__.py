"""Deployment: ONNX export (the model's integers in QDQ form, ``exact``, or fused for ONNX Runtime, ``fast``),
an ExitNet as one graph that decides its exits (``graph="single"``) or one graph per segment and head
(``"segments"``), with a manifest for :mod:`ordercomp.runtime`."""

from __future__ import annotations

from .api import FORMAT, GRAPHS, MIN_AGREEMENT, VERSION, Exported, compare, export
from .twin import MODES

__all__ = ["FORMAT", "VERSION", "MODES", "GRAPHS", "MIN_AGREEMENT", "Exported", "compare", "export"]
