"""ordercomp: compress CNNs by chaining distillation, pruning, quantization and early exit in the right order."""

from __future__ import annotations

from . import errors
from .errors import (
    ArgumentTypeError,
    BadFileError,
    ConfigError,
    DataError,
    MissingDependencyError,
    MissingFileError,
    ModelError,
    OrdercompError,
    RunDirError,
    RunError,
    TrainingError,
)

try:
    import torch as _torch  # noqa: F401
except ImportError:  # a deployment machine: only ordercomp.runtime (numpy + onnxruntime) is usable there
    _torch = None
if _torch is not None:
    from . import _ext, bitops, checks, data, losses, models, nn, ops, reference, results, stages, train
    from .bitops import Profile, compression_ratios, exit_costs, expected_bitops, profile
    from .data import IndexedDataset
    from .deploy import Exported, export
    from .losses import CRDLoss, distillation_loss
    from .pipeline import BudgetConfig, CompressConfig, CompressResult, compress, run_order, run_stage
    from .results import load
    from .search import SearchPlan, search_order
    from .stages import (
        Context, Distill, EarlyExit, Phase, Prepared, Prune, Quantize, Stage, prune_channels, register_stage,
    )
    from .train import TrainConfig, Trainer

    def backend_info() -> dict:
        """Which implementation of the ops is in use and why.

        Keys: ``compiled`` (the C++ library is loaded), ``cuda`` (its CUDA kernels are usable),
        ``reason`` (a sentence saying why), ``build`` (how the library was built, when loaded).
        """
        return _ext.info()


__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "BadFileError",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "MissingFileError",
    "ModelError",
    "OrdercompError",
    "RunDirError",
    "RunError",
    "TrainingError",
    "errors",
    "__version__",
]
if _torch is not None:
    __all__ += [
        "checks",
        "CRDLoss",
        "CompressConfig",
        "BudgetConfig",
        "CompressResult",
        "Context",
        "Distill",
        "EarlyExit",
        "IndexedDataset",
        "Prune",
        "Quantize",
        "Phase",
        "Prepared",
        "Stage",
        "register_stage",
        "load",
        "results",
        "run_stage",
        "SearchPlan",
        "TrainConfig",
        "Trainer",
        "compress",
        "distillation_loss",
        "losses",
        "prune_channels",
        "run_order",
        "search_order",
        "stages",
        "train",
        "backend_info",
        "bitops",
        "compression_ratios",
        "data",
        "exit_costs",
        "expected_bitops",
        "models",
        "nn",
        "ops",
        "profile",
        "Profile",
        "reference",
        "export",
        "Exported",
    ]
