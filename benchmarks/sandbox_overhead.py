"""What the bubblewrap sandbox costs per HumanEval sample, against the sandbox it replaced.

    python benchmarks/sandbox_overhead.py [--problems 40] [--repeat 3]

Each canonical solution of the first N problems is scored one at a time (no thread pool) by:
- the reference: the previous sandbox (Python-level guards in one child process, its verdict a
  printed marker), read from git history at OLD_COMMIT and loaded in this same process;
- `unsafe`: the current runner and verdict in a plain child process (resource limits only);
- `bwrap`: the current sandbox with its namespaces, unprivileged user and limits.
The ratios (time / reference time) say what the isolation and the out-of-process verdict cost.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

from pipeline.eval.humaneval import problems
from pipeline.eval.sandbox import check_available, run_tests

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "7f45ef8"  # the last commit with the guard-based sandbox


def _old_sandbox() -> types.ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:pipeline/eval/sandbox.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType("old_sandbox")
    sys.modules["old_sandbox"] = module  # dataclasses look their module up by name
    exec(compile(source, "old_sandbox.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    check_available()
    old = _old_sandbox()
    tasks = list(problems().values())[: args.problems]

    def reference(p):
        return old.run_program(f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\n\ncheck({p['entry_point']})\n")

    def current(unsafe):
        return lambda p: run_tests(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"], unsafe=unsafe)

    runs = {"reference (old guards)": reference, "unsafe (limits only)": current(True), "bwrap": current(False)}
    best = {}
    for name, run in runs.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            passed = sum(run(p).passed for p in tasks)
            times.append((time.perf_counter() - start) / len(tasks))
        best[name] = min(times)
        print(f"{name:24} {best[name] * 1000:7.1f} ms/sample  ({passed}/{len(tasks)} canonical solutions pass)")
    ref = best["reference (old guards)"]
    for name in list(runs)[1:]:
        print(f"{name} / reference: {best[name] / ref:.2f}x")


if __name__ == "__main__":
    main()
