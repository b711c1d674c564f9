"""Real torchvision and timm classifiers through ``compress()`` and ``export()`` with the defaults.

    python benchmarks/bench_models.py [--models NAME ...] [--pretrain-epochs N] [--memory-gb G] [--out DIR]

Every model is built random-initialised for 10 classes, optionally trained ``--pretrain-epochs``
on the bundled natural images (CIFAR-10 part, 32 x 32 RGB), then compressed with the default DPQE
and config (one short epoch: ``train.max_batches=2``, so the table measures whether the defaults
run, not what accuracy they reach), and exported in both modes; each export's top-1 agreement with
PyTorch is measured on the held-out images. Each model runs in its own process under a memory
limit (``--memory-gb``) and a time limit (``--timeout``), so a model that eats the machine is a
row, not a crash. Finished models are cached in ``--out`` (rerun to resume; ``--fresh`` redoes;
``--reexport`` exports their compressed models again, after a change to the export).

``--points`` (with ``--models``) looks into the fast graph of saved runs instead: the top-1
agreement of its PyTorch twin with the model on the held-out images with every re-quantized
conv output, with none, and the five costliest outputs measured one at a time (the KL divergence
of the logits when only that one rounds, as ``min_agreement`` ranks them).

It needs torchvision and timm, which import only beside the torch build they were made for, so it
runs in its own environment (the project's default install has the CPU torch wheel)::

    python -m venv .venv-models
    .venv-models/bin/pip install -r benchmarks/requirements-models.txt
    ORDERCOMP_DISABLE_EXT=1 .venv-models/bin/python benchmarks/bench_models.py

(the repository is imported from its folder; the compiled library, built for the other torch, is
left out, and the pure-PyTorch references run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = [
    # (library, name): ResNets, MobileNetV2/V3, EfficientNet, RegNet, ShuffleNet, SqueezeNet, DenseNet,
    # GoogLeNet, MNASNet, ConvNeXt, ResNeXt, GhostNet, RepVGG, HRNet, DLA, CSP nets, ReXNet.
    ("torchvision", "resnet18"),
    ("torchvision", "resnext50_32x4d"),
    ("torchvision", "mobilenet_v2"),
    ("torchvision", "mobilenet_v3_small"),
    ("torchvision", "efficientnet_b0"),
    ("torchvision", "regnet_x_400mf"),
    ("torchvision", "regnet_y_400mf"),
    ("torchvision", "shufflenet_v2_x0_5"),
    ("torchvision", "squeezenet1_1"),
    ("torchvision", "densenet121"),
    ("torchvision", "googlenet"),
    ("torchvision", "mnasnet0_5"),
    ("torchvision", "convnext_tiny"),
    ("timm", "resnet18"),
    ("timm", "mobilenetv3_large_100"),
    ("timm", "efficientnet_b0"),
    ("timm", "ghostnet_100"),
    ("timm", "repvgg_a0"),
    ("timm", "hrnet_w18_small"),
    ("timm", "dla34"),
    ("timm", "cspresnet50"),
    ("timm", "rexnet_100"),
    ("timm", "regnety_004"),
    ("timm", "mixnet_s"),
]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DIGITS_MEAN, DIGITS_STD = 0.1307, 0.3081
COLUMNS = ("model", "ok", "seconds", "peak_gb", "bitops_cr", "pruned", "exits", "original", "accuracy", "fast", "exact",
           "error")
TRAINED = 90.0  # a compressed model at least this accurate (%) is a trained one, for the agreement target
# exits: the heads kept (E drops them all when none pays on the calibration data).


def data(path: Path, batch_size: int = 64):
    """(train, val) loaders of ``path``, normalised; train shuffled. Natural images (NHWC RGB, the
    bundled CIFAR-10 part) as they are; digits (N x 28 x 28, the bundled MNIST) padded to 32 x 32
    and repeated over three channels, so that every model reads both."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    with np.load(path) as npz:
        split = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    digits = split["x_train"].ndim == 3
    mean = torch.tensor((DIGITS_MEAN,) * 3 if digits else CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor((DIGITS_STD,) * 3 if digits else CIFAR_STD).view(1, 3, 1, 1)

    def images(x):
        x = torch.from_numpy(x).float() / 255.0
        x = F.pad(x, (2, 2, 2, 2)).unsqueeze(1).repeat(1, 3, 1, 1) if digits else x.permute(0, 3, 1, 2)
        return (x - mean) / std

    train = TensorDataset(images(split["x_train"]), torch.from_numpy(split["y_train"]).long())
    val = TensorDataset(images(split["x_test"][:1000]), torch.from_numpy(split["y_test"][:1000]).long())
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=200))


def build(library: str, name: str):
    import torch

    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


def pretrain(model, train, epochs: int) -> None:
    """A few epochs of AdamW, so the export agreement is measured on a model that has learned (plain SGD
    at lr 0.05 leaves EfficientNet-B0 at 14 % on the digits after 150 steps; AdamW at 2e-3: 72 %)."""
    import torch

    if not epochs:
        return
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    settle_batch_norms(model, train)


def settle_batch_norms(model, train, batches: int = 50) -> None:
    """Running statistics of the batch norms that keep more than 99 % of them per step, averaged anew
    over ``batches`` training batches. torchvision's MNASNet keeps 99.97 %: after a few epochs its
    statistics are still near their start, its activations in eval mode reach 1e15 and it is at
    chance (8.9 % on the digits), although it trains. Other models are left as trained."""
    import torch

    slow = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.momentum is not None and m.momentum < 0.01]
    if not slow:
        return
    kept = [m.momentum for m in slow]
    for m in slow:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for x, _ in itertools.islice(train, batches):
            model(x)
    for m, momentum in zip(slow, kept):
        m.momentum = momentum


def one(library: str, name: str, args) -> dict:
    """Compresses and exports one model; the row of the table."""
    import torch

    import ordercomp

    torch.set_num_threads(args.threads)
    row = {"model": f"{library}/{name}", "ok": False}
    work = args.out / f"{library}_{name}"
    train, val = data(args.data)
    start = time.perf_counter()
    model = build(library, name)
    pretrain(model, train, args.pretrain_epochs)
    config = {"order": args.order, "device": "cpu",
              "train": {"epochs": 1, "max_batches": args.max_batches or None, "progress": False}}
    result = ordercomp.compress(model, train, val, config, out=work / "run", overwrite=True)
    row["compress_seconds"] = round(time.perf_counter() - start, 1)
    stages = {s["stage"]: s for s in result.report["stages"]}
    row["bitops_cr"] = round(float(result.report["stages"][-1]["bitops_cr"]), 1)
    if "P" in stages:
        prune = stages["P"]["info"]
        row["pruned"] = f"{1 - prune['channels_after'] / prune['channels_before']:.0%}"
    if "E" in stages:
        exit_info = stages["E"]["info"]
        row["exits"] = 0 if exit_info.get("heads_dropped") else len(exit_info["points"])
    row["exit_points"] = result.report["exit_points"]
    row.update(export_both(result, work, train, val, model=model))
    row["original"] = round(result.report["original"]["accuracy"], 2)
    row["accuracy"] = round(result.report["stages"][-1]["accuracy"], 2)
    row["ok"] = True
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def export_both(result, work: Path, train, val, **kwargs) -> dict:
    """``{"fast": agreement, "exact": agreement}`` of ``result`` (a compress result or a model)
    exported in both modes into ``work``, the fast graph calibrated on 1 024 training inputs, as
    the command line takes."""
    import torch

    import ordercomp

    calibration = torch.cat([x for x, _ in itertools.islice(train, 16)])
    agreement = {}
    for mode in ("fast", "exact"):
        shutil.rmtree(work / mode, ignore_errors=True)
        exported = ordercomp.export(result, work / mode, mode=mode, calibration=calibration, data=val, **kwargs)
        agreement[mode] = round(exported.comparison["agreement"], 2)
    return agreement


def reexport(library: str, name: str, args) -> dict:
    """Exports again the compressed model an earlier run of ``one`` saved (``--reexport``: after a
    change to the export, without compressing anew); the row keeps its other columns. The fast
    graph is calibrated on 1 024 training inputs as before, not the same ones."""
    import torch

    import ordercomp

    torch.set_num_threads(args.threads)
    work = args.out / f"{library}_{name}"
    row = json.loads(Path(args.row).read_text())
    train, val = data(args.data)
    start = time.perf_counter()
    row.update(export_both(ordercomp.results.load(work / "run" / "model.pt", model=build(library, name)),
                           work, train, val))
    row["export_seconds"] = round(time.perf_counter() - start, 1)
    return row


def points(library: str, name: str, args) -> None:
    """Prints what the fast graph's re-quantized outputs cost a saved run (``--points``)."""
    import torch

    import ordercomp
    from ordercomp.deploy.agreement import agreement, sensitivities
    from ordercomp.deploy.api import INT8_MIN_CHANNELS
    from ordercomp.deploy.twin import RequantPoint, calibrate, rewrite

    torch.set_num_threads(args.threads)
    train, val = data(args.data)
    model = ordercomp.results.load(args.out / f"{library}_{name}" / "run" / "model.pt", model=build(library, name)).eval()
    twin = rewrite(model, "fast", INT8_MIN_CHANNELS)
    calibrate(twin, [x for x, _ in itertools.islice(train, 16)])  # 1 024 inputs, as the export takes
    held_out = [x for x, _ in val]
    found = [m for m in twin.modules() if isinstance(m, RequantPoint)]
    signed = [m for m in found if m.spec.zero_point != 0]
    every = agreement(model, twin, held_out)
    specs = [m.spec for m in found]
    for m in found:
        m.spec = None
    none = agreement(model, twin, held_out)
    for m, spec in zip(found, specs):
        m.spec = spec
    costs = sensitivities(model, twin, held_out)
    total = sum(costs.values())
    print(f"{library}/{name}: {len(found)} re-quantized outputs ({len(signed)} over a signed range); agreement on "
          f"{sum(len(x) for x in held_out)} held-out inputs: {every:.1f} % with all of them, {none:.1f} % with none")
    for layer in sorted(costs, key=costs.get, reverse=True)[:5]:
        print(f"  {layer}: KL {costs[layer]:.5f} ({100 * costs[layer] / total:.0f} % of the sum)")


def child(args) -> int:
    """Runs one model (``--one LIB/NAME``) and writes its row to ``--row``."""
    library, name = args.one.split("/", 1)
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.perf_counter()
    try:
        row = reexport(library, name, args) if args.reexport else one(library, name, args)
    except BaseException as exc:  # a row says what went wrong, whatever it was
        traceback.print_exc()
        last = traceback.extract_tb(exc.__traceback__)[-1]
        row = {"model": args.one, "ok": False, "seconds": round(time.perf_counter() - start, 1),
               "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} "
                        f"({Path(last.filename).name}:{last.lineno})"}
    if not args.reexport:  # a row exported again keeps the peak of its compression
        row["peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    Path(args.row).write_text(json.dumps(row))
    return 0


def run(library: str, name: str, args) -> dict:
    """One model in its own process, cached in ``--out``."""
    path = args.out / f"{library}_{name}.json"
    if args.reexport:
        if not (path.exists() and json.loads(path.read_text())["ok"]):
            return json.loads(path.read_text()) if path.exists() else {"model": f"{library}/{name}", "ok": False,
                                                                        "error": "no earlier run to export again"}
    elif path.exists() and not args.fresh:
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--one", f"{library}/{name}", "--row", str(path),
               "--data", str(args.data), "--out", str(args.out), "--memory-gb", str(args.memory_gb),
               "--pretrain-epochs", str(args.pretrain_epochs), "--max-batches", str(args.max_batches),
               "--threads", str(args.threads), "--order", args.order] + (["--reexport"] if args.reexport else [])
    start = time.perf_counter()
    try:
        with open(args.out / f"{library}_{name}.log", "w") as log:
            done = subprocess.run(command, timeout=args.timeout, stdout=log, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        row = {"model": f"{library}/{name}", "ok": False, "error": f"no result within {args.timeout} s"}
    else:
        if path.exists():
            return json.loads(path.read_text())
        tail = (args.out / f"{library}_{name}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        row = {"model": f"{library}/{name}", "ok": False, "error": f"process ended ({done.returncode}): {tail[0][:300]}"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(row))
    return row


def table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="LIB/NAME entries (default: all %d)" % len(MODELS))
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar_part_dev.npz",
                   help="npz with x_train, y_train, x_test, y_test: RGB images in NHWC or digits N x 28 x 28 (default: "
                        "../shared/data/cifar_part_dev.npz); the first 1 000 test images are the held-out data")
    p.add_argument("--pretrain-epochs", type=int, default=0, help="epochs of plain training before compress")
    p.add_argument("--order", default="DPQE", help="the stages to run (PQE on a --pretrain-epochs model: a trained "
                   "compressed model in a few batches, for the export agreement; D's thinner student starts untrained)")
    p.add_argument("--max-batches", type=int, default=2,
                   help="batches per epoch in compress's training (0: the recipe's, at least 400 steps per stage)")
    p.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit per model")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_models")
    p.add_argument("--fresh", action="store_true", help="rerun models already in --out")
    p.add_argument("--reexport", action="store_true", help="export the compressed models of the runs in --out again "
                   "(after a change to the export), keeping the rest of each row")
    p.add_argument("--points", action="store_true", help="what the fast graph's re-quantized outputs cost the saved "
                   "runs of --models (agreement with all, with none, the costliest five)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return child(args)
    if not args.data.is_file():
        p.error(f"--data: no file at {args.data}")
    chosen = [tuple(m.split("/", 1)) for m in args.models] if args.models else MODELS
    for m in chosen:
        if len(m) != 2 or m[0] not in ("torchvision", "timm"):
            p.error(f"--models: entries are torchvision/NAME or timm/NAME, got {'/'.join(m)!r}")
    if args.points:
        for library, name in chosen:
            points(library, name, args)
        return 0
    rows = []
    for library, name in chosen:
        rows.append(run(library, name, args))
        r = rows[-1]
        print(f"{r['model']}: {'ok' if r['ok'] else 'FAILED'} in {r.get('seconds')} s"
              + (f" ({r['error']})" if r.get("error") else ""), flush=True)
    print()
    print(table(rows))
    done = sum(r["ok"] for r in rows)
    print(f"\n{done} of {len(rows)} compress and export with the defaults -> {'MET' if done == len(rows) else 'MISSED'}")
    trained = [r for r in rows if r.get("fast") is not None and r["accuracy"] >= TRAINED]
    print(f"fast-export agreement >= 99 % on the {len(trained)} trained models (compressed to >= {TRAINED:g} % "
          f"accuracy): {sum(r['fast'] >= 99 for r in trained)} of {len(trained)} -> "
          + ("MET" if trained and all(r["fast"] >= 99 for r in trained) else "MISSED" if trained else
             "no trained model (--pretrain-epochs trains one)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
