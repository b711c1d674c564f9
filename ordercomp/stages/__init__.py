"""The compression stages, found by letter.

``D`` :class:`Distill`, ``P`` :class:`Prune`, ``Q`` :class:`Quantize`, ``E`` :class:`EarlyExit`,
and any method added with :func:`register_stage`. A stage is a config dataclass with
``prepare(model, context) -> Prepared`` (the transformed model and its training phases) and
``finalize(model, context)``; ``stage.begin(model, context)`` opens a :class:`StageSession` any
training loop can drive; the pipeline's runner (:func:`ordercomp.pipeline.run_order`)
chains them in any order. What an order means where it matters (PD, QD, ED, EP, EQ, QE, PE) is
described on each stage class.
"""

from __future__ import annotations

from .base import Phase, Prepared, Stage, StageResult
from .context import Context
from .distill import Distill, derive_student, student_spec, thinner_copy
from .early_exit import NO_EXIT, ORIGINAL, EarlyExit, SweepPoint, choose_threshold, sweep, threshold_choice
from .prune import Prune, channel_counts, prune_channels
from .quantize import Quantize
from .registry import AUTO, letters, parse_order, plan_order, register_stage, stage_class, unregister_stage
from .session import SessionPhase, StageSession, seed_everything

__all__ = [
    "AUTO",
    "Stage",
    "Phase",
    "Prepared",
    "StageResult",
    "StageSession",
    "SessionPhase",
    "seed_everything",
    "Context",
    "Distill",
    "Prune",
    "Quantize",
    "EarlyExit",
    "register_stage",
    "unregister_stage",
    "stage_class",
    "letters",
    "parse_order",
    "plan_order",
    "prune_channels",
    "channel_counts",
    "derive_student",
    "student_spec",
    "thinner_copy",
    "sweep",
    "SweepPoint",
    "choose_threshold",
    "threshold_choice",
    "NO_EXIT",
    "ORIGINAL",
]

for _cls in (Distill, Prune, Quantize, EarlyExit):
    register_stage(_cls)

