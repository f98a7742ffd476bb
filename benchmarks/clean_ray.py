"""Cleaning on Ray against the local executor: documents/s on the same raw corpus in one run, and
what Ray's start-up costs.

    python benchmarks/clean_ray.py [--profile tiny] [--tasks 2]

Builds the profile's raw corpus once, cleans it with the local executor (`clean.tasks` worker
processes), then starts a two-node Ray cluster on 127.0.0.1 (`ray start --head` plus one
`ray start --address`, one CPU each: pipeline/data/executors.py) and cleans the same file on it
(`clean.executor: ray`). Start-up is the time until both nodes are up; the Ray run's time includes
connecting to the cluster and each task's actor starting (its process, imports and placement
group), which is what a user pays per run. Both runs must write the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path

from pipeline.config import load_profile
from pipeline.data.clean import clean_corpus
from pipeline.data.executors import local_ray_cluster
from pipeline.data.ingest import build_raw_corpus


def _digest(output: Path) -> str:
    files = [output / "stats.json", *sorted((output / "clean").glob("*")), *sorted((output / "rejected").glob("*"))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--tasks", type=int, default=2, help="datatrove tasks (local worker processes; Ray actors)")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    local_settings = dataclasses.replace(profile.clean, tasks=args.tasks, executor="local")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw.jsonl"
        c = profile.corpus
        docs = build_raw_corpus(c.sources, raw, c.max_bytes, c.code_share, progress=False).documents
        t = time.perf_counter()
        clean_corpus([raw], tmp / "local", local_settings, progress=False)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        with local_ray_cluster(nodes=2) as address:
            t_start = time.perf_counter() - t
            t = time.perf_counter()
            ray_settings = dataclasses.replace(local_settings, executor="ray", ray_address=address)
            clean_corpus([raw], tmp / "ray", ray_settings, progress=False)
            t_ray = time.perf_counter() - t
        same = _digest(tmp / "local") == _digest(tmp / "ray")
    print(f"profile {profile.name}: {docs} raw documents, clean.tasks {args.tasks}")
    print(f"local executor ({args.tasks} processes)      {t_local:7.1f} s  {docs / t_local:8.0f} documents/s")
    print(f"Ray, 2 nodes x 1 CPU on 127.0.0.1  {t_ray:7.1f} s  {docs / t_ray:8.0f} documents/s")
    print(f"Ray cluster start-up (2 nodes)     {t_start:7.1f} s (not in the Ray run's time)")
    print(f"ratio Ray/local documents/s: {t_local / t_ray:.2f}; same files: {same}")


if __name__ == "__main__":
    main()
