"""The report of a compression run: one record per finished stage, and the report around them."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import data, stats
from ..stages import Context, StageResult
from .budget import Controller
from .config import CompressConfig

__all__ = ["Metric", "carved_sizes", "metric_name", "record", "report_of", "size"]

Metric = Callable[[nn.Module, Any], float]


def metric_name(metric: Optional[Metric]) -> str:
    """The report's name of the quality metric: ``accuracy``, or the user metric's function name."""
    return "accuracy" if metric is None else getattr(metric, "__name__", "metric")


def record(step: int, result: StageResult, model: nn.Module, original: Dict, original_correct: torch.Tensor,
           context: Context, metric: Optional[Metric]) -> Dict[str, Any]:
    """The report's record of a finished stage: its measurements, its change against the original
    (paired interval over ``original_correct``), its exit choice, and the user metric."""
    prof = result.profile
    exit_info = result.exit
    change, low, high = stats.paired_change(original_correct, result.correct)
    record = {
        "step": step + 1,
        "stage": result.stage,
        "accuracy": result.accuracy,
        "accuracy_change": change,
        "accuracy_change_interval": [low, high],
        "calibration_accuracy": result.calibration_accuracy,
        "epochs": result.epochs,
        "macs": result.macs,
        "params": result.params,
        "bitops": result.bitops,  # expected over the validation inputs for a model with exits
        "bitops_static": prof.bitops,
        "storage_bits": prof.storage_bits,
        "bitops_cr": result.bitops_cr,
        "cr": result.cr,
        "seconds": result.seconds,
        "policy": prof.policy_summary() if hasattr(prof, "policy_summary") else None,
        "info": {k: v for k, v in result.info.items() if k != "exit"},
    }
    if result.heads_dropped:
        record["heads_dropped"] = True
    elif exit_info:
        teacher_bitops = context.teacher_profile.bitops
        record["threshold"] = exit_info["threshold"]
        record["exit_fractions"] = exit_info.get("exit_fractions")
        record["exit_sweep"] = [
            {"threshold": p["threshold"], "accuracy": p["accuracy"], "margin": p["margin"],
             "bitops": p["expected_bitops"],
             "bitops_cr": teacher_bitops / p["expected_bitops"] if p["expected_bitops"] else float("inf"),
             **({"speedup": p["speedup"]} if "speedup" in p else {})}
            for p in exit_info["sweep"]
        ]
    if metric is not None:
        name = metric_name(metric)
        record[name] = float(metric(model, context.val_loader))
        record[name + "_change"] = record[name] - original[name]
    return record


def report_of(config: CompressConfig, original: Dict, records: List[Dict], metric: Optional[Metric],
              exit_points: Optional[Dict], context: Context, controller: Optional[Controller] = None,
              order: Optional[str] = None) -> Dict[str, Any]:
    """The run's report so far (see :mod:`ordercomp.report` for its layout); ``order``: the order
    run, when it is not ``config.order`` (an order search found it)."""
    order = order or config.order
    calibrated = context.calibration_loader is not None
    budget = None
    if controller is not None:
        budget = dict(controller.summary([r["budget"] for r in records if "budget" in r]),
                      done=len(records) == len(order))
    return {
        "budget": budget,
        "order": order,
        "exit_points": exit_points,
        "metric": metric_name(metric),
        "original": original,
        "stages": records,
        "config": config.to_dict(),
        "data": {"validation_inputs": size(context.val_loader),
                 "calibration_inputs": size(context.calibration) if calibrated else None},
        "notes": [
            "BitOps of a model with exits is the expectation over the validation inputs at the chosen "
            "threshold; MACs and params are those of the whole network, every head included.",
            "Accuracy changes are paired over the validation inputs, with 95 % intervals."
            + (" Every choice (exit thresholds, when training phases stop) was made on calibration data never "
               "trained on; accuracies are measured on the validation data, which no choice looked at."
               if calibrated else " Choices were made on the validation data itself (calibration_fraction=0), "
               "so its accuracies are optimistic."),
        ],
    }


def size(loader) -> Optional[int]:
    """How many samples ``loader``'s dataset holds, None when it cannot say."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def carved_sizes(train_loader, calibration_loader, given, fraction: float) -> Optional[Tuple[int, int]]:
    """``(training samples, calibration samples)`` of a run whose calibration data was carved from
    its training data by ``calibration_fraction`` (``fraction``), by the run (``given``, the
    calibration loader the run was given, is None) or by :func:`ordercomp.data.load` (the command
    line), when both sizes are known; else None (the user's own calibration data: no fraction to
    suggest)."""
    made_by_load = ((data.origin(given) or {}).get("settings") or {}).get("calibration_fraction")
    if given is not None and not made_by_load or not fraction:
        return None
    sizes = size(train_loader), size(calibration_loader)
    return None if None in sizes else sizes
