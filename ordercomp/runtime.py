"""Runs an exported ordercomp model on ONNX Runtime, early exits included.

An export is a folder with ``manifest.json`` and ONNX graphs. Its ``graph`` says how exits are
laid out: ``"single"``, one ``model.onnx`` that decides the exits itself (inputs ``input`` and
``threshold``; outputs ``logits`` and ``exit_index``: any ONNX runtime runs it with one call), or
``"segments"``, K+1 segment graphs and K exit heads (head i reads segment i's output) that
:meth:`Deployed.run` drives. Either way :meth:`Deployed.run` mirrors ``ExitNet.infer``: inputs
leave at the first head confident enough and are dropped from the batch, so later segments really
run on fewer rows. This module needs only numpy and onnxruntime (``pip install
'ordercomp[deploy]'``), not torch, so it runs on a deployment machine.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConfigError, DataError, MissingDependencyError, MissingFileError, ModelError

__all__ = ["load", "session_options", "exit_check", "check_manifest", "Deployed", "RunResult",
           "graph_files", "FORMAT", "VERSION", "CRITERIA", "OPTIMIZATIONS", "PROVIDERS"]

FORMAT, VERSION = "ordercomp-onnx", 2
READS = (1, 2)  # version 1: segments only, without the key "graph"
_SINGLE_KEYS = ("file", "input", "threshold", "logits", "exit_index")
CRITERIA = ("maxprob", "entropy")
OPTIMIZATIONS = ("all", "extended", "basic", "none")
PROVIDERS = ["CPUExecutionProvider"]
_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
           "none": "ORT_DISABLE_ALL"}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"running an exported model needs onnxruntime ({exc}); install it with pip install 'ordercomp[deploy]'"
        ) from None
    return onnxruntime


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_threshold(value, name: str = "threshold", error=ConfigError) -> float:
    if not _is_real(value) or math.isnan(value) or value < 0:
        raise error(f"{name} must be a number >= 0 (in [0, 1] to allow early exits, > 1 for none), got {value!r}")
    return float(value)


def _check_criterion(value, name: str = "criterion", error=ConfigError) -> str:
    if not isinstance(value, str) or value not in CRITERIA:
        raise error(f"{name} must be one of {CRITERIA}, got {value!r}")
    return value


def session_options(threads: int = 2, optimization: str = "all"):
    """ONNX Runtime options of every session :func:`load` opens, for timing other graphs alike.

    ``threads`` intra-op threads, one inter-op thread, sequential execution, and the graph
    optimization level ``optimization`` (one of ``OPTIMIZATIONS``). The threads stop spinning when
    a run ends: an export runs several sessions one after another, and the spinning threads of one
    would take the cores the next needs (measured: an ExitNet at batch 64 ran 5x slower). Open
    a session with ``onnxruntime.InferenceSession(path, session_options(...), providers=PROVIDERS)``.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    if optimization not in OPTIMIZATIONS:
        raise ConfigError(f"optimization must be one of {OPTIMIZATIONS}, got {optimization!r}")
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: the load-time notes (an overridable threshold input) need no action
    return options


def exit_check(logits, threshold: float, criterion: str = "maxprob"):
    """Early-exit decision for logits [B, C]: the numpy twin of ``ordercomp.reference.exit_check``.

    ``maxprob``: confidence = max softmax probability; ``entropy``: 1 - H(p)/log(C) (1 when
    C == 1). Computed in float32 with the reference's log-softmax, and compared with the
    threshold in float32 as the kernels do. A ``-inf`` logit has probability 0 when the row's
    maximum is finite; a row with any NaN, any ``+inf`` or only ``-inf`` has NaN confidence and
    never exits. Returns ``(confidence [B] float32, prediction [B] int64, exit_mask [B] bool)``.
    """
    lf = np.asarray(logits, dtype=np.float32)
    if lf.ndim != 2 or lf.shape[1] < 1:
        raise DataError(f"logits must be 2-D [batch, classes] with at least one class, got shape {lf.shape}")
    threshold = _check_threshold(threshold)
    criterion = _check_criterion(criterion)
    if lf.shape[0] == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    with np.errstate(all="ignore"):  # inf - inf and log(0) are part of the contract
        pred = lf.argmax(axis=1).astype(np.int64)
        shifted = lf - lf.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        if criterion == "maxprob":
            conf = np.exp(logp.max(axis=1))
        elif lf.shape[1] == 1:
            conf = np.float32(1.0) + logp[:, 0]  # log p is 0, or NaN for a non-finite logit
        else:
            plogp = np.where(logp == -np.inf, np.float32(0.0), np.exp(logp) * logp)
            conf = np.float32(1.0) - (-plogp.sum(axis=1)) / np.float32(math.log(lf.shape[1]))
        conf = conf.astype(np.float32)
        return conf, pred, conf >= np.float32(threshold)


@dataclass
class RunResult:
    """Outcome of :meth:`Deployed.run` for B inputs, in the batch's order.

    ``logits`` [B, C] float32 from the exit each input left at; ``exit_index`` [B] int64 (0..K-1
    the heads, K the final classifier); ``bitops`` [B] float64, what each input paid (segments it
    ran and heads it evaluated), or None when the manifest has no costs.
    """

    logits: np.ndarray
    exit_index: np.ndarray
    num_exits: int
    bitops: Optional[np.ndarray] = None

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def exit_counts(self) -> np.ndarray:
        """Number of inputs that left at each of the K+1 exits."""
        return np.bincount(self.exit_index, minlength=self.num_exits)


# --------------------------------------------------------------------------- the manifest


def _require(manifest: dict, key: str, kind, where: str):
    if key not in manifest:
        raise ModelError(f"{where}: key {key!r} is missing")
    value = manifest[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ModelError(f"{where}: {key} must be a {names}, got {value!r}")
    return value


def _check_graphs(manifest: dict, key: str, where: str) -> List[dict]:
    graphs = _require(manifest, key, list, where) if key in manifest or key == "segments" else []
    for i, graph in enumerate(graphs):
        if not isinstance(graph, dict) or not all(isinstance(graph.get(k), str) for k in ("file", "input", "output")):
            raise ModelError(f"{where}: {key}[{i}] must be an object with strings 'file', 'input', 'output', "
                             f"got {graph!r}")
    return graphs


def _check_costs(costs, key: str, count: int, where: str) -> List[float]:
    ok = isinstance(costs, list) and len(costs) == count and all(
        _is_real(c) and math.isfinite(c) and c >= 0 for c in costs)
    if not ok:
        raise ModelError(f"{where}: bitops.{key} must be a list of {count} finite numbers >= 0, got {costs!r}")
    return [float(c) for c in costs]


def _check_preprocessing(pre, channels: int, where: str) -> Optional[dict]:
    if pre is None:
        return None
    scale = pre.get("scale") if isinstance(pre, dict) else None
    if not _is_real(scale) or not math.isfinite(scale) or scale <= 0:
        raise ModelError(f"{where}: preprocessing must be null or hold a number 'scale' > 0, got {pre!r}")
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        value = pre.get(key)
        if not (isinstance(value, list) and len(value) in (1, channels)
                and all(_is_real(v) and math.isfinite(v) and v > low for v in value)):
            bound = " > 0" if low == 0.0 else ""
            raise ModelError(f"{where}: preprocessing.{key} must be a list of 1 or {channels} finite numbers{bound}, "
                             f"got {value!r}")
    return pre


def check_manifest(manifest, where: str = "manifest") -> dict:
    """``manifest`` if it is a valid export manifest (format, version, input, graphs, exits, costs).

    Unknown keys are ignored: the exporter records extra information (sizes, accuracy).
    """
    if not isinstance(manifest, dict):
        raise ModelError(f"{where} must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{where}: format must be {FORMAT!r}, got {manifest.get('format')!r}")
    version = manifest.get("version")
    if version not in READS or isinstance(version, bool):
        raise ModelError(f"{where}: version must be one of {READS} (the versions this ordercomp reads), "
                         f"got {version!r}")
    declared = _require(manifest, "input", dict, where)
    shape = declared.get("shape")
    if not isinstance(declared.get("name"), str) or not (
            isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ModelError(f"{where}: input must hold a string 'name' and a 'shape' [C, H, W] of positive integers, "
                         f"got {declared!r}")
    if declared.get("dtype", "float32") != "float32":
        raise ModelError(f"{where}: input.dtype must be 'float32', got {declared.get('dtype')!r}")
    if _require(manifest, "num_classes", int, where) < 1:
        raise ModelError(f"{where}: num_classes must be >= 1, got {manifest['num_classes']!r}")
    layout = manifest.get("graph", "segments") if version == 1 else manifest.get("graph")
    if layout not in ("single", "segments") or (version == 1 and layout != "segments"):
        allowed = "'segments' (version 1)" if version == 1 else "'single' or 'segments'"
        raise ModelError(f"{where}: graph must be {allowed}, got {layout!r}")
    if layout == "single":
        model = _require(manifest, "model", dict, where)
        if not all(isinstance(model.get(k), str) for k in _SINGLE_KEYS):
            raise ModelError(f"{where}: model must be an object with strings {', '.join(map(repr, _SINGLE_KEYS))}, "
                             f"got {model!r}")
        if _require(manifest, "num_exits", int, where) < 1:
            raise ModelError(f"{where}: num_exits must be >= 1, got {manifest['num_exits']!r}")
        if not isinstance(manifest.get("exits"), dict) or manifest["exits"].get("threshold") is None:
            raise ModelError(f"{where}: exits must hold the threshold and criterion the single graph was made with, "
                             f"got {manifest.get('exits')!r}")
        segments, heads = [None] * manifest["num_exits"], [None] * (manifest["num_exits"] - 1)
    else:
        segments, heads = _check_graphs(manifest, "segments", where), _check_graphs(manifest, "heads", where)
        if len(segments) != len(heads) + 1:
            raise ModelError(f"{where}: segments must number one more than heads, got {len(segments)} segments "
                             f"and {len(heads)} heads")
    exits = manifest.get("exits")
    if exits is None and heads:
        raise ModelError(f"{where}: exits must be an object with 'threshold' and 'criterion' when there are heads, "
                         "got null")
    if exits is not None:
        if not isinstance(exits, dict):
            raise ModelError(f"{where}: exits must be null or an object, got {exits!r}")
        if exits.get("threshold") is not None:  # null: no threshold chosen yet, run() must be given one
            _check_threshold(exits["threshold"], f"{where}: exits.threshold", ModelError)
        _check_criterion(exits.get("criterion"), f"{where}: exits.criterion", ModelError)
    if manifest.get("bitops") is not None:
        costs = _require(manifest, "bitops", dict, where)
        _check_costs(costs.get("segments"), "segments", len(segments), where)
        _check_costs(costs.get("heads"), "heads", len(heads), where)
    _check_preprocessing(manifest.get("preprocessing"), shape[0], where)
    config = manifest.get("session_config")
    if "session_config" in manifest and not (
            isinstance(config, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in config.items())):
        raise ModelError(f"{where}: session_config must be an object of string keys to string values "
                         f"(ONNX Runtime session config entries), got {config!r}")
    return manifest


def graph_files(manifest: dict) -> List[str]:
    """The graph files a (checked) manifest names, in the order they run."""
    if manifest.get("graph") == "single":
        return [manifest["model"]["file"]]
    return [g["file"] for g in manifest.get("segments", []) + manifest.get("heads", [])]


def _read_manifest(path: Union[str, Path]) -> Tuple[Path, dict]:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"path {str(path)!r} does not exist (give an export folder or its manifest.json)")
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise MissingFileError(f"path {str(path)!r} holds no manifest.json: not an ordercomp export folder")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file} is not valid JSON: {exc}") from None
    return file.parent, check_manifest(manifest, str(file))


# --------------------------------------------------------------------------- the driver


class Deployed:
    """An export opened on ONNX Runtime.

    ``segments`` (K+1) and ``heads`` (K) sessions of a ``"segments"`` export, or the one session of
    a ``"single"`` export as ``segments`` with no heads. ``threshold`` / ``criterion`` are the
    manifest's exit settings (None for a plain model); ``num_exits`` = K+1; ``input_shape`` =
    (C, H, W); ``bitops`` = (segment costs, head costs) per input, or None when the manifest has
    none. A session only needs ``run(names, feeds)``.
    """

    def __init__(self, manifest: dict, segments: Sequence, heads: Sequence = ()):
        self.manifest = check_manifest(manifest)
        self.single = manifest.get("graph") == "single"
        want = (1, 0) if self.single else (len(manifest["segments"]), len(manifest.get("heads", [])))
        if (len(segments), len(heads)) != want:
            raise ModelError(f"need {want[0]} segment and {want[1]} head sessions as the manifest lists, "
                             f"got {len(segments)} and {len(heads)}")
        self.segments, self.heads = list(segments), list(heads)
        self._segment_io = [(g["input"], g["output"]) for g in manifest.get("segments", [])]
        self._head_io = [(g["input"], g["output"]) for g in manifest.get("heads", [])]
        exits = manifest.get("exits") or {}
        self.threshold: Optional[float] = None if exits.get("threshold") is None else float(exits["threshold"])
        self.criterion: Optional[str] = exits.get("criterion")
        self.num_exits = int(manifest["num_exits"]) if self.single else len(self.segments)
        self.num_classes = int(manifest["num_classes"])
        self.input_shape: Tuple[int, int, int] = tuple(manifest["input"]["shape"])
        costs = manifest.get("bitops")
        self.bitops = None if costs is None else ([float(c) for c in costs["segments"]],
                                                  [float(c) for c in costs["heads"]])

    def _check_input(self, x) -> np.ndarray:
        want = f"[B, {', '.join(map(str, self.input_shape))}]"
        if not isinstance(x, np.ndarray):
            raise DataError(f"x must be a numpy array of floats {want}, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"x must have shape {want} (batch, channels, height, width), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"x must hold floats (float32; float64 is converted), got dtype {x.dtype}")
        _check_finite(x, "x")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _settings(self, threshold, criterion) -> Tuple[float, str]:
        if threshold is None:
            if self.threshold is None and self.num_exits > 1:
                raise ConfigError("threshold must be given: this export has no threshold chosen "
                                  "(exits.threshold is null)")
            threshold = 2.0 if self.threshold is None else self.threshold  # a plain model has no exits
        criterion = criterion if criterion is not None else self.criterion or "maxprob"
        threshold, criterion = _check_threshold(threshold), _check_criterion(criterion)
        if self.single and criterion != self.criterion:
            raise ConfigError(f"criterion must be {self.criterion!r} for this export: its single graph decides exits "
                              f"by {self.criterion!r}; export with graph='segments' to choose it when running")
        return threshold, criterion

    def _graph(self, session, io: Tuple[str, str], h: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([io[1]], {io[0]: h})[0])

    def _logits(self, logits: np.ndarray, rows: int, what: str) -> np.ndarray:
        if logits.shape != (rows, self.num_classes):
            raise ModelError(f"{what} returned logits of shape {logits.shape}, the manifest says "
                             f"[{rows}, {self.num_classes}] (num_classes)")
        return logits.astype(np.float32, copy=False)

    def run(self, x, threshold: Optional[float] = None, criterion: Optional[str] = None) -> RunResult:
        """Dynamic inference on x [B, C, H, W] float32: each input leaves at the first head whose
        confidence (``criterion``) is >= ``threshold``, and later segments run without it.

        A threshold above 1 runs the plain backbone: the heads are not evaluated and cost nothing.
        ``None`` uses the manifest's settings. Mirrors ``ExitNet.infer`` decision for decision.
        """
        x = self._check_input(x)
        threshold, criterion = self._settings(threshold, criterion)
        if self.single:
            return self._run_single(x, threshold)
        batch, k = x.shape[0], len(self.heads)
        rows = np.arange(batch)
        exit_index = np.full(batch, k, dtype=np.int64)
        counter = None if self.bitops is None else np.zeros(batch, dtype=np.float64)
        out = np.zeros((batch, self.num_classes), dtype=np.float32)
        h = x
        for i in range(k + 1 if batch else 0):
            h = self._graph(self.segments[i], self._segment_io[i], h)
            if counter is not None:
                counter[rows] += self.bitops[0][i]
            if i == k:
                out[rows] = self._logits(h, len(rows), f"segment {i}")
                break
            if threshold > 1:
                continue
            logits = self._logits(self._graph(self.heads[i], self._head_io[i], h), len(rows), f"head {i}")
            if counter is not None:
                counter[rows] += self.bitops[1][i]
            _, _, leave = exit_check(logits, threshold, criterion)
            if leave.any():
                gone = rows[leave]
                out[gone] = logits[leave]
                exit_index[gone] = i
                stay = ~leave
                rows, h = rows[stay], h[stay]
                if rows.size == 0:
                    break
        return RunResult(logits=out, exit_index=exit_index, num_exits=k + 1, bitops=counter)

    def _run_single(self, x: np.ndarray, threshold: float) -> RunResult:
        io = self.manifest["model"]
        logits, exit_index = self.segments[0].run([io["logits"], io["exit_index"]],
                                                  {io["input"]: x, io["threshold"]: np.array(threshold, np.float32)})
        logits = self._logits(np.asarray(logits), x.shape[0], "the graph")
        exit_index = np.asarray(exit_index)
        k = self.num_exits - 1
        if exit_index.shape != (x.shape[0],) or exit_index.size and not (0 <= exit_index.min() <= exit_index.max() <= k):
            raise ModelError(f"the graph returned exit indices {exit_index[:8]} of shape {exit_index.shape}, "
                             f"the manifest says [{x.shape[0]}] in 0..{k}")
        counter = None
        if self.bitops is not None:  # a row leaving at exit i ran segments 0..i and evaluated heads 0..min(i, K-1)
            segments, heads = self.bitops
            paid = np.cumsum(segments) + (np.cumsum(heads + [0.0]) if threshold <= 1 else 0.0)
            counter = paid[exit_index].astype(np.float64)
        return RunResult(logits=logits, exit_index=exit_index.astype(np.int64), num_exits=k + 1, bitops=counter)

    def predict(self, x, threshold: Optional[float] = None, criterion: Optional[str] = None) -> np.ndarray:
        """Predicted classes [B] int64 of :meth:`run`."""
        return self.run(x, threshold, criterion).predictions

    def preprocess(self, pixels) -> np.ndarray:
        """Raw pixels ([B, H, W] for one channel, or [B, C, H, W]; integers or floats) to the float32
        input of :meth:`run`: ``(pixels * scale - mean) / std`` per channel, as the manifest says."""
        pre = self.manifest.get("preprocessing")
        if pre is None:
            raise ConfigError("preprocess needs the manifest's preprocessing, and this export has none "
                              "(preprocessing: null): pass normalised inputs to run()")
        channels, height, width = self.input_shape
        if not isinstance(pixels, np.ndarray) or pixels.dtype == bool or not (
                np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
            found = pixels.dtype if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise DataError(f"pixels must be a numpy array of integers or floats, got {found}")
        if pixels.ndim == 3 and channels == 1:
            pixels = pixels[:, None]
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.input_shape:
            allowed = f"[B, {channels}, {height}, {width}]" + (f" or [B, {height}, {width}]" if channels == 1 else "")
            raise DataError(f"pixels must have shape {allowed}, got {pixels.shape}")
        scale = float(pre["scale"])
        if np.issubdtype(pixels.dtype, np.floating):
            _check_finite(pixels, "pixels")
            if scale < 0.5 and pixels.size and float(pixels.max()) <= 1.0:
                warnings.warn(f"pixels are all within [0, 1] but the manifest scales them by {scale:g}: are they "
                              "already scaled? preprocess() takes raw pixels (e.g. 0..255)", stacklevel=2)
        mean = np.asarray(pre["mean"], dtype=np.float64).reshape(1, -1, 1, 1)
        std = np.asarray(pre["std"], dtype=np.float64).reshape(1, -1, 1, 1)
        return ((pixels.astype(np.float64) * float(pre["scale"]) - mean) / std).astype(np.float32)


def _check_finite(x: np.ndarray, name: str) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        rows = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        nan = int(np.isnan(x).sum())
        raise DataError(f"{name} must be finite: found {nan} NaN and {int((~finite).sum()) - nan} infinite values, "
                        f"in rows {rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}")


def _session(ort, folder: Path, graph: dict, options, inputs: List[str], outputs: List[str]):
    """A session on the graph file ``graph["file"]`` whose inputs are ``inputs`` (the first one
    required, the others with defaults) and whose outputs include ``outputs``."""
    file = folder / graph["file"]
    if folder.resolve() not in file.resolve().parents:  # "..", an absolute path or a link out of the folder
        raise ModelError(f"graph file {graph['file']!r} named in the manifest is not inside the export folder "
                         f"{str(folder)!r} (after resolving '..' and links): an export reads only its own "
                         "graphs; export again")
    if not file.is_file():
        raise MissingFileError(f"graph file {str(file)!r} named in the manifest does not exist")
    try:
        session = ort.InferenceSession(str(file), options, providers=PROVIDERS)
    except Exception as exc:  # onnxruntime raises its own types for a corrupt or unsupported graph
        raise ModelError(f"ONNX Runtime cannot open {file}: {str(exc).strip().splitlines()[0]}") from None
    found_in = [i.name for i in session.get_inputs()] + [i.name for i in session.get_overridable_initializers()]
    found_out = [o.name for o in session.get_outputs()]
    if found_in != inputs or not set(outputs) <= set(found_out):
        raise ModelError(f"{file} has inputs {found_in} and outputs {found_out}; the manifest says inputs "
                         f"{inputs} and outputs {outputs}")
    return session


def load(path: Union[str, Path], *, threads: int = 2, optimization: str = "all") -> Deployed:
    """Opens the export at ``path`` (its folder or its manifest.json) on ONNX Runtime's CPU provider,
    every graph with :func:`session_options` ``(threads, optimization)`` plus the manifest's
    ``session_config`` entries (e.g. ``session.disable_quant_qdq`` of an ``exact`` export)."""
    options = session_options(threads, optimization)  # fresh options for this load only
    ort = _onnxruntime()
    folder, manifest = _read_manifest(path)
    for key, value in manifest.get("session_config", {}).items():
        options.add_session_config_entry(key, value)
    if manifest.get("graph") == "single":
        io = manifest["model"]
        segments, heads = [_session(ort, folder, io, options, [io["input"], io["threshold"]],
                                    [io["logits"], io["exit_index"]])], []
    else:
        segments = [_session(ort, folder, g, options, [g["input"]], [g["output"]]) for g in manifest["segments"]]
        heads = [_session(ort, folder, g, options, [g["input"]], [g["output"]]) for g in manifest.get("heads", [])]
    graph_shape = segments[0].get_inputs()[0].shape[1:]  # [C, H, W] after the (dynamic) batch axis
    if all(isinstance(d, int) for d in graph_shape) and list(graph_shape) != manifest["input"]["shape"]:
        raise ModelError(f"{folder / 'manifest.json'}: input.shape {manifest['input']['shape']} is not the shape "
                         f"the first graph takes ({list(graph_shape)}): the manifest was edited; export again")
    return Deployed(manifest, segments, heads)
