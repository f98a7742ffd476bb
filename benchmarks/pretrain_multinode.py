"""Pretraining across nodes on this machine: tokens/s of docs/deploy/pretrain-multinode.sh as one
node against two nodes on 127.0.0.1 (one gloo process each, a c10d rendezvous), in one run.

    python benchmarks/pretrain_multinode.py [--profile tiny] [--steps 30]

The tiny profile's corpus, cleaned and tokenized once; then the script's run with NODES=1 and with
NODES=2 (each node's torchrun started as a user starts it), both from the same prepared folder
settings. tokens/s is the run's steady state (summary.json: all processes together); each process
takes micro_batch sequences per step, so two nodes train twice the tokens per step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.config import load_profile
from pipeline.io import free_port, read_json
from pipeline.layout import REPO_ROOT, BaseModelFiles

SCRIPT = REPO_ROOT / "docs" / "deploy" / "pretrain-multinode.sh"


def _work(profile, root: Path) -> None:
    from pipeline.data.clean import clean_corpus
    from pipeline.data.ingest import build_raw_corpus
    from pipeline.train.tokenizer import build_tokenizer

    c = profile.corpus
    build_raw_corpus(c.sources, root / "raw.jsonl", c.max_bytes, c.code_share, progress=False)
    clean_corpus([root / "raw.jsonl"], root / "clean_corpus", profile.clean, progress=False)
    build_tokenizer(root / "clean_corpus" / "clean", root / "tokenizer", profile)


def _run(work: Path, nodes: int, profile_file: Path, output: Path) -> dict:
    port = free_port()
    procs = []
    for rank in range(nodes):
        env = {
            **os.environ, "NODES": str(nodes), "NODE_RANK": str(rank), "MASTER": "127.0.0.1", "PORT": str(port),
            "LOCAL_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1",
            "PROFILE": str(profile_file), "OUTPUT": str(output), "PYTHON": sys.executable, "MAX_RESTARTS": "0",
            "RUN_ID": f"bench-{port}",
        }  # fmt: skip
        procs.append(subprocess.Popen(["bash", str(SCRIPT), str(work)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a node failed: exit codes {codes}")
    return read_json(BaseModelFiles(output).summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _work(profile, work)
        profile_file = work / "bench.yaml"
        profile_file.write_text(
            f"base: {args.profile}\npretrain: {{steps: {args.steps}, eval_every: {args.steps}, "
            f"checkpoint_every: {args.steps}, warmup_steps: 2}}\n"
        )
        one = _run(work, 1, profile_file, work / "one")
        two = _run(work, 2, profile_file, work / "two")
    s = profile.pretrain
    print(f"profile {profile.name}: {args.steps} steps, {s.micro_batch} x {s.seq_len} tokens per process and step")
    for name, summary in (("1 node x 1 process ", one), ("2 nodes x 1 process", two)):
        print(f"{name}  {summary['tokens_per_s']:8.0f} tokens/s (all processes), devices {summary['devices']}, "
              f"final loss {summary['final_train_loss']:.3f}")  # fmt: skip
    print(f"ratio two nodes / one: {two['tokens_per_s'] / one['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
