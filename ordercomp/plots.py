"""The plots: a run's stages and early-exit sweep, and a search's pairs and order graph (PNG files).

Every plot takes plain data (dicts, lists, strings) and writes its PNG atomically, so this
module sits below the pipeline and the search: it imports nothing of ordercomp but
:mod:`ordercomp.checkpoint`. matplotlib is imported on first use, with the Agg backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Collection, Dict, Sequence, Tuple

from .checkpoint import atomic_write

__all__ = ["plot_stages", "plot_exit_sweep", "plot_budget", "threshold_label", "plot_pair", "plot_graph"]

Point = Dict[str, float]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Writes ``fig`` to ``path`` as PNG (atomically) and closes it, also when writing fails."""
    plt = _pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def plot_stages(report: Dict, path) -> Path:
    """Accuracy and BitOpsCR after each stage of a run report (the paper's Fig. 6)."""
    plt = _pyplot()
    metric = report.get("metric", "accuracy")
    labels = ["original"] + [f"{s['step']}.{s['stage']}" for s in report["stages"]]
    values = [report["original"][metric]] + [s[metric] for s in report["stages"]]
    ratios = [1.0] + [s["bitops_cr"] for s in report["stages"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(labels, values, "o-", color="tab:blue", label=metric)
    ax.set_ylabel(f"{metric} (%)" if metric == "accuracy" else metric, color="tab:blue")
    ax.set_xlabel("after stage")
    ax2 = ax.twinx()
    ax2.plot(labels, ratios, "s--", color="tab:red", label="BitOpsCR")
    ax2.set_yscale("log")
    ax2.set_ylabel("BitOps compression ratio (log)", color="tab:red")
    for x, r in zip(labels, ratios):
        ax2.annotate(f"{r:.0f}x" if r >= 10 else f"{r:.1f}x", (x, r), textcoords="offset points", xytext=(0, 6),
                     ha="center", fontsize=8, color="tab:red")
    ax.set_title(f"order {report['order']}: {metric} and BitOpsCR per stage")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def threshold_label(threshold: float) -> str:
    """An early-exit threshold as text; thresholds above 1 mean that no input leaves early."""
    return "no exit" if threshold > 1 else f"{threshold:.2f}"


def plot_exit_sweep(stage: Dict, path) -> Path:
    """Accuracy against BitOpsCR over the early-exit threshold sweep of one stage of a run report."""
    plt = _pyplot()
    points = sorted(stage["exit_sweep"], key=lambda p: p["threshold"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([p["bitops_cr"] for p in points], [p["accuracy"] for p in points], "o-")
    for p in points[:: max(1, len(points) // 8)]:
        ax.annotate(threshold_label(p["threshold"]), (p["bitops_cr"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if stage.get("threshold") is not None:
        chosen = min(points, key=lambda p: abs(p["threshold"] - stage["threshold"]))
        ax.plot([chosen["bitops_cr"]], [chosen["accuracy"]], "r*", markersize=14,
                label=f"chosen: {threshold_label(stage['threshold'])}")
        ax.legend()
    ax.set_xlabel("BitOps compression ratio")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"early-exit threshold sweep (step {stage['step']}, {stage['stage']})")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_bits(stage: Dict, path) -> Path:
    """Bits per layer of a stage that chose them (``quantize.policy="auto"``): weight and input bits
    as bars, each layer's sensitivity at its bits as a line (log scale)."""
    plt = _pyplot()
    names = list(stage["info"]["bits"])
    bits = [stage["info"]["bits"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(names)), 4.0))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [b[0] for b in bits], width=0.4, label="weight bits")
    ax.bar([x + 0.2 for x in xs], [b[1] for b in bits], width=0.4, label="input bits")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=75, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_yticks([2, 3, 4, 6, 8])
    twin = ax.twinx()
    twin.plot(list(xs), [max(stage["info"]["sensitivity"][n], 1e-12) for n in names], "k.-", label="sensitivity")
    twin.set_yscale("log")
    twin.set_ylabel("sensitivity at its bits (KL)")
    ax.set_title(f"bits per layer (step {stage['step']}, {stage['stage']}): "
                 f"{stage['info']['bits_per_mac']:.1f} bits per MAC", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    return _save(fig, Path(path))


def plot_budget(report: Dict, path) -> Path:
    """Calibration accuracy against BitOpsCR under an accuracy budget: the original, each stage's
    model, every probe (at its estimated accuracy: the original's less its estimated loss) and
    full run of the search, and the budget line."""
    plt = _pyplot()
    budget = report["budget"]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    colors = dict(zip("DPQE", ("tab:purple", "tab:green", "tab:orange", "tab:blue")))
    runs = budget["probes"]
    run_ys = [p["calibration_accuracy"] if p.get("estimated_loss") is None else budget["baseline"] - p["estimated_loss"]
              for p in runs]
    for i, (p, y) in enumerate(zip(runs, run_ys)):
        marker = {"probe": "x", "full": "^", "anchor": "s"}["anchor" if p["anchor"] else p["kind"]]
        first = all(q["stage"] != p["stage"] for q in runs[:i])
        ax.scatter([p["bitops_cr"]], [y], marker=marker, alpha=0.7, color=colors.get(p["stage"], "tab:gray"),
                   label=f"{p['stage']} runs" if first else None)
    for kind, marker in (("probe, at its estimate", "x"), ("anchor (as configured)", "s"), ("full run", "^")):
        ax.scatter([], [], marker=marker, color="gray", label=kind)
    stages = [s for s in report["stages"] if s.get("calibration_accuracy") is not None]
    xs = [1.0] + [s["bitops_cr"] for s in stages]
    ys = [budget["baseline"]] + [s["calibration_accuracy"] for s in stages]
    ax.plot(xs, ys, "o-", color="black", label="original, then each stage kept")
    for i, (x, y, label) in enumerate(zip(xs, ys, ["original"] + [f"{s['step']}.{s['stage']}" for s in stages])):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6 if i % 2 else -12), fontsize=8)
    line = budget["baseline"] - budget["target_loss"]
    ax.axhline(line, color="tab:red", ls="--", lw=1, label=f"budget: {budget['target_loss']:g} pp below the original")
    low, high = min([line] + ys + run_ys), max([line] + ys + run_ys)
    ax.set_ylim(low - 0.05 * (high - low) - 0.1, high + 0.05 * (high - low) + 0.1)
    ax.set_xscale("log")
    ax.set_xlabel("BitOps compression ratio (log)")
    ax.set_ylabel("calibration accuracy (%)")
    ax.set_title(f"order {report['order']} under a {budget['target_loss']:g} pp budget", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, Path(path))


def plot_pair(points_by_order: Dict[str, Sequence[Point]], fronts_by_order: Dict[str, Sequence[Point]],
              original_accuracy: float, title: str, path) -> Path:
    """Two orders' points in the (BitOpsCR, accuracy) plane with their Pareto fronts (the paper's Fig. 2).

    ``points_by_order`` / ``fronts_by_order``: per order (the first two are drawn), its points and
    its front by increasing BitOpsCR; each point a dict with ``accuracy`` (%) and ``bitops_cr``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for (order, pts), color, marker in zip(points_by_order.items(), ("tab:blue", "tab:orange"), ("o", "^")):
        ax.scatter([p["bitops_cr"] for p in pts], [p["accuracy"] for p in pts], c=color, marker=marker, alpha=0.6,
                   label=f"{order} ({len(pts)} point{'s' if len(pts) != 1 else ''})")
        front = fronts_by_order[order]
        ax.step([p["bitops_cr"] for p in front], [p["accuracy"] for p in front], where="pre", color=color, lw=1.5)
    ax.axhline(original_accuracy, color="gray", ls="--", lw=1, label="original")
    ax.set_xscale("log")
    ax.set_xlabel("BitOps compression ratio (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_graph(methods: str, links: Sequence[Tuple[str, str, str, bool]], dropped: Collection[Tuple[str, str]],
               title: str, path) -> Path:
    """The methods on a circle with a link per pair, drawn in the order given.

    ``links``: ``(a, b, label, decisive)``; a decisive link is an arrow a -> b (dashed red when
    ``(a, b)`` is in ``dropped``), any other a dotted grey line. The label sits nearer to a.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    n = len(methods)
    pos = {m: (math.sin(2 * math.pi * i / n), math.cos(2 * math.pi * i / n)) for i, m in enumerate(methods)}
    for a, b, label, decisive in links:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        if decisive:
            style = dict(color="tab:red", ls="--") if (a, b) in dropped else dict(color="black", ls="-")
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="-|>", shrinkA=18, shrinkB=18, lw=1.5, **style))
        else:
            ax.plot([x0, x1], [y0, y1], color="gray", ls=":", lw=1)
        ax.text(x0 + 0.38 * (x1 - x0), y0 + 0.38 * (y1 - y0), label, fontsize=8, ha="center", va="center",
                bbox=dict(boxstyle="round", fc="white", ec="none", alpha=0.8))
    for m, (x, y) in pos.items():
        ax.add_patch(plt.Circle((x, y), 0.16, color="tab:blue", zorder=3))
        ax.text(x, y, m, color="white", fontsize=14, ha="center", va="center", zorder=4, weight="bold")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))
