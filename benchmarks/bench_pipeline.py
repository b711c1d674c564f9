"""DPQE end to end on real MNIST: train a CIFAR-style ResNet teacher, compress it, print the table.

Goal: BitOpsCR >= 500x at <= 0.5 percentage points of accuracy loss. A benchmark, not a test:

    python benchmarks/bench_pipeline.py                 # defaults below, about 15-20 minutes on 2 cores
    python benchmarks/bench_pipeline.py --quick         # a smaller run to check the script works

The data file is ../shared/data/mnist24k.npz relative to the repository root (or --data PATH).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ordercomp
from ordercomp import data
from ordercomp.pipeline import CompressConfig, compress
from ordercomp.report import format_table
from ordercomp.train import Trainer, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist24k.npz"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every stage's training")
    parser.add_argument("--w-bits", type=int, default=2)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio")
    parser.add_argument("--target-loss", type=float, default=0.5, help="accuracy loss budget (pp) for the exit threshold")
    parser.add_argument("--limit", type=int, default=None, help="training samples to use")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_pipeline")
    parser.add_argument("--quick", action="store_true", help="resnet8, 2000 samples, 1 epoch per phase")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.limit, args.teacher_epochs, args.epochs = "resnet8", 2000, 2, 1

    bundle = data.load("npz", args.data, batch_size=128, limit=args.limit, seed=0)
    torch.manual_seed(0)
    teacher = ordercomp.models.create(args.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    start = time.perf_counter()
    trainer = Trainer(TrainConfig(epochs=args.teacher_epochs, lr=0.05, progress=True))
    trainer.fit(teacher, bundle.train_loader, desc="teacher")
    teacher_seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), args.out / "teacher_state.pt")

    config = CompressConfig.from_dict({
        "order": "DPQE",
        "train": {"epochs": args.epochs, "lr": 0.05},
        "prune": {"ratio": args.ratio},
        "quantize": {"w_bits": args.w_bits, "a_bits": args.a_bits},
        "target_loss": args.target_loss,
    })
    result = compress(teacher, bundle.train_loader, bundle.val_loader, config=config, out=args.out)
    report = result.report
    print()
    print(f"DPQE on {args.data.name}: {args.model} teacher ({args.teacher_epochs} epochs, {teacher_seconds:.0f} s), "
          f"{args.epochs} epochs per stage, P ratio {args.ratio}, Q {args.w_bits}w{args.a_bits}a, "
          f"exit budget {args.target_loss} pp, {len(bundle.train_loader.dataset)} training / "
          f"{len(bundle.val_loader.dataset)} test digits")
    print(format_table(report))
    final = report["stages"][-1]
    met = final["bitops_cr"] >= 500 and -final["accuracy_change"] <= 0.5
    print(f"\nfinal: BitOpsCR {final['bitops_cr']:.0f}x at {final['accuracy_change']:+.2f} pp "
          f"-> goal (>= 500x at <= 0.5 pp loss) {'met' if met else 'not met'}; report in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
