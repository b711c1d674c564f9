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
    from . import _ext, bitops, data, deploy, losses, models, nn, ops, pipeline, results, search, stages, stats, train
    from .bitops import Profile, compression_ratios, exit_costs, expected_bitops, profile
    from .data import IndexedDataset
    from .deploy import Exported, export
    from .losses import CRDLoss, DistillObjective, TaskObjective, distillation_loss, kd_loss
    from .pipeline import BudgetConfig, CompressConfig, CompressResult, compress, run_order, run_stage
    from .results import load
    from .search import SearchGrid, SearchPlan, search_order
    from .stages import (
        Context, Distill, EarlyExit, Phase, Prepared, Prune, Quantize, SessionPhase, Stage, StageResult,
        StageSession, choose_threshold, prune_channels, register_stage, seed_everything,
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
        # compress, search for the order, deploy
        "compress", "CompressConfig", "BudgetConfig", "CompressResult", "load",
        "search_order", "SearchPlan", "SearchGrid", "export", "Exported",
        # the stages and their protocol, for a loop of your own
        "Stage", "Phase", "Prepared", "StageResult", "StageSession", "SessionPhase", "Context",
        "Distill", "Prune", "Quantize", "EarlyExit", "register_stage", "run_stage", "run_order",
        "choose_threshold", "prune_channels", "seed_everything",
        # training, losses, data, costs
        "TrainConfig", "Trainer", "TaskObjective", "DistillObjective", "CRDLoss", "distillation_loss", "kd_loss",
        "IndexedDataset", "profile", "Profile", "compression_ratios", "expected_bitops", "exit_costs",
        # the subpackages (internal helpers such as checks and the ops' reference twins are not listed)
        "bitops", "data", "deploy", "losses", "models", "nn", "ops", "pipeline", "results", "search", "stages",
        "stats", "train", "backend_info",
    ]
