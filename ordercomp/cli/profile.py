"""``ordercomp profile``: the MACs / BitOps / storage table of a zoo model."""

from __future__ import annotations

import json

import torch

from .. import bitops, checks, models

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="print the MACs / BitOps / storage table of a zoo model")
    p.add_argument("--model", required=True, choices=models.names(), metavar="NAME",
                   help=f"one of {', '.join(models.names())}")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    checks.integer("--num-classes", args.num_classes, 1)
    checks.integer("--in-channels", args.in_channels, 1)
    checks.integer("--size", args.size, 1)
    model = models.create(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    result = bitops.profile(model, torch.zeros(1, args.in_channels, args.size, args.size))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0
