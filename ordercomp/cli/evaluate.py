"""``ordercomp evaluate``: accuracy and BitOps of a saved run, dynamic exits included."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Tuple

from .. import checkpoint, results
from ..errors import ConfigError, MissingFileError
from ..pipeline import CompressConfig, evaluate_model, resolve_device
from ..stages import Context
from .common import load_data

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and BitOps of a saved run (dynamic exits included)")
    p.add_argument("run_dir")
    p.add_argument("--model-file", type=Path,
                   help="for a model outside the zoo: the original model the run started from, saved whole with "
                        "torch.save(model, path) (trusted code, it is unpickled; only its architecture is used)")
    p.add_argument("--data")
    p.add_argument("--data-root")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _model_file(run: Path) -> Tuple[Path, dict]:
    """The run's final model (or its last finished stage's) and its state.json."""
    state_file = run / "state.json"
    if not state_file.exists():
        raise MissingFileError(f"{run} is not a run directory (no state.json)")
    state = checkpoint.read_json(state_file)
    if (run / "model.pt").exists():
        return run / "model.pt", state
    if not state["model_file"]:
        raise ConfigError(f"{run} holds no finished stage yet")
    return run / state["model_file"], state


def run(args) -> int:
    run_dir = Path(args.run_dir)
    model_file, state = _model_file(run_dir)
    config = CompressConfig.from_dict(state["config"])
    if args.data or args.data_root:
        config = config.override([f"data.name={args.data or config.data.name}",
                                  f"data.root={args.data_root or config.data.root}"])
    bundle = load_data(config)
    recipe, _ = results.read(model_file)
    if "class" in recipe["base"] and not args.model_file:
        raise ConfigError(f"{model_file} holds a {recipe['base']['class']}, not a zoo model: give --model-file, "
                          "the original model saved whole, to rebuild its architecture")
    template = checkpoint.load_model(args.model_file) if args.model_file else None
    model = results.load(model_file, model=template, student=template)
    device = resolve_device(args.device or config.device)
    context = Context.create(model, bundle.train_loader, bundle.val_loader,
                             dataclasses.replace(config.train, progress=not args.quiet), device, output=config.output)
    measured = evaluate_model(model, context)
    _print(model_file, measured, state["original"])
    return 0


def _print(model_file: Path, measured: dict, original: dict) -> None:
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
