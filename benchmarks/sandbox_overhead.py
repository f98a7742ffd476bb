"""What the bubblewrap sandbox costs per HumanEval sample, against the sandbox it replaced.

    python benchmarks/sandbox_overhead.py [--problems 40] [--repeat 3]

Each canonical solution of the first N problems is scored one at a time (no thread pool) by:
- the reference: the previous sandbox (Python-level guards in one child process, its verdict a
  printed marker), read from git history at OLD_COMMIT and loaded in this same process;
- `unsafe`: the current runner and verdict in a plain child process (resource limits only);
- `bwrap`: the current sandbox with its namespaces, unprivileged user and limits.
The ratios (time / reference time) say what the isolation and the out-of-process verdict cost.

Then the verdict tricks (wrong completions that try to be scored as passing: a printed "done"
marker, an exit hook that prints it after a failed assertion, an object whose `__eq__` always
answers True, an int subclass doing the same) are scored by the previous sandbox and the current
one, and the false passes counted. Only these harmless tricks run in the previous sandbox: the
escapes of tests/eval/test_sandbox.py (fork bombs, deleting files) would really escape it.
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
TRICK_TASK = "HumanEval/53"  # add(x, y)
_SAY_DONE = (
    "import atexit, os, posix, sys\n"
    "def _say_done():\n"
    "    for word in ['__kiln_sandbox_done__', *sys.argv[1:]]:\n"
    "        sys.stderr.write('\\n' + word + '\\n')\n"
    "    sys.stderr.flush()\n"
)
TRICKS = {
    "done marker": "    return x - y\n" + _SAY_DONE + "_say_done()\nraise SystemExit(0)\n",
    "exit hook": "    assert False\n" + _SAY_DONE + "atexit.register(lambda: (_say_done(), posix._exit(0)))\n",
    "always equal": "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
    "int subclass": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
    "        __hash__ = int.__hash__\n    return Yes(0)\n",
}


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

    p = problems()[TRICK_TASK]
    print(f"\nverdict tricks on {TRICK_TASK} (a pass is a false pass):")
    for trick, completion in TRICKS.items():
        was = old.run_program(f"{p['prompt']}{completion}\n\n{p['test']}\n\ncheck({p['entry_point']})\n")
        now = run_tests(p["prompt"], completion, p["test"], p["entry_point"])
        print(f"  {trick:14} previous: {'PASS' if was.passed else 'fail'}   bwrap: {'PASS' if now.passed else 'fail'}")


if __name__ == "__main__":
    main()
