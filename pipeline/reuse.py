"""Reuse by inputs: a stage whose code version, settings and input files are those of its last
finished run keeps that run's result instead of computing it again.

A stage's key is a hash of its code version, its settings and the content of its input files
and folders. When the stage finishes, its record (the key, the run, the result's metadata) is
written last, beside its outputs, as `<stage folder>/.stage.json`; a stage that starts computing
removes the record first, so outputs left half-written by a crash never pass for a finished
result. File hashes are cached by size and modification time (`<profile>/.hashes.json`), so an
unchanged multi-megabyte checkpoint is not read again on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import time
from pathlib import Path

from pipeline.io import read_json, sha256, write_json

RECORD = ".stage.json"
FORCE_TAG = "kiln/force"  # a run tagged "true" computes every stage and registers (kiln run --force)


class HashCache:
    """sha256 of files, remembered by (size, mtime): a file is read again only when either changed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict = read_json(self.path) if self.path.exists() else {}
        self.changed = False

    def file(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self.entries.get(str(path))
        if entry and entry[:2] == stamp:
            return entry[2]
        digest = sha256(path)
        self.entries[str(path)] = [*stamp, digest]
        self.changed = True
        return digest

    def content(self, path: Path) -> str:
        """A file's hash, or a folder's: its files' relative names and hashes, hidden files (stage
        records, temporary names of atomic writes) left out. A missing path hashes as missing."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return "missing"
        digest = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                digest.update(f"{rel}\0{self.file(f)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.changed:
            write_json(self.path, self.entries)
            self.changed = False


def content_hash(cache: Path, path: Path) -> str:
    """The hash of one file or folder through the cache at `cache` (saved for the next stage)."""
    hashes = HashCache(cache)
    digest = hashes.content(path)
    hashes.save()
    return digest


def _plain(settings) -> object:
    """Settings as JSON-ready values: dataclasses (also inside dicts) become dicts."""
    if dataclasses.is_dataclass(settings):
        return dataclasses.asdict(settings)
    if isinstance(settings, dict):
        return {k: _plain(v) for k, v in settings.items()}
    return settings


def stage_key(code_version: str, settings, inputs: list[Path], hashes: HashCache) -> str:
    """The hash that decides reuse: the same code, the same settings and the same input bytes give
    the same key. Input paths count only by content, so moving the work folder keeps the key."""
    blob = json.dumps(
        {"code_version": code_version, "settings": _plain(settings), "inputs": [hashes.content(p) for p in inputs]},
        sort_keys=True,
        default=str,
    )
    hashes.save()
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finished(stage_dir: Path, key: str, hashes: HashCache) -> dict | None:
    """The record of the stage's last finished run when its key is `key` and its outputs are
    still the files it wrote (none deleted or edited since), else None."""
    path = Path(stage_dir) / RECORD
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):  # a damaged record: compute again
        return None
    if record.get("key") != key:
        return None
    intact = record.get("outputs") == hashes.content(stage_dir)
    hashes.save()
    return record if intact else None


def forget(stage_dir: Path) -> None:
    """Called before computing: the outputs are about to change, so no record may vouch for them."""
    (Path(stage_dir) / RECORD).unlink(missing_ok=True)


def remember(stage_dir: Path, key: str, run_id: str, seconds: float, metadata: str, hashes: HashCache) -> None:
    """Written last, once every output is in place (atomically: a crash leaves no record), with
    the hash of the stage's folder so that outputs changed by hand are noticed."""
    outputs = hashes.content(stage_dir)
    hashes.save()
    write_json(
        Path(stage_dir) / RECORD,
        {
            "key": key, "run_id": run_id, "seconds": round(seconds, 2), "finished": time.time(),
            "outputs": outputs, "metadata": metadata,
        },
    )  # fmt: skip


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (datatrove workers,
    sandboxed samples): unlike wall time, it does not grow when other work shares the cores."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def log_timing(path: Path, stage: str, run_id: str, seconds: float, cpu: float, reused: bool) -> None:
    """One line per stage and run, read back by `kiln run` for its time table."""
    row = {
        "stage": stage, "run_id": run_id, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
        "reused": reused, "finished": time.time(),
    }  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:  # one short line per write: appends do not interleave
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def timings_since(path: Path, since: float) -> list[dict]:
    """The stages that finished after `since` (a time.time()), in the order they finished."""
    if not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["finished"] >= since]


def time_table(rows: list[dict], wall_seconds: float) -> str:
    """The run summary's per-stage table: wall and CPU seconds of each stage, reused or computed."""
    lines = [f"{'stage':<18} {'seconds':>8} {'CPU s':>8}  result", f"{'-' * 18} {'-' * 8} {'-' * 8}  {'-' * 8}"]
    for r in rows:
        cpu = r.get("cpu_seconds", float("nan"))
        lines.append(f"{r['stage']:<18} {r['seconds']:>8.1f} {cpu:>8.1f}  {'reused' if r['reused'] else 'computed'}")
    lines.append(f"{'whole run':<18} {wall_seconds:>8.1f} {'':>8}  (wall clock, Dagster's own work included)")
    return "\n".join(lines)
