"""What deciding reuse costs: hashing every stage folder of a finished run, with the hash cache
(files known by size and modification time) against reading every byte (the reference), in the
same process.

    python benchmarks/stage_keys.py [--profile tiny] [--work-dir data/work]

Run it after `make run`: it reads the artifacts of that profile and writes nothing there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipeline.layout import Layout
from pipeline.reuse import HashCache


def hash_all(folders: list[Path], cache: Path) -> tuple[float, dict]:
    hashes = HashCache(cache)
    start = time.perf_counter()
    digests = {f.name: hashes.content(f) for f in folders}
    hashes.save()
    return time.perf_counter() - start, digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--work-dir", default=None, help="default: $KILN_WORK_DIR or data/work")
    args = parser.parse_args()
    root = Layout.for_profile(args.profile, args.work_dir).root
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        print(f"no stage folders under {root}: run the pipeline first", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hashes.json"
        cold, first = hash_all(folders, cache)  # the reference: every byte read
        warm, second = hash_all(folders, cache)  # what a re-run does: sizes and mtimes only
    assert first == second, "the cached hashes differ from the computed ones"
    print(f"{len(folders)} stage folders, {size / 2**20:,.1f} MiB under {root}")
    print(f"every byte hashed: {cold:.3f} s; with the hash cache: {warm:.3f} s; {cold / warm:,.0f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
