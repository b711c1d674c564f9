"""order="auto": the order search a compression run makes before its stages (see
:func:`ordercomp.search.search_order`, itself built on compress(): imported when a search is asked for)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from ..errors import ConfigError
from ..stages import Context
from .config import CompressConfig
from .records import size

__all__ = ["check_auto", "find_order"]


def check_auto(config: CompressConfig, calibration_loader, ddp: bool) -> None:
    """An order search needs data to choose on that the result is not reported on, and one process."""
    if calibration_loader is None and not config.calibration_fraction:
        raise ConfigError("order 'auto' chooses the order on calibration data: give calibration_loader, or a "
                          "calibration_fraction > 0 (not 0, which would choose on the validation data it reports on)")
    if ddp:
        raise ConfigError("order 'auto' runs its order search in one process: run search_order (ordercomp "
                          "search-order) first and give the order it finds")


def find_order(model: nn.Module, config: CompressConfig, stages, context: Context, out: Optional[Path],
               verbose: bool) -> Dict[str, Any]:
    """The order search ``config.search`` describes, and what it found: the order, on what evidence,
    how sure, and at what cost. It runs the stages as the run would (``config`` with the
    ``stages`` given), trains on the run's training split and measures on its calibration split
    (the validation data, which the run's report is measured on, chooses nothing); its runs are
    cached in ``out``, so a resumed run finds the same order again without running them."""
    from ..search import search_order

    settings, started = config.search, time.perf_counter()
    found = search_order(model, context.train_loader, context.calibration, settings.methods, settings.grid,
                         config=dataclasses.replace(config.with_stages(stages), order=settings.methods), out=out,
                         seeds=settings.seeds, insertion=settings.insertion, repetition=settings.repetition,
                         verbose=verbose)
    return {
        "order": found.order, "methods": settings.methods, "grid": settings.grid, "seeds": settings.seeds,
        "unique": found.unique, "orders_consistent": found.orders_consistent, "confidence": found.confidence,
        "verdicts": {pair: e.verdict() for pair, e in found.pairwise.items()},
        "checks": [f"{c['kind']} {c.get('first', '')}{'[' + c['inserted'] + ']' if 'inserted' in c else ''}"
                   f"{c.get('second', '')}{c.get('repeated', '')}: {c['verdict']}"
                   for c in found.insertion + found.repetition],
        "runs": found.runs["total"], "executed": found.runs["executed"],
        "seconds": time.perf_counter() - started, "dir": str(out) if out is not None else None,
        "measured_on": f"the calibration data ({size(context.calibration)} inputs)",
    }
