"""``ordercomp compress``: run an order of stages on a model and write the run directory."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .. import distributed, models
from ..errors import ConfigError
from ..pipeline import Run
from ..report import format_table
from .common import (TRUSTED, add_config_flags, add_model_flags, config_from, data_label, given_model, load_data,
                     read_model, trained_teacher)

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress a model with an order of D, P, Q, E")
    add_model_flags(p, "compress")
    p.add_argument("--reference-file", type=Path,
                   help=f"the uncompressed original when the model is already partly compressed: {TRUSTED}")
    p.add_argument("--student-file", type=Path, help=f"the distillation student: {TRUSTED}")
    p.add_argument("--order", help="letters of D, P, Q, E in the order to run (default DPQE), or auto: an order "
                   "search first (its settings: --set search.methods=DPQE, search.grid=small, search.seeds=1)")
    p.add_argument("--target-loss", type=float, metavar="PP",
                   help="accuracy budget (pp): the most the result may lose against the original on the "
                        "calibration data; every stage's strength is then chosen for the most compression within it")
    p.add_argument("--max-probes", type=int, metavar="N", help="with --target-loss: at most N probes")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="with --target-loss: stop probing after this many seconds of probes")
    p.add_argument("--cost", choices=("bitops", "latency"),
                   help="what --target-loss buys: fewest BitOps (default) or measured latency in ONNX Runtime "
                        "(each candidate exported and timed against the original; needs the deploy extra)")
    p.add_argument("--probe-cache", metavar="DIR",
                   help="with --target-loss: a directory shared by runs of the same model, data and settings under "
                        "other budgets; a probe or full run one of them made is read back, not repeated")
    p.add_argument("--calibration-fraction", type=float, metavar="F",
                   help="share of each class of the training data held back as calibration data, on which "
                        "every choice is made (default 0.1; 0: choose on the validation data)")
    p.add_argument("--out", help="run directory: checkpoints, report and plots")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished stage (same model, data and settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="clear the run directory --out first (only when the new run writes its first file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    config = config_from(args)
    dist = distributed.setup()
    out = Path(args.out) if args.out else None
    if (args.resume or args.overwrite) and out is None:
        raise ConfigError(f"--{'resume' if args.resume else 'overwrite'} needs --out (the run directory)")
    unused = [flag for flag, value in (("--max-probes", args.max_probes), ("--time-budget", args.time_budget),
                                       ("--cost", args.cost), ("--probe-cache", args.probe_cache))
              if value is not None]
    if unused and config.compress.target_loss is None:
        raise ConfigError(f"{' and '.join(unused)} belong to the accuracy budget and need --target-loss "
                          "(or target_loss in --config); without a budget nothing is probed")
    if args.resume and dist.is_main and not (out / "state.json").is_file():
        print(f"ordercomp compress: --resume: {out} holds no saved progress yet; starting the run from the first "
              "stage", file=sys.stderr)
    bundle = load_data(config)
    reference = read_model(args.reference_file, what="--reference-file")[0] if args.reference_file else None
    model, lineage = given_model(args, bundle, reference)
    # A zoo model still to be trained is probed untrained: the same architecture meets the same data.
    probe = model if model is not None else models.create(args.model, num_classes=bundle.num_classes,
                                                          in_channels=bundle.in_channels)
    settings = config.compress
    if args.student_file:
        settings = dataclasses.replace(settings, distill=dataclasses.replace(
            settings.distill, student=read_model(args.student_file, reference or probe, what="--student-file")[0]))
    # One run: checked once (a zoo model still to be trained is checked untrained), its directory
    # held from before the teacher is trained into it until the run ends.
    with Run.open(probe, bundle.train_loader, bundle.val_loader, settings, calibration_loader=bundle.calibration_loader,
                  out=out, resume=args.resume, overwrite=args.overwrite, reference=reference, ddp=dist.active,
                  lineage=lineage, classes=bundle.num_classes, data_label=data_label(bundle, config),
                  probe_cache=args.probe_cache) as run:
        if model is None:
            model = trained_teacher(args.model, config, bundle, out, dist, reuse=args.resume, held=run.held)
        result = run.compress(model)
    if dist.is_main:
        print(format_table(result.report))
        if out is not None:
            plots = ", ".join(str(p) for p in sorted(out.glob("*.png")))
            print(f"\nrun directory: {out}\n  report: {out / 'report.md'} and {out / 'report.json'}\n"
                  f"  plots: {plots}\n  model: {out / 'model.pt'}")
    return 0
