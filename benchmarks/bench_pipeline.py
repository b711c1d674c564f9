"""DPQE under an accuracy budget on real MNIST: how much compression each budget buys.

A resnet20 teacher is trained inside the benchmark on the training digits minus a 10 % calibration
split (or read back from ``--out``/teacher.pt, written by an earlier run with the same settings);
then for each budget (``--budgets``, pp) ``compress(..., target_loss=budget)`` picks every
stage's strength on the calibration digits, and the result is measured on the 10 000 test digits,
which no choice sees. Goal: BitOpsCR >= 500x within 0.5 pp, one DPQE run including its probes in
<= 30 minutes on 2 cores. A benchmark, not a test:

    python benchmarks/bench_pipeline.py --budgets 0.5 --threads 2     # the timed run, alone on the machine
    python benchmarks/bench_pipeline.py --budgets 0.2,1.0             # further budgets, one thread each,
    python benchmarks/bench_pipeline.py --budgets 0.6,2.0             # ... in parallel processes
    python benchmarks/bench_pipeline.py --table                       # the table of every budget saved
    python benchmarks/bench_pipeline.py --quick                       # a small run to check the script

Each budget's run directory (report, plots, probes) is ``--out``/budget<B>; its row is saved as
``--out``/budget<B>.json. The data file is ../shared/data/mnist24k.npz relative to the
repository root (or --data PATH).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import ordercomp
from ordercomp import data
from ordercomp.pipeline import CompressConfig, compress
from ordercomp.report import budget_lines, format_table
from ordercomp.train import Trainer, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist24k.npz"
BUDGETS = (0.2, 0.5, 0.6, 1.0, 2.0)
GOAL_CR, GOAL_LOSS, GOAL_SECONDS = 500.0, 0.5, 1800.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="accuracy budgets (pp), comma-separated")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="most epochs of every training phase")
    parser.add_argument("--limit", type=int, default=None, help="training samples to use")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override applied to every budget")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_pipeline")
    parser.add_argument("--table", action="store_true", help="only print the table of the budgets saved in --out")
    parser.add_argument("--quick", action="store_true", help="2 000 samples, 3 teacher epochs, 1 epoch per phase")
    args = parser.parse_args(argv)
    if args.table:
        _table(args.out)
        return 0
    if args.quick:
        args.limit, args.teacher_epochs, args.epochs = 2000, 3, 1
        args.out = args.out.with_name(args.out.name + "_quick")
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # a line per probe

    def fresh_data():  # every budget reads the data (order and augmentation) as if it ran alone
        return data.load("npz", args.data, batch_size=128, limit=args.limit, seed=0, calibration_fraction=0.1)

    bundle = fresh_data()
    teacher, seconds = trained_teacher(args.out, args.teacher_epochs, bundle)
    teacher.eval()
    accuracy = Trainer(TrainConfig(progress=False)).evaluate(teacher, bundle.val_loader)
    print(f"resnet20 teacher: {accuracy:.2f} % "
          f"on {len(bundle.val_loader.dataset)} test digits after {args.teacher_epochs} epochs ({seconds:.0f} s); "
          f"{len(bundle.train_loader.dataset)} training, {len(bundle.calibration_loader.dataset)} calibration digits; "
          f"at most {args.epochs} epochs a phase; {args.threads} thread(s)", flush=True)
    for budget in budgets:
        bundle = fresh_data()
        config = CompressConfig.from_dict({"order": "DPQE", "train": {"epochs": args.epochs}}).override(args.overrides)
        out = args.out / f"budget{budget:g}"
        started = time.perf_counter()
        result = compress(teacher, bundle.train_loader, bundle.val_loader, config=config, target_loss=budget, out=out,
                          calibration_loader=bundle.calibration_loader, progress=False)
        wall = time.perf_counter() - started
        report = result.report
        print(f"\nbudget {budget:g} pp\n{format_table(report)}", flush=True)
        final = report["stages"][-1]
        row = {"budget": budget, "bitops_cr": final["bitops_cr"], "change": final["accuracy_change"],
               "interval": final["accuracy_change_interval"], "calibration_loss": report["budget"]["calibration_loss"],
               "met": report["budget"]["met"], "runs": len(report["budget"]["probes"]),
               "probes": sum(not p["anchor"] for p in report["budget"]["probes"]), "seconds": wall,
               "threads": args.threads, "chosen": budget_lines(report)[0].split("chosen: ")[-1]}
        (args.out / f"budget{budget:g}.json").write_text(json.dumps(row, indent=1))
    _table(args.out)
    return 0


def trained_teacher(out: Path, epochs: int, bundle):
    """``(teacher, seconds)``: the resnet20 teacher of the mnist24k benchmarks, trained here (seed 0,
    SGD at 0.05, cosine) and saved as ``out``/teacher.pt, or read back from there."""
    torch.manual_seed(0)
    teacher = ordercomp.models.create("resnet20", num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    path = out / "teacher.pt"
    start = time.perf_counter()
    if path.is_file():
        teacher.load_state_dict(torch.load(path, weights_only=True))
    else:
        Trainer(TrainConfig(epochs=epochs, lr=0.05, progress=False)).fit(teacher, bundle.train_loader)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), path)
    return teacher, time.perf_counter() - start


def _table(out: Path) -> None:
    rows = sorted((json.loads(p.read_text()) for p in out.glob("budget*.json")), key=lambda r: r["budget"])
    print("\n| budget (pp) | BitOpsCR | held-out change (pp) | 95% interval | calibration loss (pp) | met on calibration "
          "| runs (probes) | wall time | chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["interval"]
        print(f"| {r['budget']:g} | {r['bitops_cr']:.0f}x | {r['change']:+.2f} | [{low:+.2f}, {high:+.2f}] | "
              f"{r['calibration_loss']:+.2f} | {'yes' if r['met'] else 'no'} | {r['runs']} ({r['probes']}) | "
              f"{r['seconds'] / 60:.1f} min ({r['threads']} thread{'s' if r['threads'] > 1 else ''}) | {r['chosen']} |")
    goal = next((r for r in rows if r["budget"] == GOAL_LOSS), None)
    if goal is not None:
        met = goal["bitops_cr"] >= GOAL_CR and -goal["change"] <= GOAL_LOSS and goal["seconds"] <= GOAL_SECONDS
        print(f"\ngoal (>= {GOAL_CR:.0f}x within {GOAL_LOSS} pp on the test digits, <= {GOAL_SECONDS / 60:.0f} min): "
              f"{goal['bitops_cr']:.0f}x at {goal['change']:+.2f} pp in {goal['seconds'] / 60:.1f} min -> "
              f"{'MET' if met else 'MISSED'}")
    for r in rows:
        print(f"budget {r['budget']:g} pp: {r['bitops_cr'] / 1000:.2f} of the way to 1 000x")


if __name__ == "__main__":
    raise SystemExit(main())
