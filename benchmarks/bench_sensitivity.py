"""Which sensitivity ranks layers as lowering their bits really hurts: KL divergence or HAWQ's Hessian.

    python benchmarks/bench_sensitivity.py [--model resnet20] [--data mnist24k.npz] [--out DIR]

A zoo model is trained on the digits (``--epochs``, cached in ``--out``), quantized at 8w8a with
calibrated clips (its batch-norm statistics re-estimated, as Q does), and every quantized layer is
lowered alone to each option (2w8a, 3w8a, 8w4a, 2w4a). Two **true changes**, each the mean
cross-entropy (and the accuracy) on 2 000 held-back training digits no step trained on:

- ``before fine-tuning``: the model with that layer lowered, against the 8w8a model;
- ``after fine-tuning``: the model with that layer lowered, its batch-norm statistics
  re-estimated, fine-tuned ``--finetune-steps`` steps (QAT on the labels, batch 64, SGD at 0.015,
  the same data order for every run) and re-estimated again, against the 8w8a model fine-tuned
  the same way: what a budget's Q keeps (``--finetune-steps 0`` skips it).

Each measure ranks the layers per option from two calibration batches of 64, as
``quantize.policy="auto"`` measures them:

- ``kl stale``: the KL divergence of the predictions with that layer alone lowered, on the 8w8a
  model before its batch-norm statistics were re-estimated (how Q measured until this version);
- ``kl``: the same on the re-estimated 8w8a model (:func:`ordercomp.stages.mixed.sensitivities`:
  what Q measures now);
- ``kl bn``: the same with the statistics also re-estimated at each option first (``recalibrate``,
  on 8 training batches);
- ``hessian``: the mean Hessian trace of the loss over the layer's weights times the squared change
  of its weights (HAWQ-v2, :func:`ordercomp.stages.mixed.hessian_sensitivities`); weights only,
  so it ranks the options that lower weight bits.

Printed: Spearman's rank correlation of each measure with each true change of the loss (and of
the accuracy), per option and over all (layer, option) pairs together.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS = [(2, 8), (3, 8), (8, 4), (2, 4)]
HELD = 2000  # the last training digits: never trained on, the true change is measured on them


def spearman(a, b) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> int:
    import copy

    import numpy as np
    import torch
    import torch.nn.functional as F

    from ordercomp import models
    from ordercomp.nn import QuantLayer, quantize_model
    from ordercomp.stages.mixed import hessian_sensitivities, sensitivities
    from ordercomp.train import Trainer, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist24k.npz")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=100, help="steps of the fine-tuned true change (0: none)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_sensitivity")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with np.load(args.data) as npz:
        x = (torch.from_numpy(npz["x_train"]).float().unsqueeze(1) / 255 - 0.1307) / 0.3081
        y = torch.from_numpy(npz["y_train"]).long()
    x_train, y_train, x_held, y_held = x[:-HELD], y[:-HELD], x[-HELD:], y[-HELD:]
    model = models.create(args.model, in_channels=1)
    args.out.mkdir(parents=True, exist_ok=True)
    cached = args.out / f"{args.model}_e{args.epochs}.pt"
    if cached.exists():
        model.load_state_dict(torch.load(cached, weights_only=True))
    else:
        train(model, x_train, y_train, args.epochs * len(x_train) // 64, lr=0.05)
        torch.save(model.state_dict(), cached)
    model, _ = quantize_model(model.eval(), 8, 8, example_input=x_train[:256], alpha="calibrated", policy="all")
    stale = copy.deepcopy(model).eval()  # the statistics of the float model: what Q measured on until now
    # DoReFa rescales every weight: the batch norms after them are re-estimated, as Q does
    trainer = Trainer(TrainConfig(progress=False))
    norm = [(x_train[i:i + 64], None) for i in range(0, 8 * 64, 64)]

    def recalibrate(m, batches=None):
        trainer.recalibrate_bn(m, batches or norm, len(batches or norm))

    recalibrate(model, [(x_train[i:i + 64], None) for i in range(0, 3200, 64)])
    model.eval()

    @torch.no_grad()
    def measure(m):
        m.eval()
        logits = torch.cat([m(x_held[i:i + 500]) for i in range(0, HELD, 500)])
        return 100 * float((logits.argmax(1) == y_held).float().mean()), float(F.cross_entropy(logits, y_held))

    def finetuned(m):
        recalibrate(m)
        train(m, x_train, y_train, args.finetune_steps, lr=0.015, seed=1)
        recalibrate(m)
        return measure(m)

    base_acc, base_loss = measure(model)
    print(f"{args.model}, {args.epochs} epochs, 8w8a: {base_acc:.2f} % on {HELD} held-back digits "
          f"(loss {base_loss:.4f})")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    truths = {"before fine-tuning": {}}
    for name, layer in layers.items():
        for w, a in OPTIONS:
            layer.configure(w, a)
            acc, loss = measure(model)
            truths["before fine-tuning"][(name, (w, a))] = (base_acc - acc, loss - base_loss)
            layer.configure(8, 8)
    if args.finetune_steps:
        tuned_acc, tuned_loss = finetuned(copy.deepcopy(model))
        print(f"8w8a fine-tuned {args.finetune_steps} steps: {tuned_acc:.2f} % (loss {tuned_loss:.4f})")
        truths["after fine-tuning"] = {}
        for name in layers:
            for w, a in OPTIONS:
                lowered = copy.deepcopy(model)
                dict(lowered.named_modules())[name].configure(w, a)
                acc, loss = finetuned(lowered)
                truths["after fine-tuning"][(name, (w, a))] = (tuned_acc - acc, loss - tuned_loss)
    batches = [x_train[:64], x_train[64:128]]
    kl_stale = sensitivities(stale, batches, OPTIONS)
    kl = sensitivities(model, batches, OPTIONS)
    kl_bn = sensitivities(model, batches, OPTIONS, recalibrate=recalibrate)
    hess = hessian_sensitivities(model, [(x_train[:64], y_train[:64]), (x_train[64:128], y_train[64:128])],
                                 sorted({w for w, _ in OPTIONS}))
    measures = {"kl stale": lambda k: kl_stale[k[0]][k[1]], "kl": lambda k: kl[k[0]][k[1]],
                "kl bn": lambda k: kl_bn[k[0]][k[1]],
                "hessian": lambda k: hess[k[0]][k[1][0]] if k[1][1] == 8 else None}

    def row(label, pairs, true):
        acc = [true[k][0] for k in pairs]
        loss = [true[k][1] for k in pairs]
        out = [label]
        for value in measures.values():
            values = [value(k) for k in pairs]
            if any(v is None for v in values):
                out += ["", ""]
            else:
                out += [f"{spearman(values, loss):+.2f}", f"{spearman(values, acc):+.2f}"]
        return "| " + " | ".join(out) + " |"

    weights_only = [(n, o) for n in layers for o in OPTIONS if o[1] == 8]
    everything = [(n, o) for n in layers for o in OPTIONS]
    for label, true in truths.items():
        print(f"\nSpearman rank correlation with the true change {label} (layers lowered alone, held-back digits), "
              f"against the loss / the accuracy\n")
        print("| option | " + " | ".join(f"{m} vs loss | {m} vs accuracy" for m in measures) + " |")
        print("|---" * (1 + 2 * len(measures)) + "|")
        for option in OPTIONS:
            print(row(f"{option[0]}w{option[1]}a ({len(layers)} layers)", [(n, option) for n in layers], true))
        print(row(f"all weight options ({len(weights_only)} pairs)", weights_only, true))
        print(row(f"all options ({len(everything)} pairs)", everything, true))
    print("\nper layer at 2w4a: true change of the loss before / after fine-tuning, kl stale, kl, kl bn, "
          "hessian at 2 bits:")
    for name in layers:
        after = truths.get("after fine-tuning", {}).get((name, (2, 4)), (math.nan, math.nan))[1]
        print(f"  {name}: {truths['before fine-tuning'][(name, (2, 4))][1]:+.4f} / {after:+.4f}, "
              f"{kl_stale[name][(2, 4)]:.3g}, {kl[name][(2, 4)]:.3g}, {kl_bn[name][(2, 4)]:.3g}, {hess[name][2]:.3g}")
    return 0


def train(model, x, y, steps: int, lr: float, seed: int = 0) -> None:
    """``steps`` of SGD on the labels (batch 64, momentum 0.9, weight decay 5e-4), the data order from ``seed``."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    done = 0
    while done < steps:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(order) - 63, 64):
            if done == steps:
                break
            idx = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
    model.eval()


if __name__ == "__main__":
    sys.exit(main())
