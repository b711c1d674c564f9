"""compress(): runs an order of stages with fine-tuning, evaluation, checkpoints and a report.

Data flows one way: data + model -> stage -> fine-tune -> evaluate -> report. With a run
directory every finished stage is saved atomically (model, config, report so far), so an
interrupted run loses at most the stage in progress and ``resume=True`` continues from the
last finished stage with the same result as an uninterrupted run (see :mod:`.rundir`). With
``target_loss`` the stages' strengths are chosen by the accuracy budget (see :mod:`.budget`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import bitops, data, distributed, results
from ..errors import ArgumentTypeError, ConfigError
from ..nn import ExitNet
from ..report import format_table, write_report
from ..stages import AUTO, Context, Distill, EarlyExit, Stage, plan_order, seed_everything
from ..stages.distill import student_spec
from ..train import OptimizerFactory
from .auto import check_auto, find_order
from .config import CompressConfig, resolve_device
from .budget import Controller, ProbeStore
from .probes import SharedProbes
from .costs import latency_meter
from .preflight import check_inputs, check_loaders, check_probe_cache
from .records import Metric, carved_sizes, metric_name, record, report_of
from .runner import Lineage, StageRunner, exit_correct, run_plan, run_stage, zoo_spec_of
from .rundir import RunDir, claim, data_record, fingerprint, load_result, save_result

__all__ = ["CompressResult", "Run", "compress", "evaluate_model", "fingerprint", "save_result", "load_result"]

@dataclass
class CompressResult:
    """The compressed model, the report (a JSON-able dict), the run directory if any, and what a
    result file needs (:meth:`save`)."""

    model: nn.Module
    report: Dict[str, Any]
    run_dir: Optional[Path] = None
    lineage: Optional[Lineage] = None
    input_shape: Optional[Sequence[int]] = None

    def save(self, path) -> Path:
        """Writes the compressed model as a result file (``.pt`` or ``.safetensors``); read it back
        with :func:`ordercomp.load`."""
        return save_result(path, self.model, self.input_shape, self.lineage, {"order": self.report.get("order")})

    def __str__(self) -> str:
        return format_table(self.report)


def evaluate_model(model: nn.Module, context: Context, metric: Optional[Metric] = None) -> Dict[str, float]:
    """Quality and costs of ``model``: accuracy on the validation data (dynamic early exit at its
    threshold for an ExitNet) and on the calibration data when the context has some, optional
    user metric, MACs, params, BitOps (static, and expected for an ExitNet)."""
    return _evaluate(model, context, metric)[0]


def _correct(model: nn.Module, context: Context, loader) -> Tuple[torch.Tensor, Optional[Any]]:
    """Per input of ``loader``: right or not (at its threshold for an ExitNet, with the sweep point)."""
    if isinstance(model, ExitNet) and model.threshold is not None:
        point = exit_correct(model, context, loader)
        return point.correct, point
    return context.trainer.correct(model, loader, desc="eval")[-1], None


def _evaluate(model: nn.Module, context: Context,
             metric: Optional[Metric] = None) -> Tuple[Dict[str, float], torch.Tensor, torch.Tensor]:
    """:func:`evaluate_model`'s measurements and the per-input correctness on the validation data and
    on the calibration data (the validation data's again when there is no calibration split)."""
    prof = bitops.profile(model, context.example_input)
    out = {"macs": prof.macs, "params": prof.params, "bitops": prof.bitops, "bitops_static": prof.bitops,
           "storage_bits": prof.storage_bits}
    correct, point = _correct(model, context, context.val_loader)
    out["accuracy"] = 100.0 * float(correct.double().mean())
    if point is not None:
        out.update(bitops=point.expected_bitops, threshold=model.threshold)
    calibration = correct
    if context.calibration_loader is not None:
        calibration = _correct(model, context, context.calibration)[0]
        out["calibration_accuracy"] = 100.0 * float(calibration.double().mean())
    if metric is not None:
        out[metric_name(metric)] = float(metric(model, context.val_loader))
    return out, correct, calibration


def _as_config(config) -> CompressConfig:
    if isinstance(config, (str, Path)):
        return CompressConfig.load(config)
    if isinstance(config, dict):
        return CompressConfig.from_dict(config)
    if config is None:
        return CompressConfig()
    if not isinstance(config, CompressConfig):
        raise ArgumentTypeError(f"config must be a CompressConfig, a dict or a file path, got {type(config).__name__}")
    return config


def compress(
    model: nn.Module,
    train_loader,
    val_loader,
    config: Union[CompressConfig, Dict, str, Path, None] = None,
    *,
    stages: Optional[Dict[str, Union[Stage, Sequence[Stage]]]] = None,
    calibration_loader=None,
    out: Union[str, Path, None] = None,
    resume: bool = False,
    overwrite: bool = False,
    reference: Optional[nn.Module] = None,
    metric: Optional[Metric] = None,
    optimizer: Optional[OptimizerFactory] = None,
    **deprecated,
) -> CompressResult:
    """Compresses ``model`` by running the stages of ``config.order`` (default "DPQE").

    Each stage transforms the model, fine-tunes it (at ``train.finetune_lr_scale`` x the
    learning rate) and is evaluated on ``val_loader``; the report holds accuracy, its change
    with a paired 95 % interval, MACs, params, BitOps, BitOpsCR and CR per stage against the
    original model. Every choice (exit thresholds, when training phases stop) is made on
    ``calibration_loader``, else on ``config.calibration_fraction`` (10 %) of ``train_loader``'s
    data held back from training (:func:`ordercomp.data.split_loader`; 0: on ``val_loader``,
    whose accuracies are then optimistic). ``config``: a :class:`CompressConfig`, a dict, or a
    YAML/JSON file. ``stages``: ``{letter: config}`` (or a list per letter for repeats)
    overriding the config's stage settings, also for stages added with :func:`ordercomp.register_stage`.
    ``metric(model, loader) -> float`` adds a user quality metric to the report.
    ``config.target_loss`` (pp): an accuracy budget: the most the result may lose against the original's
    calibration accuracy; every stage's strength is then chosen for the most compression within
    it (see :mod:`ordercomp.pipeline.budget` and ``config.budget``; the report's ``budget``).
    ``reference``: the uncompressed model that accuracy changes and compression ratios are
    measured against, and the teacher of fine-tuning KD (default: ``model`` itself; give it when
    ``model`` is already partly compressed).
    ``out``: a run directory for checkpoints and the report, new or empty unless ``resume``
    continues the run there (the same model, data and settings; display settings may change) or
    ``overwrite`` clears it first (see :func:`ordercomp.pipeline.rundir.claim`). Every stage
    starts from a seed of its own: the global random states and the loaders' shuffling and
    augmentation (:func:`ordercomp.data.reseed`) restart from ``train.seed`` + the stage's index,
    so a resumed run gives the same files as an uninterrupted one.
    ``optimizer(params, train_config)``: each training phase's optimizer (default SGD).
    Every other setting is the config's (e.g. ``config={"order": "PQE", "target_loss": 0.5,
    "train": {"epochs": 2}}``); the keywords that once set a few of them (``order``, ``epochs``,
    ``max_batches``, ``device``, ``target_loss``, ``progress``, ``output``) still do, with a
    :class:`DeprecationWarning`, as do ``ddp`` and ``lineage``, which are :meth:`Run.open`'s.
    The input model is not modified. Everything that can be checked is checked before any
    training or writing (:func:`ordercomp.pipeline.preflight.check_run`): the settings; the
    weights are finite; every loader yields ``(input, label)`` batches (or a dict form, see
    :func:`ordercomp.data.unpack`) of finite inputs the model runs on, with labels in
    ``[0, classes)`` (a dataset's labels are all checked when they can be read without loading
    images, else each batch is as it comes, before it is used); ``out`` can be written; each
    stage against the model, and the exit points E will use (given, the model's defaults, or
    found; the report's ``exit_points`` says which). A failure raises one
    :class:`~ordercomp.errors.OrdercompError` that names the argument and leaves ``out`` as it was.
    """
    config, run_settings = _deprecated_keywords(config, deprecated)
    with Run.open(model, train_loader, val_loader, config, stages=stages, calibration_loader=calibration_loader,
                  out=out, resume=resume, overwrite=overwrite, reference=reference, metric=metric,
                  optimizer=optimizer, **run_settings) as run:
        return run.compress(model)


# The keywords compress() took before its settings moved to the config (and to Run.open); kept
# one release with a DeprecationWarning. Each with how to set it now.
_SHORTCUTS = {"order": "config={'order': ...}", "target_loss": "config={'target_loss': ...}",
              "epochs": "config={'train': {'epochs': ...}}", "max_batches": "config={'train': {'max_batches': ...}}",
              "progress": "config={'train': {'progress': ...}}", "device": "config={'device': ...}",
              "output": "config={'output': ...}"}
_RUN_SETTINGS = {"ddp": "Run.open(..., ddp=True)", "lineage": "Run.open(..., lineage=...)"}


def _deprecated_keywords(config, keywords: Dict[str, Any]) -> Tuple[CompressConfig, Dict[str, Any]]:
    """``(config with the old shortcut keywords applied, Run.open's keywords)``, warning once per
    keyword; an order given where the config now goes (``compress(model, train, val, "PQE")``) too."""
    if isinstance(config, str) and config.isalpha() and not Path(config).exists():
        keywords = {"order": config, **keywords}
        config = None
    unknown = sorted(set(keywords) - set(_SHORTCUTS) - set(_RUN_SETTINGS))
    if unknown:
        raise ArgumentTypeError(f"compress() got an unexpected keyword argument {unknown[0]!r}; its settings are "
                                "the config's (config={'section': {'field': value}}, see CompressConfig)")
    for key in keywords:
        warnings.warn(f"compress({key}=...) is deprecated and goes in the next release: use "
                      f"{_SHORTCUTS.get(key) or _RUN_SETTINGS[key]}", DeprecationWarning, stacklevel=3)
    shortcuts = {k: v for k, v in keywords.items() if k in _SHORTCUTS}
    if shortcuts.get("device") is not None:
        shortcuts["device"] = str(shortcuts["device"])
    return _as_config(config).with_shortcuts(**shortcuts), {k: v for k, v in keywords.items() if k in _RUN_SETTINGS}


class Run:
    """One compression run: its config and stage plan, its data and its run directory.

    :meth:`open` makes one: it checks everything that can be checked before any training, once
    (the settings, the models, every loader against the model, the directory: see
    :func:`~.preflight.check_run`), and holds the run directory for the block, once (see
    :func:`~.rundir.claim`; ``resume`` continues the run in it, ``overwrite`` clears it when the
    run writes its first file). :meth:`compress` then runs the stages on a model: the one
    checked, or one of the same architecture made in the meantime (the command line trains its
    teacher inside the run, after checking the untrained one). ``compress()`` is
    ``Run.open(...)`` and ``run.compress(model)``."""

    def __init__(self, config: CompressConfig, plan: Optional[List[Stage]], exit_points: Optional[Dict], train_loader,
                 val_loader, calibration_loader, out: Optional[Path], resume: bool, held, reference, metric, optimizer,
                 dist, lineage, runner: StageRunner, stages=None, probe_cache=None):
        self.config, self.plan, self.exit_points, self.stages = config, plan, exit_points, stages
        self.order_search: Optional[Dict[str, Any]] = None  # what the order search found (order "auto")
        self.train_loader, self.val_loader, self.calibration_loader = train_loader, val_loader, calibration_loader
        self.out, self.resume, self.held = out, resume, held
        self.reference, self.metric, self.optimizer, self.dist, self.lineage = reference, metric, optimizer, dist, lineage
        self.runner, self.probe_cache = runner, probe_cache

    @classmethod
    @contextlib.contextmanager
    def open(cls, model: nn.Module, train_loader, val_loader,
             config: Union[CompressConfig, Dict, str, Path, None] = None, *,
             stages: Optional[Dict[str, Union[Stage, Sequence[Stage]]]] = None, calibration_loader=None,
             out: Union[str, Path, None] = None, resume: bool = False, overwrite: bool = False,
             reference: Optional[nn.Module] = None, metric: Optional[Metric] = None,
             optimizer: Optional[OptimizerFactory] = None, ddp: bool = False, lineage: Optional[Lineage] = None,
             classes: Optional[int] = None, data_label: Optional[str] = None, runner: StageRunner = run_stage,
             probe_cache: Union[str, Path, None] = None):
        """The run (a context manager holding its directory; see the class text). The arguments are
        :func:`compress`'s, and: ``ddp``: DistributedDataParallel in the process group torchrun sets
        up (rank 0 writes); ``lineage``: the architectures behind a partly compressed ``model`` (read
        from its result file; by default the reference's, and the model's own unless it has exits);
        ``classes``: the data's class count when known (a model with another count is refused);
        ``data_label``: names the data in the errors of its checks (the command line's ``--data``);
        ``runner``: what runs each stage, probes included (:func:`~.runner.run_stage`, or a wrapper of it);
        ``probe_cache``: with ``target_loss``, a directory shared by runs of the same model, data and
        settings under other budgets: a probe or full run one of them made is read back, not
        repeated (:class:`~.probes.SharedProbes`)."""
        config = _as_config(config)
        if (resume or overwrite) and out is None:
            raise ConfigError(f"{'resume' if resume else 'overwrite'}=True needs out= (the run directory)")
        check_probe_cache(probe_cache, config)
        # Cheap checks first; the training data last, so nothing it costs to read is read before
        # the model, its evaluation data and every stage are known to fit.
        check_inputs(model, {"val_loader": val_loader, "calibration_loader": calibration_loader}, config,
                     reference=reference, metric=metric, out=out, classes=classes, data_label=data_label)
        if config.order == AUTO:  # the plan waits for the order the search finds (see _searched)
            check_auto(config, calibration_loader, ddp)
            _plan(dataclasses.replace(config, order=config.search.methods), stages)  # the stages given, checked
            plan, exit_points = None, None
        else:
            plan, exit_points = _checked_plan(_plan(config, stages), model, reference, lineage, train_loader,
                                              val_loader, config)
        check_loaders(model, {"train_loader": train_loader}, config, classes=classes, data_label=data_label)
        dist = distributed.setup() if ddp else distributed.Dist()
        out = Path(out) if out is not None else None
        with claim(out, resume, overwrite) if out is not None and dist.is_main else contextlib.nullcontext() as held:
            yield cls(config, plan, exit_points, train_loader, val_loader, calibration_loader, out, resume, held,
                      reference, metric, optimizer, dist, lineage, runner, stages, probe_cache)

    def compress(self, model: nn.Module) -> CompressResult:
        """Runs the stages on ``model`` (see :func:`compress`)."""
        return _compress(model, self)


def _compress(model: nn.Module, run: Run) -> CompressResult:
    """:meth:`Run.compress`: the inputs passed the pre-flight check and the run directory is held."""
    config, dist = run.config, run.dist
    device = dist.device if dist.active else resolve_device(config.device)
    original_model = copy.deepcopy(model)
    reference_model = copy.deepcopy(run.reference) if run.reference is not None else original_model
    context = Context.create(reference_model, run.train_loader, run.val_loader, config.train, device,
                             optimizer=run.optimizer, ddp=dist.active, output=config.output)
    original_model.to(device)
    lineage = _lineage(run.lineage, model, original_model, reference_model, run.reference is not None)
    train_loader, calibration_loader = _calibration_split(run.train_loader, run.calibration_loader, config)
    context = dataclasses.replace(context, zoo_spec=zoo_spec_of(lineage.base), train_loader=train_loader,
                                  calibration_loader=calibration_loader)
    files = (RunDir(run.out, config, model, list(context.example_input.shape[1:]),
                    data_record(context, run.val_loader), run.held) if run.out is not None else None)
    start = _starting_point(run, files, original_model, reference_model, context, lineage)
    if run.config.order == AUTO:
        run = _searched(run, model, context, files)
    # Every bound against the original pairs with its answers on the calibration data, measured once.
    context = dataclasses.replace(context, zoo_spec=zoo_spec_of(start.lineage.base),
                                  reference_correct=start.calibration_correct)
    meter = latency_meter(config, copy.deepcopy(original_model), context) if config.target_loss else None
    if meter is not None:  # the budget's exits chosen by measured latency too
        context = dataclasses.replace(context, exit_speedups=meter.speedups)
    controller = None
    if config.target_loss:
        controller = _controller(run, files, start, original_model, context, meter)
        controller.check_resolution(run.plan, len(start.calibration_correct),
                                    carved_sizes(context.train_loader, context.calibration_loader,
                                                 run.calibration_loader, config.calibration_fraction),
                                    warn=dist.is_main)
    return _run_stages(run, files, start, context, controller)


@dataclass
class _Start:
    """Where a run's stages start: the original's measurements and its per-input correctness on
    the validation and on the calibration data, the records and the model of the stages done."""

    original: Dict[str, Any]
    original_correct: torch.Tensor
    calibration_correct: torch.Tensor
    records: List[Dict]
    done: int
    model: nn.Module
    lineage: Lineage

    @property
    def measured(self) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
        return self.original, self.original_correct, self.calibration_correct


def _searched(run: Run, model: nn.Module, context: Context, files: Optional[RunDir]) -> Run:
    """The run with the order an order search found (see :func:`.auto.find_order`), its plan
    checked as :meth:`Run.open` checks one, and what the search found in ``order_search``."""
    if files is not None:
        files.begin_files()  # the directory is a run directory from the search's first file on
    found = find_order(model, run.config, run.stages, context, files.path / "search" if files is not None else None,
                       verbose=run.config.train.progress and run.dist.is_main)
    searched = copy.copy(run)
    config = dataclasses.replace(run.config, order=found["order"])
    searched.plan, searched.exit_points = _checked_plan(_plan(config, run.stages), model, run.reference,
                                                        run.lineage, run.train_loader, run.val_loader, config)
    searched.order_search = found
    return searched


def _calibration_split(train_loader, calibration_loader, config: CompressConfig):
    """``(train_loader, calibration_loader)``: as given, or ``config.calibration_fraction`` of the
    training data carved out (None when the fraction is 0: choices are made on the validation data)."""
    if calibration_loader is not None or not config.calibration_fraction:
        return train_loader, calibration_loader
    return data.split_loader(train_loader, config.calibration_fraction, config.train.seed)


def _checked_plan(plan: List[Stage], model: nn.Module, reference: Optional[nn.Module], lineage: Optional[Lineage],
                  train_loader, val_loader, config: CompressConfig) -> Tuple[List[Stage], Optional[Dict]]:
    """The plan with its exit points decided (:func:`_resolve_exit_points`), every stage checked
    against (a copy of) ``model``; ``(plan, the exit points decided)``."""
    original = copy.deepcopy(model)
    reference_model = copy.deepcopy(reference) if reference is not None else original
    context = Context.create(reference_model, train_loader, val_loader, config.train, output=config.output)
    original.to(context.device)
    context.zoo_spec = zoo_spec_of(_lineage(lineage, model, original, reference_model, reference is not None).base)
    plan, exit_points = _resolve_exit_points(plan, original, context)
    for stage in plan:
        stage.check_model(original, context)
    return plan, exit_points


def _resolve_exit_points(plan: List[Stage], model: nn.Module, context: Context) -> Tuple[List[Stage], Optional[Dict]]:
    """The plan with the exit points of every E that has none fixed, and what was decided.

    Points are decided once, before the stages are validated (which checks that they cut
    ``model``) and before any training: what was checked is what E uses. They carry over to the
    models E will see when those keep ``model``'s module names
    (P and Q change channels and layers in place, D's default student is a thinner copy); after
    a D whose student is another network (given, or a zoo model's student), E decides on it.
    """
    if isinstance(model, ExitNet):
        return plan, None
    decided, out = None, []
    for stage in plan:
        if isinstance(stage, Distill) and (stage.student is not None or student_spec(context.zoo_spec) is not None):
            break
        if isinstance(stage, EarlyExit):
            points, source = stage.exit_points(model, context)
            decided = decided or {"points": points, "source": source}
            if stage.points is None and source == "found":
                stage = dataclasses.replace(stage, points=points)
        out.append(stage)
    return out + plan[len(out):], decided


def _lineage(lineage: Optional[Lineage], model: nn.Module, original_model: nn.Module, reference_model: nn.Module,
             has_reference: bool) -> Lineage:
    """A copy of the given lineage (the run updates it), or the one of the reference (and of the
    partly compressed model, unless it has exits)."""
    if lineage is None:
        lineage = Lineage.of(reference_model)
        if has_reference and not isinstance(model, ExitNet):
            lineage.base = results.architecture(original_model)
    return copy.deepcopy(lineage)


def _starting_point(run: Run, files: Optional[RunDir], original_model: nn.Module, reference_model: nn.Module,
                    context: Context, lineage: Lineage) -> _Start:
    """From the run directory when resuming, else the original model measured afresh (and the
    run directory started)."""
    student = run.config.distill.student if isinstance(run.config.distill.student, nn.Module) else None
    state = files.load(original_model, student) if (files is not None and run.resume) else None
    if state is None:
        measured = _evaluate(reference_model, context, run.metric)
        if files is not None and run.dist.is_main:
            files.start(*measured)
        return _Start(*measured, [], 0, copy.deepcopy(original_model), lineage)
    calibration = state["calibration_correct"]
    if calibration is None:  # a run started before the state kept it: measured again, as it was then
        calibration = _correct(reference_model, context, context.calibration)[0]
    if state["model"] is None:
        return _Start(state["original"], state["original_correct"], calibration, [], 0,
                      copy.deepcopy(original_model), lineage)
    return _Start(state["original"], state["original_correct"], calibration, state["records"], state["completed"],
                  state["model"].to(context.device), state["lineage"])


def _plan(config: CompressConfig, stages) -> List[Stage]:
    """The stage configs of the order: the config's, overridden by ``stages``."""
    return plan_order(config.order, {**config.stage_configs(), **dict(stages or {})})


def _controller(run: Run, files: Optional[RunDir], start: _Start, original_model: nn.Module,
                context: Context, meter=None) -> Controller:
    """The budget controller of ``target_loss``, against the original's calibration accuracy and
    per-input results; its probes are kept in the run directory's ``probes/``."""
    config, dist = run.config, run.dist

    def seed(step: int, salt: str) -> None:
        seed_everything(config.train.seed + step + (zlib.crc32(salt.encode()) if salt else 0), context)

    student = config.distill.student if isinstance(config.distill.student, nn.Module) else None
    store = (ProbeStore(files.path / "probes", files.input_shape, dist.is_main, files.begin_files, run.resume)
             if files is not None else None)
    if not dist.is_main:
        log = None
    elif config.train.progress:
        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    else:
        log = logging.getLogger("ordercomp.budget").info
    original = start.original
    shared = SharedProbes.of_run(run.probe_cache, config, context, original_model, student, run.runner,
                                 run.optimizer, dist.is_main)
    return Controller(config.budget, config.target_loss, original.get("calibration_accuracy", original["accuracy"]),
                      start.calibration_correct, seed, store, student=student, original=original_model, log=log,
                      runner=run.runner, meter=meter, shared=shared)


def _steps(run: Run, controller: Optional[Controller], start: _Start, context: Context):
    """``(step, result, model, budget decision or None)`` per stage from ``start.done`` on; each
    stage starts from a seed of its own, so a resumed run repeats an uninterrupted one."""
    if controller is None:
        for step, result, model in run_plan(start.model, run.plan, context, start=start.done, lineage=start.lineage,
                                            before=lambda i: seed_everything(run.config.train.seed + i, context),
                                            runner=run.runner):
            yield step, result, model, None
        return
    yield from controller.run(start.model, run.plan, context, start.lineage,
                              done=[r["budget"] for r in start.records[:start.done]])


def _report(run: Run, start: _Start, records: List[Dict], context: Context,
            controller: Optional[Controller]) -> Dict[str, Any]:
    report = report_of(run.config, start.original, records, run.metric, run.exit_points, context, controller,
                       order="".join(stage.letter for stage in run.plan))
    if run.order_search is not None:
        report["order_search"] = run.order_search
    return report


def _run_stages(run: Run, files: Optional[RunDir], start: _Start, context: Context,
                controller: Optional[Controller]) -> CompressResult:
    """Runs the stages from ``start`` on, saving each finished one; the result and its report."""
    started = time.perf_counter()
    dist, metric, original = run.dist, run.metric, start.original
    records, current, lineage = start.records, start.model, start.lineage
    for step, result, current, decision in _steps(run, controller, start, context):
        records.append(record(step, result, current, original, start.original_correct, context, metric))
        if decision is not None:
            records[-1]["budget"] = decision
        report = _report(run, start, records, context, controller)
        if files is not None and dist.is_main:
            files.save_stage(step + 1, current, lineage, *start.measured, records, report)
        dist.barrier()
    report = _report(run, start, records, context, controller)
    report["seconds"] = time.perf_counter() - started
    report["world_size"] = dist.world_size
    result = CompressResult(current, report, files.path if files is not None else None, lineage,
                            list(context.example_input.shape[1:]))
    if files is not None and dist.is_main:
        result.save(files.path / "model.pt")
        write_report(files.path, report)
    return result
