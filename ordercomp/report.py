"""Run reports: the per-stage table (console and Markdown), report.json and the plots.

A report is a plain dict (JSON-able) built by the pipeline::

    {"order": "DPQE", "original": {accuracy, macs, params, bitops, storage_bits},
     "stages": [{step, stage, accuracy, accuracy_change, macs, params, bitops, bitops_cr, cr,
                 seconds, exit_sweep?: [{threshold, accuracy, bitops, bitops_cr}], info}],
     "metric": "accuracy", "notes": [...]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .checkpoint import atomic_write, write_json, write_text

__all__ = ["format_table", "markdown", "write_report", "plot_stages", "plot_exit_sweep"]

COUNTING_NOTE = (
    "MACs and BitOps count convolution and linear layers only (batch norm, activations, pooling "
    "and residual additions are not counted); a float layer counts 32 x 32 bits per MAC."
)


def _rows(report: Dict) -> List[List[str]]:
    metric = report.get("metric", "accuracy")
    original = report["original"]
    rows = [["original", f"{original[metric]:.2f}", "", f"{original['macs'] / 1e6:.2f}",
             f"{original['params'] / 1e6:.3f}", f"{original['bitops'] / 1e9:.3f}", "1.0", "1.0", ""]]
    for s in report["stages"]:
        rows.append([
            f"{s['step']}. {s['stage']}",
            f"{s[metric]:.2f}",
            f"{s[metric + '_change']:+.2f}",
            f"{s['macs'] / 1e6:.2f}",
            f"{s['params'] / 1e6:.3f}",
            f"{s['bitops'] / 1e9:.3f}",
            f"{s['bitops_cr']:.1f}",
            f"{s['cr']:.1f}",
            f"{s['seconds']:.1f}",
        ])
    return rows


def _header(report: Dict) -> List[str]:
    metric = report.get("metric", "accuracy")
    return ["stage", metric, "change (pp)", "MMACs", "Mparams", "GBitOps", "BitOpsCR", "CR", "seconds"]


def format_table(report: Dict) -> str:
    """The per-stage table as aligned text for the console."""
    rows = [_header(report)] + _rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: Dict) -> str:
    """report.md: the table (like a row of the paper's Table 2 per stage) and what was counted."""
    header = _header(report)
    lines = [f"# ordercomp run: order {report['order']}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += ["", *[f"- {note}" for note in [COUNTING_NOTE, *report.get("notes", [])]]]
    for s in report["stages"]:
        if s.get("exit_sweep"):
            chosen = _threshold_label(s["threshold"]) if s.get("threshold") is not None else "none"
            lines += ["", f"Early-exit threshold sweep after step {s['step']} ({s['stage']}), chosen threshold: {chosen}", "",
                      "| threshold | accuracy | BitOpsCR |", "|---|---|---|"]
            lines += [f"| {_threshold_label(p['threshold'])} | {p['accuracy']:.2f} | {p['bitops_cr']:.1f} |"
                      for p in s["exit_sweep"]]
    plots = report.get("plots", {})
    if plots:
        lines += ["", *[f"![{name}]({path})" for name, path in plots.items()]]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return path


def plot_stages(report: Dict, path) -> Path:
    """Accuracy and BitOpsCR after each stage (the paper's Fig. 6)."""
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
    try:
        return _save_figure(fig, Path(path))
    finally:
        plt.close(fig)


def _threshold_label(threshold: float) -> str:
    """Thresholds above 1 mean that no input leaves early."""
    return "no exit" if threshold > 1 else f"{threshold:.2f}"


def plot_exit_sweep(stage: Dict, path) -> Path:
    """Accuracy against BitOpsCR over the early-exit threshold sweep of one stage."""
    plt = _pyplot()
    points = sorted(stage["exit_sweep"], key=lambda p: p["threshold"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([p["bitops_cr"] for p in points], [p["accuracy"] for p in points], "o-")
    for p in points[:: max(1, len(points) // 8)]:
        ax.annotate(_threshold_label(p["threshold"]), (p["bitops_cr"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if stage.get("threshold") is not None:
        chosen = min(points, key=lambda p: abs(p["threshold"] - stage["threshold"]))
        ax.plot([chosen["bitops_cr"]], [chosen["accuracy"]], "r*", markersize=14, label=f"chosen: {_threshold_label(stage['threshold'])}")
        ax.legend()
    ax.set_xlabel("BitOps compression ratio")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"early-exit threshold sweep (step {stage['step']}, {stage['stage']})")
    ax.grid(alpha=0.3)
    try:
        return _save_figure(fig, Path(path))
    finally:
        plt.close(fig)


def write_report(run_dir, report: Dict) -> Dict[str, Path]:
    """Writes report.json, report.md and the plots into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    plots = {"stages": plot_stages(report, run_dir / "stages.png")} if report["stages"] else {}
    for s in report["stages"]:
        if s.get("exit_sweep"):
            plots[f"exit_sweep_{s['step']}"] = plot_exit_sweep(s, run_dir / f"exit_sweep_{s['step']}.png")
    report = dict(report, plots={name: path.name for name, path in plots.items()})
    paths = {"json": write_json(run_dir / "report.json", report), "md": write_text(run_dir / "report.md", markdown(report))}
    return {**paths, **plots}
