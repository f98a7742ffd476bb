"""Cleaning on a Slurm cluster: kiln's clean_corpus pipelines (pipeline/data/clean.py, the same steps
and settings as the local run) on datatrove's Slurm executor, each pipeline a job array that starts
when the one before it has finished.

    python docs/deploy/clean_slurm.py submit RAW.jsonl... --output /shared/kiln/clean --partition cpu --tasks 64
    python docs/deploy/clean_slurm.py finish --output /shared/kiln/clean      # once the last array is done

Run it from a login node, with the checkout and its .venv on a file system that every node mounts
(the nodes unpickle kiln's own steps, so they import `pipeline` from there). `finish` counts the
written files into stats.json and moves clean/ and rejected/ into place, as the local run does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import load_profile  # noqa: E402
from pipeline.data import clean  # noqa: E402
from pipeline.io import write_json  # noqa: E402


def submit(args: argparse.Namespace) -> None:
    settings = dataclasses.replace(load_profile(args.profile).clean, tasks=args.tasks)
    scratch = Path(args.output) / ".clean-scratch"
    work, rejected = scratch / "work", scratch / "rejected"
    documents = clean._shard_inputs([Path(p) for p in args.raw], work / "raw", rejected, settings.tasks)
    bands, rows = clean.minhash_bands(settings.minhash_threshold, settings.minhash_hashes)
    write_json(scratch / "submitted.json", {"input_documents": documents, "bands": [bands, rows]})
    from datatrove.executor import SlurmPipelineExecutor

    previous = None
    for name, tasks, steps in clean._stages(settings, bands, rows, work, rejected, scratch / "clean"):
        previous = SlurmPipelineExecutor(
            steps, tasks=tasks, time=args.time, partition=args.partition, cpus_per_task=1, mem_per_cpu_gb=4,
            job_name=f"kiln-clean-{name}", venv_path=str(REPO / ".venv" / "bin" / "activate"),
            logging_dir=str(Path(args.output) / "logs" / name), depends=previous,
        )  # fmt: skip
    previous.run()  # submits the whole chain: each array waits for the one it depends on
    print(f"submitted {documents} documents in {settings.tasks} tasks; `squeue --me` shows the arrays")


def finish(args: argparse.Namespace) -> None:
    output = Path(args.output)
    scratch = output / ".clean-scratch"
    submitted = json.loads((scratch / "submitted.json").read_text())
    empty = scratch / "rejected" / "empty-00000.jsonl"
    if empty.exists() and empty.stat().st_size == 0:
        empty.unlink()
    stats = clean._count(submitted["input_documents"], scratch / "clean", scratch / "rejected", submitted["bands"])
    write_json(scratch / "stats.json", stats.to_dict())
    clean._publish(scratch, output)
    print(json.dumps(stats.to_dict(), indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["submit", "finish"])
    ap.add_argument("raw", nargs="*", help="raw JSONL files (raw_corpus's raw.jsonl), for submit")
    ap.add_argument("--output", required=True, help="the clean_corpus folder, on the shared file system")
    ap.add_argument("--profile", default="tiny", help="whose clean settings (thresholds, validation share)")
    ap.add_argument("--tasks", type=int, default=64, help="datatrove tasks (array size) for the parallel steps")
    ap.add_argument("--partition", default="cpu")
    ap.add_argument("--time", default="04:00:00", help="Slurm time limit per task")
    args = ap.parse_args()
    submit(args) if args.action == "submit" else finish(args)
