"""Which sensitivity ranks layers as lowering their bits really hurts: KL divergence or HAWQ's Hessian.

    python benchmarks/bench_sensitivity.py [--model resnet20] [--data mnist24k.npz] [--out DIR]

A zoo model is trained on the digits (``--epochs``, cached in ``--out``), quantized at 8w8a with
calibrated clips, and every quantized layer is lowered alone to each option (2w8a, 3w8a, 8w4a,
2w4a): the **true change** is the accuracy (and the mean cross-entropy) of that model on 2 000
held-back training digits no step trained on, against the 8w8a model. Each measure ranks the
layers per option from two calibration batches of 64, as ``quantize.policy="auto"`` measures them:

- ``kl``: the KL divergence of the predictions with that layer alone lowered (:func:`ordercomp.stages.mixed.sensitivities`);
- ``hessian``: the mean Hessian trace of the loss over the layer's weights times the squared change
  of its weights (HAWQ-v2, :func:`ordercomp.stages.mixed.hessian_sensitivities`); weights only,
  so it ranks the options that lower weight bits.

Printed: Spearman's rank correlation of each measure with the true change of the loss and of the
accuracy, per option and over all (layer, option) pairs together.
"""

from __future__ import annotations

import argparse
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
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ordercomp import models
    from ordercomp.nn import QuantLayer, quantize_model
    from ordercomp.stages.mixed import hessian_sensitivities, sensitivities
    from ordercomp.train import Trainer, TrainConfig
    from torch.utils.data import DataLoader, TensorDataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist24k.npz")
    p.add_argument("--epochs", type=int, default=2)
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
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(args.epochs):
            order = torch.randperm(len(x_train))
            for i in range(0, len(order), 64):
                idx = order[i:i + 64]
                opt.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
        torch.save(model.state_dict(), cached)
    model, _ = quantize_model(model.eval(), 8, 8, example_input=x_train[:256], alpha="calibrated", policy="all")
    # DoReFa rescales every weight: the batch norms after them are re-estimated, as Q does
    batches = DataLoader(TensorDataset(x_train[:3200], y_train[:3200]), batch_size=64)
    Trainer(TrainConfig(progress=False)).recalibrate_bn(model, batches, 50)
    model.eval()

    @torch.no_grad()
    def measure():
        logits = torch.cat([model(x_held[i:i + 500]) for i in range(0, HELD, 500)])
        return 100 * float((logits.argmax(1) == y_held).float().mean()), float(F.cross_entropy(logits, y_held))

    base_acc, base_loss = measure()
    print(f"{args.model}, {args.epochs} epochs, 8w8a: {base_acc:.2f} % on {HELD} held-back digits (loss {base_loss:.4f})")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    true = {}
    for name, layer in layers.items():
        for w, a in OPTIONS:
            layer.configure(w, a)
            acc, loss = measure()
            true[(name, (w, a))] = (base_acc - acc, loss - base_loss)
            layer.configure(8, 8)
    batches = [x_train[:64], x_train[64:128]]
    kl = sensitivities(model, batches, OPTIONS)
    hess = hessian_sensitivities(model, [(x_train[:64], y_train[:64]), (x_train[64:128], y_train[64:128])],
                                 sorted({w for w, _ in OPTIONS}))

    def row(label, pairs):
        acc = [true[k][0] for k in pairs]
        loss = [true[k][1] for k in pairs]
        out = [label]
        for measure_name, value in (("kl", lambda k: kl[k[0]][k[1]]),
                                    ("hessian", lambda k: hess[k[0]][k[1][0]] if k[1][1] == 8 else None)):
            values = [value(k) for k in pairs]
            if any(v is None for v in values):
                out += ["", ""]
            else:
                out += [f"{spearman(values, loss):+.2f}", f"{spearman(values, acc):+.2f}"]
        return "| " + " | ".join(out) + " |"

    print("\nSpearman rank correlation with the true change (layers lowered alone, held-back digits)\n")
    print("| option | kl vs loss | kl vs accuracy | hessian vs loss | hessian vs accuracy |")
    print("|---|---|---|---|---|")
    for option in OPTIONS:
        print(row(f"{option[0]}w{option[1]}a ({len(layers)} layers)", [(n, option) for n in layers]))
    weights_only = [(n, o) for n in layers for o in OPTIONS if o[1] == 8]
    print(row(f"all weight options ({len(weights_only)} pairs)", weights_only))
    print(row(f"all options ({len(true)} pairs)", list(true)))
    print("\nper layer (true accuracy change in pp at 2w4a, kl, hessian at 2 bits):")
    for name in layers:
        print(f"  {name}: {true[(name, (2, 4))][0]:+.2f} pp, kl {kl[name][(2, 4)]:.3g}, hessian {hess[name][2]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
