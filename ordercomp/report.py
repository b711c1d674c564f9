"""Run reports: the per-stage table (console and Markdown), report.json and the plots.

A report is a plain dict (JSON-able) built by the pipeline::

    {"order": "DPQE", "original": {accuracy, calibration_accuracy?, macs, params, bitops, storage_bits},
     "stages": [{step, stage, accuracy, accuracy_change, accuracy_change_interval: [low, high],
                 calibration_accuracy, epochs: {phase: epochs run}, macs, params, bitops, bitops_cr,
                 cr, seconds, exit_sweep?: [{threshold, accuracy, bitops, bitops_cr}] (on the
                 calibration data), heads_dropped?, info}],
     "data": {validation_inputs, calibration_inputs}, "metric": "accuracy", "notes": [...],
     "budget": None | {target_loss, baseline, confidence, calibration_loss, calibration_margin,
                       calibration_upper, met, done, stopped, shares, resolution: None | {calibration_inputs,
                       smallest_share, margin, needed, calibration_fraction, message},
                       margin_floor: None | {calibration_inputs, changed, margin, smallest_share, needed,
                       calibration_fraction, message},
                       probes: [{step, stage, kind, anchor, strength, calibration_accuracy, loss, margin,
                                 estimated_loss?, estimated_margin?, bitops_cr, seconds}],
                       decisions: [{step, stage, allowance, margin_weight, incoming_margin, strength, searched, loss,
                                    margin, upper, within, rejected?, fell_back?}]}}

report.json adds ``format`` ("ordercomp-report") and ``version`` (1), and ``plots`` (their file
names). The plots are drawn by :mod:`ordercomp.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import write_json, write_text
from .plots import plot_bits, plot_budget, plot_exit_sweep, plot_stages, threshold_label

__all__ = ["format_table", "markdown", "write_report", "budget_lines", "exit_points_line", "REPORT_FORMAT",
           "REPORT_VERSION"]

REPORT_FORMAT, REPORT_VERSION = "ordercomp-report", 1  # recorded in report.json (reports before it: version 1)

COUNTING_NOTE = (
    "MACs and BitOps count convolution and linear layers only (batch norm, activations, pooling "
    "and residual additions are not counted); a float layer counts 32 x 32 bits per MAC."
)


def _rows(report: Dict) -> List[List[str]]:
    metric = report.get("metric", "accuracy")
    original = report["original"]
    rows = [["original", f"{original[metric]:.2f}", "", "", f"{original['macs'] / 1e6:.2f}",
             f"{original['params'] / 1e6:.3f}", f"{original['bitops'] / 1e9:.3f}", "1.0", "1.0", "", ""]]
    for s in report["stages"]:
        interval = s.get(metric + "_change_interval")
        rows.append([
            f"{s['step']}. {s['stage']}",
            f"{s[metric]:.2f}",
            f"{s[metric + '_change']:+.2f}",
            f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "",
            f"{s['macs'] / 1e6:.2f}",
            f"{s['params'] / 1e6:.3f}",
            f"{s['bitops'] / 1e9:.3f}",
            f"{s['bitops_cr']:.1f}",
            f"{s['cr']:.1f}",
            "+".join(str(n) for n in (s.get("epochs") or {}).values()),
            f"{s['seconds']:.1f}",
        ])
    latency = report.get("latency")
    if latency:  # measured speed-up beside BitOpsCR
        names = [latency["reference"]] + [f"{s['step']}. {s['stage']}" for s in report["stages"]]
        for row, name in zip(rows, names):
            row.insert(8, _speedups(latency, name, latency["reference"]))
    return rows


def _header(report: Dict) -> List[str]:
    metric = report.get("metric", "accuracy")
    header = ["stage", metric, "change (pp)", "95% interval", "MMACs", "Mparams", "GBitOps", "BitOpsCR", "CR", "epochs",
              "seconds"]
    latency = report.get("latency")
    if latency:
        batches = " / ".join(str(b) for b in latency["batch_sizes"])
        header.insert(8, f"measured speed-up (batch {batches})")
    return header


def format_table(report: Dict) -> str:
    """The per-stage table as aligned text for the console."""
    rows = [_header(report)] + _rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + _lines_below(report))


def order_search_line(report: Dict) -> Optional[str]:
    """How the order was chosen when an order search chose it (``order="auto"``), else None."""
    search = report.get("order_search")
    if not search:
        return None
    sure = (f"{100 * search['confidence']:.0f} % of bootstrap resamples sort to it"
            if search.get("confidence") is not None else "no interval (the points carry no per-input answers)")
    return (f"order {search['order']} chosen by an order search of {search['methods']} (grid {search['grid']}, "
            f"{search['seeds']} seed(s)) measured on {search['measured_on']}: {sure}; "
            + "; ".join(f"{pair}: {verdict}" for pair, verdict in search["verdicts"].items())
            + f"; {search['runs']} runs ({search['executed']} run now) in {search['seconds'] / 60:.1f} min")


def _lines_below(report: Dict) -> List[str]:
    """What the table needs said under it: where the exit points are, heads E dropped, where choices were made."""
    out = [line for line in [order_search_line(report), exit_points_line(report)] if line]
    out += [f"step {s['step']} ({s['stage']}): no exit paid off on the calibration data; the heads were dropped"
            for s in report["stages"] if s.get("heads_dropped")]
    out += budget_lines(report)
    sizes = report.get("data") or {}
    if sizes.get("validation_inputs"):
        where = (f"{sizes['calibration_inputs']} calibration inputs" if sizes.get("calibration_inputs")
                 else "the validation inputs themselves")
        out.append(f"accuracy on {sizes['validation_inputs']} validation inputs; choices made on {where}; "
                   "epochs: per training phase, each ending on the calibration signal")
    return out


def _strength(strength: Dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in strength.items())


def budget_lines(report: Dict) -> List[str]:
    """What the accuracy budget chose and whether the result meets it (none without a budget)."""
    budget = report.get("budget")
    if not budget:
        return []
    probes = budget["probes"]
    chosen = []
    for d in budget["decisions"]:
        stage = next((s for s in report["stages"] if s["step"] == d["step"]), {})
        what = _strength(d["strength"]) if d["strength"] else (
            "no exit pays off" if stage.get("heads_dropped") else
            f"threshold {threshold_label(stage['threshold'])}" if stage.get("threshold") is not None else "as configured")
        weight = d.get("margin_weight", 1.0)  # runs before the margin was counted once: all of it
        spent = f"{d['margin']:.2f}" if weight == 1 else f"{weight:.2g} x {d['margin']:.2f}"
        refused = d.get("rejected")
        refused = [refused] if isinstance(refused, dict) else refused or []  # a dict before step backs
        notes = f"; refused: {'; '.join(_strength(s) for s in refused)}" if refused else ""
        if d.get("fell_back"):
            notes += f"; fell back: {'; '.join(_strength(s) for s in d['fell_back'])} trained fully"
        chosen.append(f"{d['stage']} {what} ({d['loss']:+.2f} + {spent} of {d['allowance']:.2f} pp{notes})")
    seconds = sum(p["seconds"] for p in probes if not p["anchor"])
    confidence = f"{100 * budget['confidence']:g} %"
    lines = [f"accuracy budget {budget['target_loss']:g} pp at {confidence} confidence on the calibration data: "
             f"{len(probes)} runs ({sum(not p['anchor'] for p in probes)} beyond the stages as configured, "
             f"{seconds:.0f} s); chosen: " + "; ".join(chosen)]
    lines += _cost_lines(report)
    if budget.get("resolution"):
        lines.append(f"calibration data too small: {budget['resolution']['message']}")
    if budget.get("margin_floor"):
        lines.append(f"calibration data limits the budget: {budget['margin_floor']['message']}")
    if budget.get("stopped"):
        lines.append(f"probing stopped early: {budget['stopped']}; later searches kept what they had")
    if budget.get("done") and budget.get("calibration_loss") is not None:
        target = budget["target_loss"]
        bound = (f"calibration loss {budget['calibration_loss']:+.2f} pp + margin {budget['calibration_margin']:.2f} "
                 f"= {budget['calibration_upper']:+.2f} pp at {confidence} confidence")
        final = report["stages"][-1] if report.get("stages") else None
        held_out = "" if final is None else (
            f"; validation change {final['accuracy_change']:+.2f} pp "
            f"[{final['accuracy_change_interval'][0]:+.2f}, {final['accuracy_change_interval'][1]:+.2f}]")
        lines.append(f"budget met: {bound} <= {target:g} pp{held_out}" if budget["met"] else
                     f"BUDGET NOT MET: {bound} > {target:g} pp{held_out}; a stage over its share ran at the "
                     "least lossy strength probed")
    return lines


def _cost_lines(report: Dict) -> List[str]:
    """With ``budget.cost="latency"``: each stage's BitOpsCR beside its measured speed-up, and the
    stages where the two part ways (more BitOps saved, no time saved)."""
    budget = report["budget"]
    if budget.get("cost") != "latency":
        return []
    stages = {s["step"]: s for s in report["stages"]}
    pairs = [(d, stages[d["step"]]) for d in budget["decisions"] if "speedup" in d and d["step"] in stages]
    if not pairs:
        return []
    line = ("costs (the budget bought measured latency): " +
            "; ".join(f"{d['stage']} {s['bitops_cr']:.1f}x BitOps, {d['speedup']:.2f}x faster" for d, s in pairs))
    apart, before = [], (1.0, 1.0)
    for d, s in pairs:
        if s["bitops_cr"] > 1.05 * before[0] and d["speedup"] < 1.05 * before[1]:
            apart.append(f"{d['stage']} ({before[0]:.1f}x -> {s['bitops_cr']:.1f}x BitOps, "
                         f"{before[1]:.2f}x -> {d['speedup']:.2f}x speed)")
        before = (s["bitops_cr"], d["speedup"])
    return [line, "BitOps and latency part ways at " + ", ".join(apart) if apart else
            "BitOps and latency agree: every stage that saved BitOps saved time"]


def exit_points_line(report: Dict) -> Optional[str]:
    """Where the exit heads went and why, or None when no exit points were decided."""
    decided = report.get("exit_points")
    if not decided:
        return None
    how = {"found": "found automatically", "given": "given", "model default": "the model's defaults"}
    return f"exit points ({how.get(decided['source'], decided['source'])}): {', '.join(map(str, decided['points']))}"


def markdown(report: Dict) -> str:
    """report.md: the table (like a row of the paper's Table 2 per stage) and what was counted."""
    header = _header(report)
    lines = [f"# ordercomp run: order {report['order']}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += ["", *[f"- {note}" for note in [COUNTING_NOTE, *_lines_below(report), *report.get("notes", [])]]]
    for s in report["stages"]:
        if s.get("exit_sweep"):
            chosen = threshold_label(s["threshold"]) if s.get("threshold") is not None else "none"
            lines += ["", f"Early-exit threshold sweep on the calibration data after step {s['step']} ({s['stage']}), "
                      f"chosen threshold: {chosen}", "",
                      "| threshold | accuracy | BitOpsCR |", "|---|---|---|"]
            lines += [f"| {threshold_label(p['threshold'])} | {p['accuracy']:.2f} | {p['bitops_cr']:.1f} |"
                      for p in s["exit_sweep"]]
    for s in report["stages"]:
        if (s.get("info") or {}).get("sensitivity"):
            lines += ["", f"Bits per layer chosen at step {s['step']} ({s['stage']}, policy auto): "
                      f"{s['info']['bits_per_mac']:.2f} bits per MAC", "",
                      "| layer | weight bits | input bits | sensitivity (KL) |", "|---|---|---|---|"]
            lines += [f"| {n} | {b[0]} | {b[1]} | {s['info']['sensitivity'][n]:.3g} |"
                      for n, b in s["info"]["bits"].items()]
    if report.get("budget"):
        lines += ["", "Every run of the accuracy budget (calibration data; 'estimated' corrects a probe's short "
                  "training by the anchor's: anchor loss + anchor probe accuracy - probe accuracy, and its margin "
                  "from the answers changed the same way; a run fits when its loss (a probe: its estimate) with its "
                  f"margin at {100 * report['budget']['confidence']:g} % confidence does)", "",
                  "| step | stage | kind | strength | calibration accuracy | loss (pp) | margin (pp) | estimated (pp) "
                  "| BitOpsCR | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['step']} | {p['stage']} | {'anchor' if p['anchor'] else p['kind']} | "
                  f"{_strength(p['strength']) or '-'} | {p['calibration_accuracy']:.2f} | {p['loss']:+.2f} | "
                  f"{p['margin']:.2f} | "
                  + (f"{p['estimated_loss']:+.2f}" if p.get("estimated_loss") is not None else "")
                  + (f" (margin {p['estimated_margin']:.2f})" if p.get("estimated_margin") is not None else "")
                  + f" | {p['bitops_cr']:.1f} | {p['seconds']:.1f} |" for p in report["budget"]["probes"]]
    if report.get("latency"):
        lines += ["", "Measured latency (`ordercomp bench`); speed-ups are against the original in ONNX Runtime fp32", "",
                  *latency_lines(report["latency"])]
    plots = report.get("plots", {})
    if plots:
        lines += ["", *[f"![{name}]({path})" for name, path in plots.items()]]
    return "\n".join(lines) + "\n"


def write_report(run_dir, report: Dict) -> Dict[str, Path]:
    """Writes report.json, report.md and the plots into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    plots = {"stages": plot_stages(report, run_dir / "stages.png")} if report["stages"] else {}
    if report.get("budget") and report["stages"]:
        plots["budget"] = plot_budget(report, run_dir / "budget.png")
    for s in report["stages"]:
        if s.get("exit_sweep"):
            plots[f"exit_sweep_{s['step']}"] = plot_exit_sweep(s, run_dir / f"exit_sweep_{s['step']}.png")
        if (s.get("info") or {}).get("sensitivity"):
            plots[f"bits_{s['step']}"] = plot_bits(s, run_dir / f"bits_{s['step']}.png")
    report = dict(report, format=REPORT_FORMAT, version=REPORT_VERSION,
                  plots={name: path.name for name, path in plots.items()})
    paths = {"json": write_json(run_dir / "report.json", report), "md": write_text(run_dir / "report.md", markdown(report))}
    return {**paths, **plots}


def _speedup(latency: Dict, name: str, reference: str, batch: str) -> Optional[float]:
    rows = {r["name"]: r for r in latency["rows"]}
    if name not in rows or reference not in rows:
        return None
    return rows[reference]["ms"][batch] / rows[name]["ms"][batch]


def _speedups(latency: Dict, name: str, reference: str) -> str:
    values = [_speedup(latency, name, reference, str(b)) for b in latency["batch_sizes"]]
    return " / ".join("" if v is None else f"{v:.1f}x" for v in values)


def latency_table(latency: Dict) -> List[str]:
    """The measured latency of every model (Markdown rows), as ``ordercomp bench`` measured it."""
    batches = [str(b) for b in latency["batch_sizes"]]
    eager = latency["eager"]
    head = (["model", "BitOpsCR"] + [f"batch {b} (ms)" for b in batches]
            + [f"speed-up vs {latency['reference']}", f"speed-up vs {eager}", "ONNX KiB", "packed KiB",
               "agreement with PyTorch (%)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in latency["rows"]:
        cells = [r["name"], f"{r['bitops_cr']:.1f}" if r.get("bitops_cr") else "1.0"]
        cells += [f"{r['ms'][b]:.3f}" for b in batches]
        cells += [_speedups(latency, r["name"], latency["reference"]), _speedups(latency, r["name"], eager)]
        cells += [f"{r[k] / 1024:.1f}" if r.get(k) is not None else "" for k in ("onnx_bytes", "packed_bytes")]
        cells.append(f"{r['agreement']:.2f}" if r.get("agreement") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def latency_lines(latency: Dict) -> List[str]:
    """The latency table, the targets of the final model (MET or MISSED) and where BitOps and time part ways."""
    batches = [str(b) for b in latency["batch_sizes"]]
    lines = [f"measured latency: ONNX Runtime, {latency['threads']} intra-op threads, all graph optimisations; "
             f"median per call over {latency['rounds']} interleaved rounds on held-out inputs; the stages run their "
             f"fast export ({_EXITS_RUN[latency.get('graph', 'segments')]})", "", *latency_table(latency), ""]
    stages = [r for r in latency["rows"] if r["step"] is not None]
    if stages:
        final = stages[-1]["name"]
        for reference, factor in latency.get("targets", {}).items():
            for b in batches:
                v = _speedup(latency, final, reference, b)
                lines.append(f"- target: {final} >= {factor:g}x faster than {reference} at batch {b}: {v:.1f}x "
                             f"{'MET' if v >= factor else 'MISSED'}")
    previous = next(r for r in latency["rows"] if r["name"] == latency["reference"])
    for r in stages:
        gain = (r.get("bitops_cr") or 1.0) / (previous.get("bitops_cr") or 1.0)
        time = previous["ms"][batches[-1]] / r["ms"][batches[-1]]
        if gain >= 1.25 * max(time, 1.0):
            lines.append(f"- BitOps and time part ways at {r['name']}: {gain:.1f}x fewer BitOps than the step before, "
                         f"{time:.2f}x the speed at batch {batches[-1]}{_PART_WAYS.get(r['name'][-1], '')}")
        previous = r
    return lines


_EXITS_RUN = {"single": "exits decided inside one graph", "segments": "exits through ordercomp.runtime"}
_PART_WAYS = {  # why, by stage letter
    "P": " (narrow layers fill the kernels' vectors less, so time falls slower than MACs)",
    "Q": " (bits below 8 save size, not time: ONNX Runtime computes in 8 bits, and narrow convs stay float)",
    "E": " (exits skip the later segments, which take a smaller share of the time than of the BitOps; "
         "the heads and the batch splits cost time)",
}
