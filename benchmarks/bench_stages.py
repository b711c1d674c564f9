"""DPQE against D, P, Q and E alone: test accuracy, BitOpsCR and CR on real MNIST digits.

Run: ``python benchmarks/bench_stages.py`` (a script, not a test). A CIFAR-style ResNet teacher
(resnet20 by default; D distils it into resnet8) is trained on the mnist24k training digits
(10 % of them held back as validation data for choosing the early-exit threshold), then each
order runs from the same teacher with the same settings, and every result is scored on the
10 000 test digits. Epochs are far fewer than the paper's 200, to fit a 2-core machine in about
10 minutes; ``--train-samples`` subsamples the training data further.
The data file is ``../shared/data/mnist24k.npz`` next to the repository, or ``--data`` /
$ORDERCOMP_MNIST24K.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ordercomp import bitops, data, models  # noqa: E402
from ordercomp.nn import ExitNet  # noqa: E402
from ordercomp.pipeline import run_order  # noqa: E402
from ordercomp.stages import Context, Distill, EarlyExit, Prune, Quantize, sweep  # noqa: E402
from ordercomp.train import TrainConfig, Trainer  # noqa: E402

DEFAULT_DATA = os.environ.get("ORDERCOMP_MNIST24K", str(ROOT.parent / "shared" / "data" / "mnist24k.npz"))
RUNS = ("D", "P", "Q", "E", "DPQE")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="mnist24k.npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--model", default="resnet20", choices=models.names())
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="training / fine-tuning epochs of every stage")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-samples", type=int, default=None, help="subsample the training digits")
    p.add_argument("--ratio", type=float, default=0.5, help="pruning ratio")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--head", default="conv", choices=("pool", "conv"))
    p.add_argument("--max-accuracy-loss", type=float, default=0.5, help="early-exit target (pp, validation)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated orders")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def score(model: torch.nn.Module, loader, example_input: torch.Tensor, trainer: Trainer):
    """Test accuracy (%) and BitOps per input; an ExitNet runs dynamically at its chosen threshold."""
    if isinstance(model, ExitNet):
        point = sweep(model, loader, [model.threshold], example_input, model.criterion)[0]
        return point.accuracy, point.expected_bitops
    return trainer.evaluate(model, loader), bitops.profile(model, example_input).bitops


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = data.load("npz", args.data, split_val=0.1, batch_size=args.batch_size, augment=False,
                       limit=args.train_samples, seed=0)
    n_train, n_val, n_test = (len(loader.dataset) for loader in (bundle.train_loader, bundle.val_loader,
                                                                     bundle.test_loader))
    print(f"data: {n_train} training / {n_val} validation / {n_test} test digits from {Path(args.data).name}"
          f"{' (subsampled)' if args.train_samples else ''}; {args.threads} threads")
    print(f"teacher {args.model}: {args.teacher_epochs} epochs; every stage {args.epochs} epochs "
          f"(paper: 200), lr {args.lr} (fine-tuning {args.lr / 10:g}), batch {args.batch_size}")

    start = time.perf_counter()
    teacher = models.create(args.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, progress=args.progress)
    teacher_config = TrainConfig(epochs=args.teacher_epochs, lr=args.lr, progress=args.progress)
    Trainer(teacher_config).fit(teacher, bundle.train_loader)
    ctx = Context.create(teacher, bundle.train_loader, bundle.val_loader, config)
    trainer = ctx.trainer
    base_acc, base_bitops = score(teacher, bundle.test_loader, ctx.example_input, trainer)
    base = bitops.profile(teacher, ctx.example_input)
    print(f"teacher trained in {time.perf_counter() - start:.0f} s: test accuracy {base_acc:.2f} %, "
          f"{base.bitops / 1e9:.2f} GBitOps, {base.params:,} params\n")

    stages = {
        "D": Distill(),
        "P": Prune(args.ratio),
        "Q": Quantize(args.w_bits, args.a_bits),
        "E": EarlyExit(head=args.head, max_accuracy_loss=args.max_accuracy_loss),
    }
    student = models.student_of(args.model)
    print(f"settings: D student {student[0] if student else 'thinner copy'}, KD alpha 0.9 / CE gamma 0.1, T 4; "
          f"P ratio {args.ratio} (L1); Q {args.w_bits}w{args.a_bits}a, first conv and classifiers 8w8a; "
          f"E {args.head} heads at the stage boundaries, threshold for <= {args.max_accuracy_loss} pp loss "
          "on validation data\n")
    rows, per_stage = [], []
    for order in args.runs.split(","):
        t0 = time.perf_counter()
        model, results = run_order(teacher, order, stages, ctx)
        acc, cost = score(model, bundle.test_loader, ctx.example_input, trainer)
        ratios = bitops.compression_ratios(base, bitops.profile(model, ctx.example_input), expected_bitops=cost)
        rows.append((order, acc, acc - base_acc, cost, ratios["bitops_cr"], ratios["cr"],
                     sum(p.numel() for p in model.parameters()), time.perf_counter() - t0))
        if len(order) > 1:
            per_stage.append((order, results))
        print(f"  {order} done in {rows[-1][-1]:.0f} s", flush=True)

    print(f"\n{'run':<6} {'test acc %':>10} {'change pp':>10} {'MBitOps':>10} {'BitOpsCR':>9} {'CR':>7} "
          f"{'params':>8} {'time s':>7}")
    print(f"{'none':<6} {base_acc:>10.2f} {0.0:>10.2f} {base_bitops / 1e6:>10.1f} {1.0:>9.1f} {1.0:>7.1f} "
          f"{base.params:>8,} {'':>7}")
    for order, acc, change, cost, bcr, cr, params, seconds in rows:
        print(f"{order:<6} {acc:>10.2f} {change:>+10.2f} {cost / 1e6:>10.1f} {bcr:>9.1f} {cr:>7.1f} "
              f"{params:>8,} {seconds:>7.0f}")
    for order, results in per_stage:
        print(f"\n{order} after each stage (validation accuracy):")
        for r in results:
            extra = f"  threshold {r.info['exit']['threshold']:g}" if "exit" in r.info else ""
            print(f"  {r.stage}: {r.accuracy:6.2f} %  BitOpsCR {r.bitops_cr:7.1f}  CR {r.cr:6.1f}{extra}")
    print("\nBitOps: conv + linear MACs x w_bits x a_bits (float = 32 x 32), per input; early exit: mean over the "
          "test digits at the threshold chosen on validation data. BN, pooling and adds not counted. "
          f"Total {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
