"""``ordercomp evaluate``: accuracy and BitOps of a saved run, dynamic exits included."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

from .. import checkpoint, data, results
from ..errors import ConfigError, DataError, MissingFileError
from ..pipeline import CompressConfig, evaluate_model, resolve_device
from ..stages import Context
from .common import read_model

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and BitOps of a saved run (dynamic exits included)")
    p.add_argument("run_dir")
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
    loader, own = _data(args, run_dir, state.get("data") or {}, config)
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


def _data(args, run_dir: Path, recorded: dict, config: CompressConfig) -> Tuple[object, bool]:
    """``(loader, is the run's own validation data)``: ``--data`` when given; else the run's own
    data, rebuilt from its record (at ``--data-root`` when given) and checked against its fingerprint."""
    if args.data:
        settings = config.data.loader_settings(config.train.seed)
        settings.update(name=args.data, root=args.data_root, calibration_fraction=0.0)
        return data.load(**settings).val_loader, False
    origin = recorded.get("origin")
    if origin is None:
        raise ConfigError(f"{run_dir} was made with loaders passed to compress(), so its data is not recorded: "
                          "give --data (and --data-root) to name the data to evaluate on")
    settings = dict(origin["settings"], **({"root": args.data_root} if args.data_root else {}))
    loader = getattr(data.load(**settings), origin["loader"])
    found, saved = data.fingerprint(loader), recorded.get("val")
    if saved is not None and found != saved:
        raise DataError(f"the data at {settings['root']} is not the data {run_dir} was validated on "
                        f"({saved['size']} samples, hash {saved['hash']} then; {found['size']} samples, hash "
                        f"{found['hash']} now): give --data-root to where that data is now, or --data to evaluate "
                        "on other data")
    return loader, True


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
