"""``ordercomp export``: a run's model as ONNX graphs plus a manifest for ``ordercomp.runtime``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..deploy import GRAPHS, MIN_AGREEMENT, MODES, Exported, export
from ..errors import ConfigError
from ..pipeline import stage_file_name
from .common import add_stage_module_flag, final_model_file, read_model, read_run, read_run_model, run_data

__all__ = ["add_parser", "run", "deploy_data", "export_file"]

CALIBRATION_FRACTION = 0.1
HELD_OUT = 1000


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a run's model as an ONNX graph (an ExitNet's exits decided inside it) and a "
                                      "manifest for ordercomp.runtime")
    p.add_argument("run_dir")
    add_stage_module_flag(p)
    p.add_argument("--mode", choices=MODES, default="fast",
                   help="fast: quantized convolutions fused into QLinearConv for ONNX Runtime (default); exact: the "
                        "model's own integers in QDQ form")
    p.add_argument("--graph", choices=GRAPHS, default="single",
                   help="an ExitNet as one graph that decides the exits itself (default; any ONNX runtime runs it with "
                        "one call), or one graph per segment and head that ordercomp.runtime drives")
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="fast: the %% of the calibration inputs on which the graph must predict what the model does; "
                        "below it, the convs whose re-quantized outputs cost most run in float (default "
                        f"{MIN_AGREEMENT:g}; 0: every one in int8)")
    p.add_argument("--stage", type=int, help="export this stage's model (1..n) instead of the final one")
    p.add_argument("--out", type=Path, help="folder for the graphs (default: RUN_DIR/onnx-MODE)")
    p.add_argument("--model-file", type=Path,
                   help="for a model outside the zoo: the original model the run started from, saved whole with "
                        "torch.save(model, path) (trusted code, it is unpickled; only its architecture is used)")
    p.add_argument("--data-root", help="where the run's data is now, when it moved")
    p.set_defaults(func=run)


def deploy_data(run_dir: Path, state: dict, data_root: Optional[str]):
    """``(calibration loader, held-out loader, preprocessing)`` of a run's own data: the calibration
    inputs are a share of the training split, never augmented; the held-out ones are the run's
    validation data, which no choice looked at."""
    bundle = run_data(run_dir, state, data_root, augment=False, calibration_fraction=CALIBRATION_FRACTION)
    preprocessing = {"scale": 1 / 255, "mean": list(bundle.mean), "std": list(bundle.std)}
    return bundle.calibration_loader, bundle.val_loader, preprocessing


def stage_file(run_dir: Path, state: dict, stage: Optional[int]) -> Path:
    if stage is None:
        return final_model_file(run_dir, state)
    records = state.get("records") or []
    steps = [r["step"] for r in records]
    if stage not in steps:
        raise ConfigError(f"--stage must be one of the run's finished stages {steps}, got {stage}")
    record = records[steps.index(stage)]
    return run_dir / stage_file_name(record)


def export_file(model, out: Path, mode: str, calibration, held_out, preprocessing, graph: str = "single",
                min_agreement: float = MIN_AGREEMENT) -> Exported:
    """Exports one model of a run (read with :func:`read_run_model`) with the run's data."""
    return export(model, out, mode, calibration=calibration, data=held_out, data_limit=HELD_OUT,
                  preprocessing=preprocessing, graph=graph, min_agreement=min_agreement)


def run(args) -> int:
    run_dir = Path(args.run_dir)
    state, _ = read_run(run_dir, args.stage_modules)
    model_file = stage_file(run_dir, state, args.stage)
    template = read_model(args.model_file)[0] if args.model_file else None
    calibration, held_out, preprocessing = deploy_data(run_dir, state, args.data_root)
    out = args.out or run_dir / f"onnx-{args.mode}"
    result = export_file(read_run_model(model_file, template), out, args.mode, calibration, held_out, preprocessing,
                         args.graph, args.min_agreement)
    print(f"model: {model_file}")
    print(result.summary())
    return 0
