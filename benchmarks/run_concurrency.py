"""A whole pipeline run in one process (`run.max_concurrent: 1`, the default) against Dagster's
multiprocess executor (`run.max_concurrent: 2`), on one profile, one after the other in one command.

    python benchmarks/run_concurrency.py [--profile tiny] [--max-concurrent 2]

Each run is `kiln run` on a profile file that takes the chosen profile as its base and sets only
`run.max_concurrent`, from an empty work folder, Dagster home and MLflow store of its own (all in a
temporary folder): nothing is reused, every stage computes. Printed: the wall time of each run, the
ratio, and the per-stage table `kiln run` prints at its end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(base: str, max_concurrent: int, folder: Path) -> tuple[float, str]:
    """(wall seconds, the stage table) of `kiln run` with run.max_concurrent set, all state in `folder`."""
    folder.mkdir(parents=True)
    profile = folder / f"{base}-mc{max_concurrent}.yaml"
    profile.write_text(f"base: {base}\nrun:\n  max_concurrent: {max_concurrent}\n")
    env = dict(
        os.environ, KILN_WORK_DIR=str(folder / "work"), DAGSTER_HOME=str(folder / "dagster"),
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'registry' / 'mlflow.db'}", HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )  # fmt: skip
    (folder / "registry").mkdir()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--profile", str(profile)]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"run_concurrency: kiln run with max_concurrent {max_concurrent} failed:\n{done.stderr[-3000:]}")
    start = done.stderr.rfind("\nstage ")  # the table kiln run prints last (pipeline/reuse.py time_table)
    return seconds, done.stderr[start + 1 :].split("\nkiln: pipeline done")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny", help="the base profile (default: tiny)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="steps at once in the second run (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-run-concurrency-") as tmp:
        results = {}
        for n in (1, args.max_concurrent):
            seconds, table = one_run(args.profile, n, Path(tmp) / f"mc{n}")
            results[n] = seconds
            print(f"run.max_concurrent {n}: {seconds:.0f} s\n{table}\n", flush=True)
    one, many = results[1], results[args.max_concurrent]
    print(f"{args.profile}: one process {one:.0f} s, max_concurrent {args.max_concurrent} {many:.0f} s "
          f"(ratio {one / many:.2f}x; above 1 is faster), load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
