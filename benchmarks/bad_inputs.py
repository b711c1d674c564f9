"""Bad inputs, counted: how each case of the tests' bad-input table ends.

Runs every case of ``tests/test_bad_input.py`` (the command line in process, ``compress()``,
``profile()``, ``data.load``, the config, the ops), each in a scratch folder of its own, and
counts: inputs tried / clear errors (the error type asked for, its message naming the argument;
on the command line one line and exit code 2) / tracebacks (another exception escaped, or the
command line printed more or exited otherwise) / silent (no error at all) / unclear (an error of
another type, or a message missing what it must name) / optimizer steps taken before the error /
run directories changed. Cases that end otherwise than clearly are listed.

    python benchmarks/bad_inputs.py
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_bad_input import CASES, Env, _files, run_case  # noqa: E402  (the tests' cases and harness)


def main() -> int:
    counts = {"clear": 0, "traceback": 0, "silent": 0, "unclear": 0}
    stepped = changed = 0
    listed = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "files").mkdir()
        with contextlib.redirect_stdout(io.StringIO()):  # the finished run the file cases tamper with prints its table
            files = _files(root / "files")
        for i, case in enumerate(CASES):
            scratch = root / f"case{i}"
            scratch.mkdir()
            env = Env(scratch, scratch / "run", files)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")

                def read_err() -> str:
                    text = err.getvalue()
                    err.seek(0)
                    err.truncate()
                    return text

                outcome = run_case(case, env, read_err)
            counts[outcome.kind] += 1
            stepped += outcome.steps > 0
            changed += outcome.changed
            if outcome.kind != "clear" or outcome.steps or outcome.changed:
                listed.append(f"  {case.id}: {outcome.kind}, {outcome.steps} step(s), "
                              f"{'changed' if outcome.changed else 'unchanged'}: {outcome.message[:200]}")
    print("inputs tried / clear errors / tracebacks / silent wrong / unclear / trained before the error / "
          "run directories changed")
    print(f"{len(CASES)} / {counts['clear']} / {counts['traceback']} / {counts['silent']} / {counts['unclear']} / "
          f"{stepped} / {changed}")
    print(f"distinct checks: {len({c.check for c in CASES})}")
    print("\n".join(listed) if listed else "every case: a clear error before any training, run directory unchanged")
    return 0 if not listed else 1


if __name__ == "__main__":
    sys.exit(main())
