"""``ordercomp search-order``: find the order of the methods from pairwise experiments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed, models
from ..search import METHODS, PRESETS, TIE_THRESHOLD, TorchrunRunner, search_order
from .common import (add_config_flags, add_model_flags, check_model_data, config_from, given_model, loader_factories,
                     trained_teacher)

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("search-order", help="find the order of D, P, Q, E from pairwise experiments")
    add_model_flags(p, "search")
    p.add_argument("--methods", default=METHODS, help="the methods to order: 2 to 4 of D, P, Q, E and any "
                                                      "registered letter (default DPQE)")
    p.add_argument("--grid", default="small", help=f"the strengths each method runs at: {', '.join(PRESETS)} or a "
                   "number of strengths per method")
    p.add_argument("--budget", help=argparse.SUPPRESS)  # the old name of --grid
    p.add_argument("--sequences", help="orders of the table: all, consistent, D-first, or a comma list (default: the order found)")
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat every run with this many training seeds (their spread goes into every interval)")
    p.add_argument("--no-insertion", dest="insertion", action="store_false",
                   help="skip the insertion check (that A[C]B keeps A before B; on by default)")
    p.add_argument("--insertion", action="store_true", help=argparse.SUPPRESS)  # the default now, kept for old scripts
    p.add_argument("--no-repetition", dest="repetition", action="store_false",
                   help="skip the repetition check (DD, PP, QQ against D, P, Q; on by default)")
    p.add_argument("--tie", type=float, default=TIE_THRESHOLD, help="mean front gap (pp) below which a pair is a tie")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the runs run: local worker processes, or the tasks of a Ray cluster "
                        "(pip install 'ordercomp[cluster]')")
    p.add_argument("--address", help="with --executor ray: the cluster's HOST:PORT, or auto (default: a local one)")
    p.add_argument("--nproc-per-run", type=int, default=1,
                   help="processes per run: each run is torchrun --nproc_per_node=N (DistributedDataParallel)")
    p.add_argument("--out", required=True, help="search directory: cached runs, plots, table, JSON (rerun to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no line per run")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Trains a fresh zoo teacher when needed, searches, prints the plan."""
    config = config_from(args)
    train, val = loader_factories(config)
    out = Path(args.out)
    bundle = train.bundle()
    model, _ = given_model(args, bundle)
    probe = model if model is not None else models.create(args.model, num_classes=bundle.num_classes,
                                                          in_channels=bundle.in_channels)
    check_model_data(probe, bundle, config, out)  # before a teacher is trained
    if model is None:
        model = trained_teacher(args.model, config, bundle, out, distributed.Dist(), reuse=True)
    if args.budget is not None:
        print("ordercomp search-order: --budget is now --grid (the strengths each method runs at; not the accuracy "
              "budget)", file=sys.stderr)
        args.grid = args.budget
    grid = int(args.grid) if args.grid.isdigit() else args.grid
    sequences = args.sequences.split(",") if args.sequences and "," in args.sequences else args.sequences
    runner = None
    if args.nproc_per_run > 1:
        runner = TorchrunRunner(model, config, args.nproc_per_run, out / "torchrun", model_file=args.model_file)
    plan = search_order(model, train, val, args.methods, grid, config=config.compress, out=out, workers=args.workers,
                        sequences=sequences, insertion=args.insertion, repetition=args.repetition, seeds=args.seeds,
                        tie_threshold=args.tie, verbose=not args.quiet, runner=runner, executor=args.executor,
                        address=args.address)
    print(plan)
    return 0
