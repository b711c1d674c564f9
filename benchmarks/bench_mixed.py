"""Q's bits at equal BitOps: the same bits for every layer against bits per layer (``policy="auto"``).

    python benchmarks/bench_mixed.py [--runs runs/bench_pipeline] [--budget 1] [--seeds 0-1]

Q runs alone (``order="Q"``, fully trained as a budget's full run is: at most 6 epochs, QAT on the
labels) on the pruned model of a budget run of ``bench_pipeline.py`` (its ``stage2_P.pt``, in
``--runs``/budget<B>_seed<s>), with that run's teacher, training seed and calibration split, and
is measured on the run's held-out digits against the teacher. For each uniform level (``--levels``,
``w,a`` pairs; first and last layers at 8 bits, as Q's default policy) the per-layer variants get
exactly the BitOps the uniform model has (``bits_per_mac`` = its BitOps over its MACs):

- ``auto``: what Q does: each layer's KL sensitivity on the 8w8a model with its batch-norm
  statistics re-estimated;
- ``auto-bn``: the statistics also re-estimated at each option before it is measured;
- ``auto-stale``: nothing re-estimated, as Q measured before this version (the batch norms still
  set for the float weights DoReFa rescales).

Printed per seed and level: each variant's calibration and held-out change against the teacher
(pp, the held-out one with its paired 95 % interval), BitOpsCR, and the bits per layer of the auto
variants. Every variant's row is kept in ``--out`` (a rerun skips the ones there). A benchmark, not
a test; one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import ordercomp  # noqa: E402
from ordercomp import data  # noqa: E402
from ordercomp.stages import quantize as quantize_module  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist24k.npz"
VARIANTS = ("uniform", "auto", "auto-bn", "auto-stale")


def _variant(name: str):
    """Patches Q's sensitivity for ``name``; returns the undo."""
    saved = (quantize_module.sensitivities, quantize_module.Quantize._norm_recalibration)
    if name == "auto-bn":
        made = []

        def norm(context):
            made.append(saved[1](context))
            return made[-1]

        def per_option(model, batches, options, output=None, recalibrate=None):
            return saved[0](model, batches, options, output, recalibrate=made[-1])
        quantize_module.sensitivities = per_option
        quantize_module.Quantize._norm_recalibration = staticmethod(norm)
    elif name == "auto-stale":
        quantize_module.Quantize._norm_recalibration = staticmethod(lambda context: (lambda model: None))

    def undo():
        quantize_module.sensitivities, quantize_module.Quantize._norm_recalibration = saved[0], staticmethod(saved[1])
    return undo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_pipeline")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--budget", type=float, default=1.0, help="the budget run whose P model Q starts from")
    p.add_argument("--seeds", default="0", help="A-B or one seed: the runs' seeds")
    p.add_argument("--levels", default="3,8;2,6;2,4", help="uniform w,a pairs, ;-separated")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_mixed")
    args = p.parse_args(argv)
    from bench_pipeline import trained_teacher

    torch.set_num_threads(1)
    first, _, last = args.seeds.partition("-")
    seeds = range(int(first), int(last or first) + 1)
    levels = [tuple(int(b) for b in level.split(",")) for level in args.levels.split(";")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = data.load("npz", args.data, batch_size=128, seed=0)
    teacher, _ = trained_teacher(args.runs, 8, bundle, "teacher_all_training.pt")
    teacher.eval()
    print("| seed | level | variant | calibration change (pp) | held-out change (pp) | 95 % interval | BitOpsCR "
          "| bits per MAC | seconds |\n|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        source = args.runs / f"budget{args.budget:g}_seed{seed}" / "stage2_P.pt"
        for w, a in levels:
            uniform = None
            for variant in variants if "uniform" in variants else ["uniform"] + variants:
                row = _run(args, source, seed, (w, a), variant, teacher, uniform)
                uniform = row if variant == "uniform" else uniform
                if variant in variants:
                    print(f"| {seed} | {w}w{a}a | {variant} | {row['calibration_change']:+.2f} | {row['change']:+.2f} "
                          f"| [{row['interval'][0]:+.2f}, {row['interval'][1]:+.2f}] | {row['bitops_cr']:.0f}x "
                          f"| {row['bits_per_mac']:.2f} | {row['seconds']:.0f} |", flush=True)
    print("\nbits per layer of the auto variants (w, a):")
    for path in sorted(args.out.glob("*.json")):
        row = json.loads(path.read_text())
        if row.get("bits"):
            print(f"  {path.stem}: " + ", ".join(f"{n} {w}w{a}a" for n, (w, a) in row["bits"].items()))
    return 0


def _run(args, source: Path, seed: int, level, variant: str, teacher, uniform) -> dict:
    """One Q run (cached in ``--out``): its changes against the teacher, BitOpsCR, bits."""
    path = args.out / f"b{args.budget:g}_seed{seed}_{level[0]}w{level[1]}a_{variant}.json"
    if path.is_file():
        return json.loads(path.read_text())
    bundle = data.load("npz", args.data, batch_size=128, seed=0)
    bundle.val_loader, bundle.calibration_loader = data.split_loader(bundle.val_loader, 0.3, seed=seed)
    model = ordercomp.load(source)
    quantize = {"w_bits": level[0], "a_bits": level[1]}
    if variant != "uniform":
        quantize = {"policy": "auto", "bits_per_mac": uniform["bits_per_mac"]}
    config = {"order": "Q", "train": {"epochs": args.epochs, "seed": seed, "progress": False}, "quantize": quantize}
    undo = _variant(variant)
    started = time.perf_counter()
    try:
        result = ordercomp.compress(model, bundle.train_loader, bundle.val_loader, config,
                                    calibration_loader=bundle.calibration_loader, reference=teacher)
    finally:
        undo()
    report = result.report
    stage = report["stages"][-1]
    row = {"seed": seed, "level": list(level), "variant": variant, "change": stage["accuracy_change"],
           "interval": stage["accuracy_change_interval"],
           "calibration_change": stage["calibration_accuracy"] - report["original"]["calibration_accuracy"],
           "bitops_cr": stage["bitops_cr"], "bits_per_mac": stage["bitops"] / stage["macs"],
           "bits": {n: list(b) for n, b in stage["info"]["bits"].items()} if variant != "uniform" else None,
           "seconds": time.perf_counter() - started}
    path.write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    sys.exit(main())
