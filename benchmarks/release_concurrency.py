"""Releases on the production deployment: N `kiln promote` / `kiln rollback` commands started at once
from separate processes (serialized by the PostgreSQL advisory lock) against the same N commands
run one after another, on services started in a temporary folder (pipeline/deploy/services.py).

    python benchmarks/release_concurrency.py [--commands 8]

Each command is a whole `kiln` process: start-up, download and sha256 check of the version's files,
then the locked step (read production, move the alias, append the history). The ratio says how much
of that work overlaps while the locked steps wait their turn; the history is checked to be complete
and in order after each batch.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.deploy import services
from pipeline.layout import REPO_ROOT
from pipeline.release import registry
from pipeline.tracking import LOCK_DATABASE_ENV, client, experiment_id


def _commands(n: int, versions: list[str]) -> list[list[str]]:
    return [["promote", versions[i % len(versions)]] if i % 2 else ["rollback"] for i in range(n)]


def _run(cmds: list[list[str]], uri: str, env: dict, at_once: bool) -> tuple[float, list[float]]:
    """Wall seconds for the batch, and each command's own seconds."""
    argv = [[sys.executable, "-m", "pipeline.cli", *c, "--profile", "tiny", "--tracking-uri", uri] for c in cmds]
    quiet = {"cwd": REPO_ROOT, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    t0, each = time.perf_counter(), []
    if at_once:
        procs = [(subprocess.Popen(a, **quiet), time.perf_counter()) for a in argv]
        for p, started in procs:
            if p.wait() != 0:
                raise SystemExit(p.stderr.read().decode())
            each.append(time.perf_counter() - started)
    else:
        for a in argv:
            started = time.perf_counter()
            done = subprocess.run(a, **quiet)
            if done.returncode != 0:
                raise SystemExit(done.stderr.decode())
            each.append(time.perf_counter() - started)
    return time.perf_counter() - t0, each


def _check_history(uri: str) -> int:
    events = registry.history(uri, "tiny")
    for prev, e in zip(events, events[1:], strict=False):
        assert e["from"] == prev["to"], (prev, e)
    return len(events)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-services-"))
    root.chmod(0o755)
    try:
        t = time.perf_counter()
        svc = services.up(root, ui=False, daemon=False)
        print(f"services up (PostgreSQL, MLflow server) in {time.perf_counter() - t:.1f} s")
        uri, env = svc["MLFLOW_TRACKING_URI"], {**os.environ, **svc}
        os.environ[LOCK_DATABASE_ENV] = svc[LOCK_DATABASE_ENV]
        c = client(uri)
        run = c.create_run(experiment_id(c, "tiny", uri)).info.run_id
        bundle = root / "bundle"
        bundle.mkdir()
        versions = []
        for i in range(3):
            (bundle / "model.gguf").write_bytes(random.Random(i).randbytes(1 << 20))
            versions.append(registry.register(uri, "tiny", run, bundle, {}, gate_passed=True))
        for v in versions + versions[:2]:
            registry.promote(uri, "tiny", v)
        cmds = _commands(args.commands, versions)
        seq, seq_each = _run(cmds, uri, env, at_once=False)
        events_after_seq = _check_history(uri)
        par, par_each = _run(cmds, uri, env, at_once=True)
        assert _check_history(uri) == events_after_seq + args.commands
        print(f"{'batch':<42}{'seconds':>9}{'per command (median)':>22}{'x one after another':>22}")
        for name, total, each in (("one after another", seq, seq_each), ("all at once (advisory lock)", par, par_each)):
            print(f"{f'{args.commands} commands, {name}':<42}{total:>9.1f}{sorted(each)[len(each) // 2]:>22.1f}"
                  f"{seq / total:>22.2f}")  # fmt: skip
        print(f"history: {events_after_seq + args.commands} events, each starting where the previous one left off")
    finally:
        services.down(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
