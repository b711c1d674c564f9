"""Deployment: measured latency of a run's original and of each stage, next to BitOps; int8 against float by width.

Part 1 (``RUN_DIR``, default ``runs/demo``, the main command's run): ``ordercomp bench`` on it.
Every model is exported (the original in float, each stage ``fast``) and timed through
``ordercomp.runtime`` with the same session options (all graph optimisations, 2 intra-op
threads), in interleaved rounds on 1 024 held-out digits, at batch 1 and 64; the original also
runs in PyTorch eager. Prints the table with the targets of the final model (MET / MISSED) and
writes ``RUN_DIR/bench.json``; the run's report gains the speed-up column.

Part 2 (``--widths``): why ``int8_min_channels`` is 32. Four 3x3 convs of C channels at S x S
(batch norm folded, ReLU) are timed in float and as ``QLinearConv`` (4-bit weights, 8-bit inputs,
``int8_min_channels=0``), interleaved, batch 1 and 64, for the widths and sizes a small CIFAR-style
ResNet has (milliseconds per call).

Part 3 (``--agreement``): the tests' model (``tests/data/dpqe_resnet8.pt``, the main command's
DPQE result) exported ``fast``, ``fast`` with every quantized conv in int8, and ``exact``
(ranges from 512 training digits), each compared with PyTorch through the driver on the 512
test digits of ``tests/data/mnist_slice.npz``.

Part 4 (``--graphs RUN_DIR``): why ``graph="single"`` is the default. The run's last two stages
(the final ExitNet and the stage before it, without exits) are exported ``fast``, the ExitNet both
as one graph that decides its exits and as segments and heads driven from Python, and timed
interleaved at batch 1 and 64 on the run's held-out inputs.

Part 5 (``--shapes RUN_DIR``): shapes that BitOps does not see, timed on one thread against the
original's float graph (interleaved, batch 1 and 64): the run's final model exported ``fast``
with ``int8_min_channels`` 0 (every quantized conv in int8), 16, 32 (the default) and 64, and run
without its exits (threshold 2); and the student resnet8 at several channel widths (random
weights, batch norms set on digits, 4-bit weights and 8-bit inputs, first and last layers at 8
bits), with their MACs, to see whether channel multiples pay beyond their MACs.

    python benchmarks/bench_deploy.py runs/demo
    python benchmarks/bench_deploy.py --widths
    python benchmarks/bench_deploy.py --agreement
    python benchmarks/bench_deploy.py --graphs runs/demo
    python benchmarks/bench_deploy.py --shapes runs/demo

Run it alone: another busy process on 2 cores moves every number.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

import ordercomp  # noqa: E402
from ordercomp import export, runtime  # noqa: E402
from ordercomp.cli import main  # noqa: E402
from ordercomp.deploy.timing import time_variants  # noqa: E402
from ordercomp.nn import ExitNet, quantize_model  # noqa: E402



def _chain(channels: int) -> nn.Sequential:
    """Four 3x3 convs (batch norm, ReLU) of ``channels`` channels, pooled into 10 logits."""
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()


def widths(rounds: int) -> None:
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="ordercomp-widths-"))
    print(f"{'channels':>8} {'size':>6} {'float b1':>9} {'int8 b1':>8} {'float b64':>10} {'int8 b64':>9} {'int8/float b64':>15}")
    for channels, size in ((8, 28), (16, 28), (16, 14), (32, 14), (32, 7), (64, 7)):
        x = torch.rand(256, channels, size, size)
        export(_chain(channels), root / f"float{channels}_{size}", "exact", input_shape=[channels, size, size])
        q, _ = quantize_model(_chain(channels), 4, 8, policy="all", example_input=x[:64], alpha="calibrated")
        export(q.eval(), root / f"int8{channels}_{size}", "fast", calibration=x, int8_min_channels=0)
        runs = {kind: runtime.load(root / f"{kind}{channels}_{size}").run for kind in ("float", "int8")}
        t = time_variants(runs, x.numpy(), (1, 64), rounds)
        print(f"{channels:>8} {size:>3}x{size:<2} {t['float'][1]:>9.3f} {t['int8'][1]:>8.3f} {t['float'][64]:>10.2f} "
              f"{t['int8'][64]:>9.2f} {t['int8'][64] / t['float'][64]:>15.2f}")


def agreement() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_mnist24k

    x, _, xt, yt = load_mnist24k(512, 512)
    model = ordercomp.load(REPO / "tests" / "data" / "dpqe_resnet8.pt")
    root = Path(tempfile.mkdtemp(prefix="ordercomp-agreement-"))
    for name, mode, channels in (("fast", "fast", None), ("fast, every conv int8", "fast", 0),
                                 ("exact", "exact", None)):
        kwargs = {} if channels is None else {"int8_min_channels": channels}
        out = export(model, root / name.replace(" ", "_").replace(",", ""), mode, calibration=x, data=(xt, yt),
                     **kwargs)
        print(f"-- {name}: same exit as PyTorch for {out.comparison['same_exit']:.2f} % of the inputs")
        print(out.summary())


def graphs(run_dir: Path, rounds: int) -> None:
    from ordercomp.cli.bench import _inputs
    from ordercomp.cli.common import read_run, read_run_model
    from ordercomp.cli.export import deploy_data
    from ordercomp.pipeline import stage_file_name

    state, _ = read_run(run_dir)
    records = state["records"][-2:]
    calibration, held_out, _ = deploy_data(run_dir, state, None)
    root = Path(tempfile.mkdtemp(prefix="ordercomp-graphs-"))
    variants = {}
    for record in records:
        model = read_run_model(run_dir / stage_file_name(record))
        name = f"{record['step']}. {record['stage']}"
        layouts = ("single", "segments") if isinstance(model, ExitNet) else ("single",)
        for graph in layouts:
            label = name + (f", graph={graph}" if len(layouts) > 1 else "")
            export(model, root / label.replace(" ", "_").replace(",", "").replace("=", "_"), "fast",
                   calibration=calibration, graph=graph)
            variants[label] = runtime.load(root / label.replace(" ", "_").replace(",", "").replace("=", "_")).run
    t = time_variants(variants, _inputs(held_out), (1, 64), rounds)
    print(f"ONNX Runtime, 2 intra-op threads, median ms per call over {rounds} interleaved rounds ({run_dir})")
    print(f"{'model':<32} {'batch 1':>8} {'batch 64':>9}")
    for label, per in t.items():
        print(f"{label:<32} {per[1]:>8.3f} {per[64]:>9.3f}")


WIDTHS = ((8, 16, 32), (9, 19, 38), (16, 16, 32), (8, 24, 48), (16, 32, 64))


def shapes(run_dir: Path, rounds: int) -> None:
    from ordercomp import bitops
    from ordercomp.cli.bench import _inputs, _original
    from ordercomp.cli.common import read_run, read_run_model
    from ordercomp.cli.export import deploy_data
    from ordercomp.models import ResNet

    torch.set_num_threads(1)
    state, _ = read_run(run_dir)
    calibration, held_out, _ = deploy_data(run_dir, state, None)
    original = _original(run_dir, None).eval()
    model = read_run_model(run_dir / "model.pt", original)
    x = torch.cat([b[0] for b in calibration])[:1024]
    shape = list(x.shape[1:])
    root = Path(tempfile.mkdtemp(prefix="ordercomp-shapes-"))
    folders = {"original, float": export(original, root / "original", "exact", input_shape=shape).path}
    for channels in (0, 16, 32, 64):
        folders[f"final, int8_min_channels={channels}"] = export(
            model, root / f"final{channels}", "fast", calibration=x, int8_min_channels=channels).path
    macs = {}
    for w in WIDTHS:
        net = ResNet([1, 1, 1], w, num_classes=10, in_channels=shape[0]).train()
        with torch.no_grad():
            net(x)  # batch-norm statistics of real inputs
        q, _ = quantize_model(net.eval(), 4, 8, example_input=x[:64], alpha="calibrated")
        label = f"resnet8 {'-'.join(map(str, w))}"
        macs[label] = bitops.profile(q.eval(), torch.zeros(1, *shape)).macs / 1e6
        folders[label] = export(q, root / label.replace(" ", "_"), "fast", calibration=x, min_agreement=0).path
    deployed = {label: runtime.load(folder, threads=1) for label, folder in folders.items()}
    variants = {label: d.run for label, d in deployed.items()}
    final = deployed["final, int8_min_channels=32"]
    variants["final, without its exits"] = lambda v: final.run(v, threshold=2.0)
    t = time_variants(variants, _inputs(held_out), (1, 64), rounds)
    reference = t["original, float"]
    print(f"ONNX Runtime, 1 intra-op thread, median ms per call over {rounds} interleaved rounds ({run_dir}); "
          "speed-up against the original's float graph")
    print(f"{'model':<36} {'MMACs':>6} {'batch 1':>8} {'batch 64':>9} {'speed-up b1 / b64':>18}")
    for label, per in t.items():
        m = f"{macs[label]:.2f}" if label in macs else ""
        print(f"{label:<36} {m:>6} {per[1]:>8.3f} {per[64]:>9.3f} "
              f"{reference[1] / per[1]:>8.2f}x / {reference[64] / per[64]:.2f}x")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", default=str(REPO / "runs" / "demo"))
    p.add_argument("--widths", action="store_true", help="part 2 only: int8 against float by width")
    p.add_argument("--agreement", action="store_true", help="part 3 only: the exports against PyTorch")
    p.add_argument("--graphs", action="store_true", help="part 4 only: the final ExitNet as one graph and as parts")
    p.add_argument("--shapes", action="store_true", help="part 5 only: int8 thresholds, exits and channel widths timed")
    p.add_argument("--rounds", type=int, default=8)
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    if args.widths:
        widths(args.rounds)
    elif args.agreement:
        agreement()
    elif args.graphs:
        graphs(Path(args.run_dir), args.rounds)
    elif args.shapes:
        shapes(Path(args.run_dir), args.rounds)
    else:
        sys.exit(main(["bench", args.run_dir, "--rounds", str(args.rounds)]))
