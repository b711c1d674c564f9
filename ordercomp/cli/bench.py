"""``ordercomp bench``: measured latency of a run's original and of each stage's model, next to BitOps.

Every model is exported (the original in float, each stage ``fast``) and timed through
``ordercomp.runtime`` with the same session options (all graph optimisations, ``--threads``
intra-op threads), in interleaved rounds on real held-out inputs; the original also runs in
PyTorch eager. The table goes to the console, ``RUN_DIR/bench.json`` and the run's report.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .. import checkpoint, checks, results, runtime
from ..data import unpack
from ..errors import BadFileError, ConfigError, reason
from ..deploy import GRAPHS, export
from ..deploy.timing import time_variants
from ..pipeline import STATE_FIX, stage_file_name
from ..report import REPORT_FORMAT, REPORT_VERSION, latency_lines, write_report
from .common import add_stage_module_flag, read_model, read_run, read_run_model
from .export import HELD_OUT, deploy_data, export_file

__all__ = ["add_parser", "run", "bench_run", "TARGETS"]

EAGER = "original, PyTorch eager"
FLOAT = "original, ONNX Runtime fp32"
TARGETS = {FLOAT: 5.0, EAGER: 10.0}  # the final model must be this many times faster than each, at every batch size
INPUTS = 1024


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measured latency of the original and of each stage's model (ONNX Runtime), "
                                     "next to BitOps; adds a speed-up column to the run's report")
    p.add_argument("run_dir")
    add_stage_module_flag(p)
    p.add_argument("--model-file", type=Path,
                   help="the original model, when the run directory has no teacher.pt: "
                        "the model saved whole with torch.save(model, path) (trusted code, it is unpickled) or a "
                        "result file ordercomp wrote")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of ONNX Runtime and PyTorch")
    p.add_argument("--graph", choices=GRAPHS, default="single",
                   help="how the stages' ExitNets are exported: one graph deciding the exits (default) or one graph "
                        "per segment and head driven by ordercomp.runtime")
    p.add_argument("--out", type=Path, help="folder for the exported graphs (default: RUN_DIR/bench)")
    p.add_argument("--data-root", help="where the run's data is now, when it moved")
    p.set_defaults(func=run)


def _original(run_dir: Path, model_file: Optional[Path]) -> torch.nn.Module:
    if model_file is not None:
        return read_model(model_file)[0]
    if (run_dir / "teacher.pt").exists():
        return results.load(run_dir / "teacher.pt")
    raise ConfigError(f"{run_dir} has no teacher.pt (the original is kept there when the command line trained it): "
                      "give --model-file, the original model")


def _inputs(loader) -> np.ndarray:
    xs, n = [], 0
    for batch in loader:
        x = unpack(batch, "the validation loader")[0]
        xs.append(x.float().numpy())
        n += x.shape[0]
        if n >= INPUTS:
            break
    return np.ascontiguousarray(np.concatenate(xs)[:INPUTS])


def bench_run(run_dir: Path, original_file: Optional[Path] = None, batch_sizes=(1, 64), rounds: int = 8,
              threads: int = 2, out: Optional[Path] = None, data_root: Optional[str] = None,
              graph: str = "single", stage_modules=()) -> dict:
    """Exports and times the run's models; returns the ``latency`` record the report shows."""
    state, _ = read_run(run_dir, stage_modules)
    original = _original(run_dir, original_file).eval()
    calibration, held_out, preprocessing = deploy_data(run_dir, state, data_root)
    out = out or run_dir / "bench"
    rows: List[dict] = [{"name": EAGER, "step": None}]
    # every stage's model read (weights-only) before anything is exported
    stages = [(f"{r['step']}. {r['stage']}", r, run_dir / stage_file_name(r)) for r in state.get("records") or []]
    models = {name: read_run_model(file, original) for name, _, file in stages}
    created = not out.exists()
    try:
        # the float original needs no calibration: its graph is exact
        graphs = {FLOAT: export(original, out / "original", "exact", data=held_out, data_limit=HELD_OUT,
                                preprocessing=preprocessing)}
        rows.append({"name": FLOAT, "step": None, **_sizes(graphs[FLOAT])})
        for name, record, file in stages:
            graphs[name] = export_file(models[name], out / file.stem, "fast", calibration, held_out, preprocessing,
                                       graph)
            rows.append({"name": name, "step": record["step"], "bitops_cr": record.get("bitops_cr"),
                         **_sizes(graphs[name])})
    except BaseException:
        if created:  # a failed bench leaves no half-filled folder of graphs behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    deployed = {name: runtime.load(g.path, threads=threads) for name, g in graphs.items()}

    def eager(x):
        with torch.inference_mode():
            original(torch.from_numpy(x))

    variants = {EAGER: eager, **{name: d.run for name, d in deployed.items()}}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # PyTorch eager on as many threads as ONNX Runtime, for this run only
    try:
        timed = time_variants(variants, _inputs(held_out), batch_sizes, rounds)
    finally:
        torch.set_num_threads(before)
    for row in rows:
        row["ms"] = {str(b): timed[row["name"]][b] for b in batch_sizes}
    return {"threads": threads, "rounds": rounds, "batch_sizes": list(batch_sizes), "graph": graph,
            "reference": FLOAT, "eager": EAGER,
            "targets": {k: v for k, v in TARGETS.items()}, "rows": rows}


def _sizes(exported) -> Dict[str, float]:
    c = exported.comparison or {}
    return {"onnx_bytes": exported.onnx_bytes, "packed_bytes": exported.packed_bytes,
            "agreement": c.get("agreement"), "accuracy_onnx": c.get("accuracy_onnx")}


def run(args) -> int:
    run_dir = Path(args.run_dir)
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--rounds", [args.rounds]), ("--threads", [args.threads])):
        for value in values:
            checks.integer(flag, value, 1)  # before the minutes of exporting
    report_file = run_dir / "report.json"
    report = checkpoint.read_record(report_file, {"stages": list, "original": dict}, STATE_FIX,
                                    version=(REPORT_FORMAT, REPORT_VERSION)) \
        if report_file.exists() else None  # checked before the minutes of exporting and timing
    latency = bench_run(run_dir, args.model_file, args.batch_sizes, args.rounds, args.threads, args.out,
                        args.data_root, args.graph, args.stage_modules)
    checkpoint.write_json(run_dir / "bench.json", latency)
    if report is not None:
        report.pop("plots", None)
        try:
            write_report(run_dir, dict(report, latency=latency))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a report edited beyond its JSON form
            raise BadFileError(f"{report_file}: cannot be rewritten with the latency ({reason(e)}); the "
                               f"measurements are in {run_dir / 'bench.json'}; {STATE_FIX}") from None
    print("\n".join(latency_lines(latency)))
    return 0
