"""Ablation of the compression recipe: DPQE with each recipe component switched, on digits or natural images.

A resnet20 teacher is trained inside the benchmark on the training images minus a 10 % calibration
split; every run compresses that same teacher with the same seed and schedule, one recipe
component switched per row, and is reported on the test images, which no choice looks at
(thresholds and when each phase stops are chosen on the calibration split). A benchmark, not a test:

    python benchmarks/bench_recipe.py                  # every row on the digits, in one process
    python benchmarks/bench_recipe.py --data ../shared/data/cifar_part_dev.npz --teacher-epochs 15 \
        --epochs 12 --out runs/bench_recipe_cifar      # natural images, the main command's settings
    python benchmarks/bench_recipe.py --rows full,kd --out ...   # some rows (in parallel processes
                                                       # once the teacher is saved)
    python benchmarks/bench_recipe.py --quick --out runs/bench_recipe_quick   # checks the script works

Every row is saved to ``--out`` (default runs/bench_recipe), and so is the teacher (trained by the
first process, loaded by later ones), so rows can run in parallel processes, one thread each; a
rerun skips the rows already saved; each process ends by printing the table of every row saved
there. Every row prunes 40 % of the channels, rounded to multiples of 8 (the main command's
setting).

The data file is ../shared/data/mnist24k.npz relative to the repository root (or --data PATH: any
.npz with x_train, y_train, x_test, y_test). Each row's change is paired over the test images with
its 95 % interval; "vs full" is the row's accuracy minus the full recipe's, paired too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ordercomp
from bench_pipeline import trained_teacher  # the same teacher as the budget benchmark
from ordercomp import data, stats
from ordercomp.pipeline import CommandConfig, compress
from ordercomp.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist24k.npz"

# Every row: the main command's pruning.
BASE = ["prune.ratio=0.4", "prune.round_to=8"]
# row name -> (what it switches, config overrides as --set assignments, on top of BASE and the defaults)
ROWS = {
    "full": ("the shipped recipe: the reference of every row", []),
    "random-init": ("the student starts from a fresh initialisation, not from the teacher's weights",
                    ["distill.init=random"]),
    "no-min-steps": ("phases run the epochs asked for, not stretched to at least 400 steps", ["train.min_steps=0"]),
    "no-flip": ("compression reads unmirrored images (colour data is flipped by default)", ["data.flip=false"]),
    "exact-patience": ("a phase's patience reset only by a strictly better calibration accuracy, not one "
                       "within its standard error", ["train.tolerance=0"]),
    "no-early-stop": ("every phase runs all its epochs (no calibration stop)", ["train.patience=0"]),
    "mixup": ("+ mixup in distillation and every fine-tune (function matching)",
              ["distill.mixup=1.0", "prune.mixup=1.0", "quantize.mixup=1.0"]),
    "kd": ("+ distillation from the original in every fine-tune (kd_alpha 0.9)",
           ["distill.kd_alpha=0.9", "prune.kd_alpha=0.9", "quantize.kd_alpha=0.9", "early_exit.kd_alpha=0.9"]),
    "no-bn": ("no batch-norm re-estimation after P and Q", ["prune.recalibrate_bn=false",
                                                            "quantize.recalibrate_bn=false"]),
    "no-head-kd": ("exit heads learn from the labels only", ["early_exit.head_kd=0"]),
    "fixed-clip": ("activation clips fixed at 1.0 (DoReFa) instead of calibrated", ["quantize.clip=fixed"]),
    "no-pact": ("activation clips not learned (PACT off)", ["quantize.learn_alpha=false"]),
    "paper-lr": ("fine-tuning at 1/10 of the learning rate (the paper's) instead of 3/10",
                 ["train.finetune_lr_scale=0.1"]),
    "progressive": ("weight bits lowered in steps (8 -> 4)", ["quantize.progressive=true"]),
}


def _correct(model, loader) -> torch.Tensor:
    return Trainer(TrainConfig(progress=False)).correct(model, loader)[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="most epochs of every training phase")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of: {', '.join(ROWS)}")
    parser.add_argument("--limit", type=int, default=None, help="training samples to use")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_recipe",
                        help="where the teacher and every row's result are saved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: runs stay comparable on a busy machine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override applied to every row")
    parser.add_argument("--quick", action="store_true", help="2 000 samples, 2 teacher epochs, 1 epoch per phase")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.teacher_epochs, args.epochs = 2000, 2, 1
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)

    def config_of(row: str) -> CommandConfig:
        config = CommandConfig.from_dict({"order": "DPQE", "train": {"epochs": args.epochs},
                                           "data": {"name": "npz", "root": str(args.data), "limit": args.limit}})
        return config.override(BASE + args.overrides + ROWS[row][1])

    def bundle_of(config: CommandConfig):  # every row reads the data as if it ran alone
        return data.load(**config.data.loader_settings(seed=0, calibration_fraction=0.1))

    bundle = bundle_of(config_of("full"))
    teacher, teacher_seconds = trained_teacher(args.out, args.teacher_epochs, bundle)
    base = _correct(teacher, bundle.val_loader)
    print(f"resnet20 teacher: {100 * base.double().mean():.2f} % on {len(base)} test images after "
          f"{args.teacher_epochs} epochs ({teacher_seconds:.0f} s); {len(bundle.train_loader.dataset)} training, "
          f"{len(bundle.calibration_loader.dataset)} calibration images; at most {args.epochs} epochs a phase; "
          f"{args.threads} thread(s)", flush=True)

    for row in rows:
        if (args.out / f"{row}.pt").is_file():
            print(f"{row}: saved by an earlier run", flush=True)
            continue
        config = config_of(row)
        bundle = bundle_of(config)
        quiet = config.override(["train.progress=false"]).compress
        result = compress(teacher, bundle.train_loader, bundle.val_loader, config=quiet,
                          calibration_loader=bundle.calibration_loader)
        final = result.report["stages"][-1]
        torch.save({"final": final, "correct": _correct_final(result, bundle.val_loader), "seconds": result.report["seconds"],
                    "stages": [(s["stage"], s["accuracy_change"], s["bitops_cr"]) for s in result.report["stages"]]},
                   args.out / f"{row}.pt")
        epochs = " | ".join(f"{s['stage']} " + "+".join(map(str, s["epochs"].values())) for s in result.report["stages"])
        stages = ", ".join(f"{s['stage']} {s['accuracy_change']:+.2f} pp {s['bitops_cr']:.0f}x"
                           for s in result.report["stages"])
        print(f"{row}: {final['accuracy_change']:+.2f} pp at {final['bitops_cr']:.0f}x in {result.report['seconds']:.0f} s "
              f"({stages}; epochs {epochs})", flush=True)
    _table(args.out)
    return 0


def _table(out: Path) -> None:
    """The table of every row saved in ``out``, in the order of ROWS; "vs full" is paired over the test images."""
    saved = {row: torch.load(out / f"{row}.pt", weights_only=True) for row in ROWS if (out / f"{row}.pt").is_file()}
    print("\n| row | switched | change (pp) | 95% interval | vs full (pp) | BitOpsCR | seconds |")
    print("|---|---|---|---|---|---|---|")
    for row, r in saved.items():
        final = r["final"]
        low, high = final["accuracy_change_interval"]
        versus = ""
        if "full" in saved and row != "full":
            d, lo, hi = stats.paired_change(saved["full"]["correct"], r["correct"])
            versus = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        print(f"| {row} | {ROWS[row][0]} | {final['accuracy_change']:+.2f} | [{low:+.2f}, {high:+.2f}] | {versus} | "
              f"{final['bitops_cr']:.0f}x | {r['seconds']:.0f} |")


def _correct_final(result, loader) -> torch.Tensor:
    """Per image of ``loader``, whether the compressed model (dynamic early exit at its threshold) is right."""
    model = result.model
    if isinstance(model, ordercomp.nn.ExitNet):
        point = ordercomp.stages.sweep(model, loader, [model.threshold], next(iter(loader))[0][:2],
                                       model.criterion, per_input=True)[0]
        return point.correct
    return _correct(model, loader)


if __name__ == "__main__":
    raise SystemExit(main())
