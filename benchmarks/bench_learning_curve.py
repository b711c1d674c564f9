"""Learning curve of the main command's recipe: DPQE at growing training-set sizes, natural images by default.

How the loss of compression and the calibration margin the accuracy budget must pay change with
the amount of training data. For every size, a resnet20 teacher is trained on that many training
images (as many optimizer steps as ``--teacher-epochs`` take on the whole training split, so a
smaller set is not also a shorter schedule), then compressed with DPQE at the main command's
settings (40 % of the channels pruned, rounded to multiples of 8; the shipped recipe otherwise).
The calibration split (10 % of the training images, per class) and the test images are the same at
every size: the test images, which no choice sees, give each row's accuracy and paired change; the
calibration images give the 95 % one-sided margin the accuracy budget would add to the result's
calibration loss (``budget.confidence``). A benchmark, not a test:

    python benchmarks/bench_learning_curve.py                          # natural images, 3 sizes
    python benchmarks/bench_learning_curve.py --sizes 629 --out ...   # one size (sizes can run in
                                                                      # parallel processes)

Every size is saved to ``--out`` (default runs/bench_learning_curve) and skipped by a rerun; each
process ends with the table of every size saved there. At the default sizes one thread takes
about 6 minutes a size for DPQE plus 3 for its teacher; a machine with more data would extend
``--sizes`` (and ``--data``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bench_pipeline import trained_teacher
from bench_recipe import BASE, _correct, _correct_final
from ordercomp import data, stats
from ordercomp.pipeline import CommandConfig, compress

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar_part_dev.npz"
CONFIDENCE = 0.95


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", default="629,1258,2516",
                        help="comma-separated training-set sizes (after the calibration split; more than it holds: all)")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs at the largest size")
    parser.add_argument("--epochs", type=int, default=12, help="most epochs of every training phase")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_learning_curve")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override applied at every size")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if any(s < 1 for s in sizes):
        parser.error(f"--sizes must be positive, got {args.sizes!r}")
    torch.set_num_threads(args.threads)

    def bundle_of(config: CommandConfig):
        return data.load(**config.data.loader_settings(seed=0, calibration_fraction=0.1))

    largest = max(len(bundle_of(_config(args, None)).train_loader.dataset), 1)
    for size in sizes:
        path = args.out / f"n{size}.json"
        if path.is_file():
            print(f"{size} training images: saved by an earlier run", flush=True)
            continue
        config = _config(args, size)
        bundle = bundle_of(config)
        n = len(bundle.train_loader.dataset)
        epochs = math.ceil(args.teacher_epochs * largest / n)  # the same number of steps at every size
        teacher, _ = trained_teacher(args.out / f"teacher_n{size}", epochs, bundle)
        teacher_test = _correct(teacher, bundle.val_loader)
        teacher_calibration = _correct(teacher, bundle.calibration_loader)
        quiet = config.override(["train.progress=false"]).compress
        result = compress(teacher, bundle.train_loader, bundle.val_loader, config=quiet,
                          calibration_loader=bundle.calibration_loader)
        final = result.report["stages"][-1]
        loss, margin = stats.paired_loss_bound(teacher_calibration, _correct_final(result, bundle.calibration_loader),
                                               CONFIDENCE)
        row = {"size": n, "teacher_epochs": epochs, "teacher": 100 * float(teacher_test.double().mean()),
               "change": final["accuracy_change"], "interval": final["accuracy_change_interval"],
               "bitops_cr": final["bitops_cr"], "calibration_loss": loss, "margin": margin,
               "calibration": len(bundle.calibration_loader.dataset), "test": len(teacher_test),
               "stages": [(s["stage"], s["accuracy_change"]) for s in result.report["stages"]],
               "seconds": result.report["seconds"]}
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1))
        print(f"{n} training images: teacher {row['teacher']:.2f} %, {row['change']:+.2f} pp at "
              f"{row['bitops_cr']:.0f}x in {row['seconds']:.0f} s", flush=True)
    _table(args.out)
    return 0


def _config(args, size) -> CommandConfig:
    config = CommandConfig.from_dict({"order": "DPQE", "train": {"epochs": args.epochs},
                                       "data": {"name": "npz", "root": str(args.data), "limit": size}})
    return config.override(BASE + args.overrides)


def _table(out: Path) -> None:
    rows = sorted((json.loads(p.read_text()) for p in out.glob("n*.json")), key=lambda r: r["size"])
    print(f"\n| training images | teacher (%) | change (pp) | 95% interval | per stage (pp) | BitOpsCR "
          f"| calibration loss + {CONFIDENCE:.0%} margin (pp) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["interval"]
        per_stage = ", ".join(f"{s} {c:+.2f}" for s, c in r["stages"])
        print(f"| {r['size']} | {r['teacher']:.2f} | {r['change']:+.2f} | [{low:+.2f}, {high:+.2f}] | {per_stage} "
              f"| {r['bitops_cr']:.0f}x | {r['calibration_loss']:+.2f} + {r['margin']:.2f} "
              f"(of {r['calibration']}) | {r['seconds']:.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
