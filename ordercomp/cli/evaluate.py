"""``ordercomp evaluate``: accuracy and BitOps of a saved run, dynamic exits included."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

from .. import data, results
from ..errors import ConfigError
from ..pipeline import CompressConfig, DataConfig, evaluate_model, resolve_device
from ..stages import Context
from .common import add_stage_module_flag, final_model_file, read_model, read_run, run_data

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and BitOps of a saved run (dynamic exits included)")
    p.add_argument("run_dir")
    add_stage_module_flag(p)
    p.add_argument("--model-file", type=Path,
                   help="for a model outside the zoo: the original model the run started from, saved whole with "
                        "torch.save(model, path) (trusted code, it is unpickled; only its architecture is used)")
    p.add_argument("--data", help="evaluate on this dataset instead of the run's own (needed for a run made with "
                                   "loaders of your own, whose data is not recorded)")
    p.add_argument("--data-root", help="where the data is: the run's own data moved elsewhere (checked against its "
                                        "fingerprint), or the folder / .npz file of --data")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    run_dir = Path(args.run_dir)
    state, config = read_run(run_dir, args.stage_modules)
    model_file = final_model_file(run_dir, state)
    loader, own = _data(args, run_dir, state, config)
    recipe, _ = results.read(model_file)
    if "class" in recipe["base"] and not args.model_file:
        raise ConfigError(f"{model_file} holds a {recipe['base']['class']}, not a zoo model: give --model-file, "
                          "the original model saved whole, to rebuild its architecture")
    template = read_model(args.model_file)[0] if args.model_file else None
    model = results.load(model_file, model=template, student=template)
    device = resolve_device(args.device or config.device)
    context = Context.create(model, loader, loader, dataclasses.replace(config.train, progress=not args.quiet), device,
                             output=config.output)
    measured = evaluate_model(model, context)
    _print(model_file, measured, state["original"], own, args.data)
    return 0


def _data(args, run_dir: Path, state: dict, config: CompressConfig) -> Tuple[object, bool]:
    """``(loader, is the run's own validation data)``: ``--data`` when given; else the run's own
    data, rebuilt from its record (at ``--data-root`` when given) and checked against its fingerprint."""
    if args.data:  # loaded as the run's data was (batch size, size limit...), when the run recorded it
        origin = (state.get("data") or {}).get("origin")
        settings = dict(origin["settings"]) if origin else DataConfig().loader_settings(config.train.seed)
        settings.update(name=args.data, root=args.data_root, calibration_fraction=0.0)
        return data.load(**settings).val_loader, False
    origin = (state.get("data") or {}).get("origin") or {}
    return getattr(run_data(run_dir, state, args.data_root), origin.get("loader", "val_loader")), True


def _print(model_file: Path, measured: dict, original: dict, own: bool, name: Optional[str]) -> None:
    print(f"model: {model_file}")
    if own:
        print(f"accuracy: {measured['accuracy']:.2f} % (original {original['accuracy']:.2f} %, "
              f"change {measured['accuracy'] - original['accuracy']:+.2f} pp)")
    else:
        print(f"accuracy: {measured['accuracy']:.2f} % on --data {name} (not the run's data: the original's "
              f"{original['accuracy']:.2f} % was measured on other inputs)")
    if "threshold" in measured:
        print(f"early exit at threshold {measured['threshold']}: expected BitOps {measured['bitops']:.4g} "
              f"(static {measured['bitops_static']:.4g})")
    else:
        print(f"BitOps: {measured['bitops']:.4g}")
    print(f"BitOpsCR: {original['bitops'] / measured['bitops']:.1f}x, "
          f"CR: {original['storage_bits'] / measured['storage_bits']:.1f}x")
