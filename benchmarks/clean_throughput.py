"""Cleaning throughput on the default corpus: documents/s and MB/s, against a reference pass.

    python benchmarks/clean_throughput.py [--profile tiny] [--repeat 2] [--workers 1,2]

The reference is the floor any cleaner pays: parse every raw JSONL record and write it back
out, in this same process, on the same file. The ratio (clean time / reference time) says how
much the real work (quality rules, exact and MinHash dedup, PII masking, the split) costs on
top of reading and writing. PII masking alone is timed too, as the stage most sensitive to
regular-expression cost. `--workers 1,2` also runs the stage with that many datatrove tasks and
local worker processes each (`clean.tasks`) and reports the speed-up over the first count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from pipeline.config import load_profile
from pipeline.data.clean import clean_corpus
from pipeline.data.ingest import build_raw_corpus
from pipeline.data.pii import mask_pii
from pipeline.io import read_jsonl


def _reference_pass(raw: Path, out: Path) -> None:
    with out.open("w", encoding="utf-8") as fh:
        for rec in read_jsonl(raw):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts")
    ap.add_argument("--workers", default="", help="comma-separated clean.tasks counts to compare, e.g. 1,2")
    args = ap.parse_args()
    workers = [int(n) for n in args.workers.split(",") if n.strip()]
    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw.jsonl"
        t = time.perf_counter()
        ingest = build_raw_corpus(
            profile.corpus.sources, raw, profile.corpus.max_bytes, profile.corpus.code_share, progress=False
        )
        t_ingest = time.perf_counter() - t
        docs, mb = ingest.documents, ingest.bytes / 1e6
        texts = [r["text"] for r in read_jsonl(raw)]
        t_ref = _best(lambda: _reference_pass(raw, tmp / "copy.jsonl"), args.repeat)
        t_clean = _best(lambda: clean_corpus([raw], tmp / "out", profile.clean, progress=False), args.repeat)
        t_pii = _best(lambda: [mask_pii(x) for x in texts], args.repeat)
        by_workers = {
            n: _best(lambda n=n: clean_corpus([raw], tmp / f"w{n}", dataclasses.replace(profile.clean, tasks=n),
                                              progress=False), args.repeat)
            for n in workers
        }  # fmt: skip
        stats = json.loads((tmp / "out" / "stats.json").read_text())

    print(f"corpus: profile {profile.name}, {docs} documents, {mb:.2f} MB (ingest {t_ingest:.1f} s)")
    print(f"kept {stats['kept_documents']}, dropped {sum(stats['dropped'].values())}, pii {stats['pii']}")
    print(f"{'pass':<22}{'seconds':>9}{'docs/s':>10}{'MB/s':>8}{'x reference':>13}")
    for name, secs in (("reference read+write", t_ref), ("clean_corpus", t_clean), ("PII masking only", t_pii)):
        print(f"{name:<22}{secs:>9.2f}{docs / secs:>10.0f}{mb / secs:>8.2f}{secs / t_ref:>13.1f}")
    for n, secs in by_workers.items():
        speedup = by_workers[workers[0]] / secs
        print(f"{f'clean, {n} workers':<22}{secs:>9.2f}{docs / secs:>10.0f}{mb / secs:>8.2f}"
              f"{secs / t_ref:>13.1f}   {speedup:.2f}x {workers[0]} worker(s)")  # fmt: skip


if __name__ == "__main__":
    main()
