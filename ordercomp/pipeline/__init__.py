"""Compression runs: the config, the runner of stages, the accuracy budget and ``compress()`` with its run directory."""

from __future__ import annotations

from .budget import BudgetConfig, Controller, ProbeStore
from .compress import CompressResult, Run, compress, evaluate_model, fingerprint, load_result, save_result
from .config import STAGE_FIELDS, CommandConfig, CompressConfig, DataConfig, SearchConfig, resolve_device
from .preflight import check_inputs, check_run
from .rundir import STATE_FIX, Claim, claim, read_state, stage_file_name
from .runner import Lineage, fit_phase, run_order, run_plan, run_stage, zoo_spec_of

__all__ = [
    "CommandConfig",
    "CompressConfig",
    "BudgetConfig",
    "Controller",
    "ProbeStore",
    "DataConfig",
    "SearchConfig",
    "CompressResult",
    "compress",
    "Run",
    "check_inputs",
    "evaluate_model",
    "fingerprint",
    "resolve_device",
    "save_result",
    "load_result",
    "Lineage",
    "fit_phase",
    "run_stage",
    "run_plan",
    "run_order",
    "zoo_spec_of",
    "STAGE_FIELDS",
    "claim",
    "Claim",
    "check_run",
    "read_state",
    "stage_file_name",
    "STATE_FIX",
]
