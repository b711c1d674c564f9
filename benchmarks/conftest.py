"""Prints, after the pytest-benchmark table, each op's speed as ratios within its group and the targets."""

from __future__ import annotations

import pytest

# (group prefix, numerator, denominator, minimum ratio): numerator time / denominator time >= minimum.
TARGETS = [
    ("fake_quant_act", "torch_fake_quantize", "ordercomp", 2.0),
    ("fake_quant_act", "clone", "ordercomp", 1 / 1.3),
    ("quantize_weight", "reference", "ordercomp", 2.0),
    ("exit_check", "softmax_max_compare", "ordercomp", 3.0),
]


def _medians(config):
    session = getattr(config, "_benchmarksession", None)
    table = {}
    for bench in getattr(session, "benchmarks", []) or []:
        if bench.stats is None:
            continue
        table.setdefault(bench.group, {})[bench.params["impl"]] = bench.stats.median
    return table


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    table = _medians(config)
    if not table:
        return
    write = terminalreporter.write_line
    write("")
    write("ordercomp op speed, ratios of median times in this run (>1: the ordercomp kernel is faster)")
    write(f"{'group':<44} {'impl':<22} {'median ms':>10} {'time / kernel':>14}")
    for group in sorted(table):
        impls = table[group]
        base = impls.get("ordercomp")
        for impl, median in sorted(impls.items(), key=lambda kv: kv[1]):
            ratio = f"{median / base:14.2f}" if base else ""
            write(f"{group:<44} {impl:<22} {median * 1e3:10.3f} {ratio}")
    write("")
    write("targets")
    for prefix, num, den, minimum in TARGETS:
        for group in sorted(g for g in table if g.startswith(prefix)):
            impls = table[group]
            if num in impls and den in impls:
                ratio = impls[num] / impls[den]
                verdict = "met" if ratio >= minimum else "MISSED"
                write(f"  {group:<44} {num} / {den} = {ratio:6.2f}  (need >= {minimum:.2f})  {verdict}")
