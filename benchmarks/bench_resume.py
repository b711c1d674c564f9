"""Resume after a kill, scenario by scenario: is the resumed run the uninterrupted one, bit for bit?

A DPQE run of the command line on real digits (shuffled, augmented with random crops; the tests'
run, trained longer: ``--epochs`` of ``--max-batches`` a phase, a teacher of ``--teacher-epochs``) is run once
uninterrupted; then, each in a directory of its own, a run is SIGKILLed right after stage k is
saved (k = 1..4), in the middle of P's fine-tuning, and just before the file of stage 3 is renamed
into place, and is continued with ``--resume``. Every tensor and setting of every model file, and
every JSON file (timings aside), is compared with the uninterrupted run's.

    python benchmarks/bench_resume.py                      # the run as it is
    python benchmarks/bench_resume.py --keep-streams       # the loaders not restarted per stage (as before)

``--data``: an .npz of digits (default: the 1 024 / 512 digits shipped with the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_rundir import _COMPRESS, _KILLER, compare_runs  # noqa: E402  (the tests' kill harness)



def _scenarios(batches: int, teacher_epochs: int, epochs: int):
    # Optimizer steps: the teacher's, then D's two phases, then P's fine-tuning.
    mid_p = (teacher_epochs + 2 * epochs) * batches + epochs * batches // 2 + 1
    return [(f"killed after stage {k} ({'DPQE'[k - 1]}) is saved", ("stage", str(k))) for k in range(1, 5)] + [
        (f"killed in P's fine-tuning (optimizer step {mid_p})", ("step", str(mid_p))),
        ("killed before stage3_Q.pt is renamed into place", ("write", "stage3_Q.pt")),
    ]


def _cli(args, kill, keep_streams: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    if keep_streams:
        env["ORDERCOMP_KEEP_STREAMS"] = "1"
    return subprocess.run([sys.executable, "-c", _KILLER, *kill, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=1800)


def _accuracies(run: Path) -> str:
    stages = json.loads((run / "report.json").read_text())["stages"]
    return " ".join(f"{s['stage']} {s['accuracy']:.2f}" for s in stages)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an .npz of digits (default: the tests' digits)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_resume")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every phase (default 2)")
    p.add_argument("--max-batches", type=int, default=15,
                   help="batches per epoch of every phase (default 15: every batch of the tests' digits)")
    p.add_argument("--teacher-epochs", type=int, default=6, help="epochs of the teacher (default 6)")
    p.add_argument("--keep-streams", action="store_true",
                   help="do not restart the loaders' shuffling and augmentation per stage (the behaviour before)")
    args = p.parse_args()
    command = list(_COMPRESS)
    for flag, value in (("--data-root", args.data.resolve() if args.data else None),
                        ("--epochs", args.epochs), ("--max-batches", args.max_batches),
                        ("--teacher-epochs", args.teacher_epochs)):
        if value is not None:
            command[command.index(flag) + 1] = str(value)
    scenarios = _scenarios(args.max_batches, args.teacher_epochs, args.epochs)
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    reference = args.out / "uninterrupted"
    proc = _cli([*command, "--out", reference], ("none", "0"), args.keep_streams)
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{proc.stderr[-2000:]}")
    accuracy = _accuracies(reference)
    print(f"uninterrupted run: stage accuracies {accuracy} (%)\n")
    print(f"{'scenario':<50} {'finished at kill':>16} {'entries identical':>18} {'JSON identical':>15}  "
          "stage accuracies after resume (%)")
    exact = 0
    for i, (name, kill) in enumerate(scenarios):
        out = args.out / f"scenario{i + 1}"
        killed = _cli([*command, "--out", out], kill, args.keep_streams)
        if killed.returncode != -9:
            sys.exit(f"{name}: the run was not killed (exit {killed.returncode}):\n{killed.stderr[-2000:]}")
        completed = json.loads((out / "state.json").read_text())["completed"]
        resumed = _cli([*command, "--out", out, "--resume"], ("none", "0"), args.keep_streams)
        if resumed.returncode != 0:
            sys.exit(f"{name}: the resumed run failed:\n{resumed.stderr[-2000:]}")
        compared, documents, differences = compare_runs(reference, out)
        tensors = sum(1 for d in differences if ".pt: " in d)
        jsons = sum(1 for d in differences if d.endswith("differs"))
        exact += not differences
        print(f"{name:<50} {f'{completed} stage(s)':>16} {f'{compared - tensors}/{compared}':>18} "
              f"{f'{documents - jsons}/{documents}':>15}  {_accuracies(out)}"
              + ("" if not differences else "  DIFFERENT"))
    print(f"\nbit-exact after resume: {exact} of {len(scenarios)} scenarios "
          f"({'the loaders kept their streams' if args.keep_streams else 'each stage restarts its random streams'}); "
          f"{time.perf_counter() - started:.0f} s")
    return 0 if exact == len(scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
