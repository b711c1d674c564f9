"""Order search on real MNIST digits, beside the paper's pairwise verdicts and its Table 1.

    python benchmarks/bench_search.py [--quick] [--seeds 0 1] [--data PATH] [--workers N] [--out DIR]

Trains a small CIFAR-style ResNet teacher once, then for every seed in ``--seeds`` runs
``search_order`` over D, P, Q and E with the recipe's defaults (``CompressConfig()``: at least
400 steps per stage, fine-tuning, calibration split) and the paper's two checks, plus every
D-first order over the same grid (the paper's Table 1). It prints each seed's pairwise verdicts
with their 95 % intervals beside the paper's (D before P, D before Q, D before E, P before Q,
P before E, Q before E), the order found, how sure the search is, and whether the seeds agree.
The paper's ranking (Shen et al., Table 1) is DPQE > DQPE > DPEQ, DEPQ > DQEP, DEQP; the
numbers printed are what this data and grid give, not tuned towards it.

Finished runs are cached per seed in ``--out``, so a rerun resumes; the seeds can also run in
parallel processes (``--seeds 0`` and ``--seeds 1``), and a last ``--seeds 0 1`` reads both from
the cache and compares them. The default grid (a resnet8 teacher trained for 8 epochs; each
stage trained for 2 epochs of batch 64, at least the recipe's 400 steps; D at width 0.5, P at
0.3 and 0.5, Q at 4w8a, E over its thresholds) takes about 1.5 hours per seed on one core;
``--quick`` (resnet8 at half width, one strength per method, 2 000 validation digits) about 20
minutes. A larger machine would run resnet20 as the teacher (``--model resnet20 --workers N``,
about 3x the compute) and a second strength for D and Q.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ordercomp import models  # noqa: E402
from ordercomp.pipeline import CompressConfig  # noqa: E402
from ordercomp.search import SearchGrid, format_sequence_table, search_order, sequence_table  # noqa: E402
from ordercomp.train import TrainConfig, Trainer  # noqa: E402

MEAN, STD = 0.1307, 0.3081
PAPER = "DPQE > DQPE > DPEQ, DEPQ > DQEP, DEQP"
PAPER_PAIRS = ("DP", "DQ", "DE", "PQ", "PE", "QE")  # the paper: the first letter before the second, each decisive
WIDE_LIMITS = (5.0, 10.0, 20.0, 40.0)

SETTINGS = {
    "quick": dict(model="resnet8-half", teacher_epochs=4, epochs=1, batch_size=128, n_val=2000,
                  grid=SearchGrid(D=(0.5,), P=(0.5,), Q=((4, 8),))),
    "full": dict(model="resnet8", teacher_epochs=8, epochs=2, batch_size=64, n_val=10000,
                 grid=SearchGrid(D=(0.5,), P=(0.3, 0.5), Q=((4, 8),))),
}


class NpzLoader:
    """A picklable factory of one split's loader (worker processes build their own)."""

    def __init__(self, path: str, split: str, limit=None, batch_size: int = 128):
        self.path, self.split, self.limit, self.batch_size = path, split, limit, batch_size

    def __call__(self) -> DataLoader:
        with np.load(self.path) as npz:
            x, y = npz[f"x_{self.split}"][: self.limit], npz[f"y_{self.split}"][: self.limit]
        images = ((torch.from_numpy(x).float() / 255.0 - MEAN) / STD).unsqueeze(1)
        data = TensorDataset(images, torch.from_numpy(y).long())
        train = self.split == "train"
        return DataLoader(data, batch_size=self.batch_size, shuffle=train,
                          generator=torch.Generator().manual_seed(0) if train else None)


def teacher(name: str, train: DataLoader, val: DataLoader, epochs: int, path: Path) -> torch.nn.Module:
    """The teacher, trained once and kept in ``path`` (its state dict)."""
    torch.manual_seed(0)
    if name == "resnet8-half":
        model = models.ResNet([1, 1, 1], (8, 16, 32), num_classes=10, in_channels=1)
    else:
        model = models.create(name, num_classes=10, in_channels=1)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    start = time.perf_counter()
    trainer = Trainer(TrainConfig(epochs=epochs, lr=0.05, progress=False))
    trainer.fit(model, train)
    print(f"teacher {name}: {trainer.evaluate(model, val):.2f} % after {epochs} epoch(s) "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def ranking(table) -> str:
    """Rows grouped by rank: "A > B, C > D"."""
    groups = {}
    for row in table:
        groups.setdefault(row["rank"], []).append(row["sequence"])
    return " > ".join(", ".join(g) for _, g in sorted(groups.items()))


def pair_rows(plans: Dict[int, "object"]) -> str:
    """The paper's six verdicts beside each seed's, as a markdown table."""
    seeds = list(plans)
    lines = ["| pair | paper | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (2 + len(seeds)) + "|"]
    for pair in PAPER_PAIRS:
        cells = [plans[s].pairwise[pair].verdict() if pair in plans[s].pairwise else "not run" for s in seeds]
        lines.append(f"| {pair} | {pair[0]} before {pair[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search(seed: int, mode: str, name: str, data: Path, out: Path, workers: int):
    """One seed's search (resumed from ``out / f"seed{seed}"``) and its wall time in minutes."""
    s = SETTINGS[mode]
    val = NpzLoader(str(data), "test", limit=s["n_val"], batch_size=500)
    model = teacher(name, NpzLoader(str(data), "train")(), val(), s["teacher_epochs"], out / f"teacher_{name}.pt")
    train = NpzLoader(str(data), "train", batch_size=s["batch_size"])
    config = CompressConfig(train=TrainConfig(epochs=s["epochs"], seed=seed, progress=False))  # else the recipe's defaults
    start = time.perf_counter()
    plan = search_order(model, train, val, "DPQE", s["grid"], config=config, out=out / f"seed{seed}",
                        workers=workers, sequences="D-first")
    return plan, (time.perf_counter() - start) / 60


def show(plan, seed: int, minutes: float, mode: str, name: str, data: Path) -> None:
    s = SETTINGS[mode]
    print(f"\n== order search, seed {seed} ({mode}: {name} on {data.name}, {s['n_val']} held-out "
          f"digits, {minutes:.1f} min this time; cached runs cost nothing) ==\n")
    print(plan)
    table = plan.table
    if not any(v for row in table for v in row["best_cr"].values()):
        print(f"no D-first order stays within {max(plan.limits):g} pp of the teacher; the same table at wider limits:")
        table = sequence_table(plan.sequence_points, plan.original_accuracy, WIDE_LIMITS)
        print(format_sequence_table(table, WIDE_LIMITS))
    for sequence, points in plan.sequence_points.items():
        best = max(points, key=lambda q: (q["accuracy"], q["bitops_cr"]))
        most = max(points, key=lambda q: (q["bitops_cr"], q["accuracy"]))
        print(f"  {sequence}: most accurate {best['accuracy']:.2f} % at {best['bitops_cr']:.1f}x; "
              f"most compressed {most['bitops_cr']:.1f}x at {most['accuracy']:.2f} %")
    ranks = {row["sequence"]: row["rank"] for row in table}
    print(f"Table 1 (D-first orders): DPQE ranks {ranks['DPQE']} of {len(ranks)}; "
          f"ranking here: {ranking(table)}; the paper's: {PAPER}")


def agreement(plans: Dict[int, "object"]) -> str:
    """Whether the seeds found the same order, and how sure each was."""
    found = ", ".join(f"seed {s}: {p.order} ({'unique' if p.unique else 'not unique'}"
                      + (f", {100 * p.confidence:.0f} % of resamples" if p.confidence is not None else "") + ")"
                      for s, p in plans.items())
    orders = {p.order for p in plans.values()}
    sure = all(p.unique for p in plans.values())
    if len(orders) == 1 and sure:
        return f"the seeds agree on {orders.pop()} ({found})"
    return f"unsure: the seeds {'agree on ' + orders.pop() + ' but not uniquely' if len(orders) == 1 else 'disagree'} ({found})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one strength per method (about 20 minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="training seeds, one search each (default: 0 1); the teacher is the same")
    p.add_argument("--model", choices=("resnet8-half", "resnet8", "resnet20"),
                   help="the teacher (default: resnet8-half)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist24k.npz",
                   help="npz with x_train, y_train, x_test, y_test (default: ../shared/data/mnist24k.npz)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1 avoids oversubscribing a shared CPU)")
    p.add_argument("--out", type=Path, help="search directory (default: runs/bench_search_<quick|full>)")
    args = p.parse_args(argv)
    if not args.data.is_file():
        p.error(f"--data: no file at {args.data}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds: distinct integers >= 0, got {args.seeds}")
    mode = "quick" if args.quick else "full"
    name = args.model or SETTINGS[mode]["model"]
    out = args.out or REPO / "runs" / f"bench_search_{mode}" / name
    torch.set_num_threads(args.threads)

    plans = {}
    for seed in args.seeds:
        plans[seed], minutes = search(seed, mode, name, args.data, out, args.workers)
        show(plans[seed], seed, minutes, mode, name, args.data)
    print("\n== pairwise verdicts beside the paper's (margin: the gap between the two orders' fronts) ==\n")
    print(pair_rows(plans))
    print(f"\n{agreement(plans)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
