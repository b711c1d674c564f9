"""Does the recipe's fine-tuning optimizer keep a trained torchvision/timm model? SGD against AdamW.

    python benchmarks/bench_finetune_optimizer.py [--model torchvision/efficientnet_b0] [--batches 50]

The model is trained as ``bench_models.py --pretrain-epochs 1`` trains it (AdamW, one epoch of the
bundled digits padded to 32 x 32), then fine-tuned in float, without any compression, for
``--batches`` batches: once with the trainer's default optimizer at its fine-tuning rate (SGD, lr
0.05 x 0.3, momentum 0.9, weight decay 5e-4), once with AdamW at 2e-4. Printed: the held-out
accuracy before, after each fine-tune, and after each fine-tune with its batch norms re-estimated.
It runs in the models environment (see ``bench_models.py``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None) -> int:
    import torch

    from bench_models import build, data, pretrain
    from ordercomp.train import TrainConfig, Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="torchvision/efficientnet_b0", help="LIB/NAME")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist24k.npz")
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    library, name = args.model.split("/", 1)
    train, val = data(args.data)
    model = build(library, name)
    pretrain(model, train, 1)

    def accuracy(m) -> float:
        m.eval()
        with torch.no_grad():
            return 100 * sum((m(x).argmax(1) == y).sum().item() for x, y in val) / len(val.dataset)

    print(f"{args.model} after one epoch of AdamW: {accuracy(model):.1f} % on {len(val.dataset)} held-out digits")
    config = TrainConfig(progress=False)
    optimizers = {
        f"SGD lr {config.lr * config.finetune_lr_scale:g} (the trainer's default at its fine-tuning rate)":
            lambda ps: torch.optim.SGD(ps, lr=config.lr * config.finetune_lr_scale, momentum=config.momentum,
                                       weight_decay=config.weight_decay),
        "AdamW lr 2e-4": lambda ps: torch.optim.AdamW(ps, lr=2e-4),
    }
    for label, make in optimizers.items():
        tuned = copy.deepcopy(model)
        opt = make(tuned.parameters())
        tuned.train()
        for x, y in itertools.islice(iter(train), args.batches):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(tuned(x), y).backward()
            opt.step()
        after = accuracy(tuned)
        Trainer(config).recalibrate_bn(tuned, train, 20)
        print(f"  {label}, {args.batches} batches: {after:.1f} %; batch norms re-estimated: {accuracy(tuned):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
