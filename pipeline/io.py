"""Small file helpers shared by the stages: atomic writes, JSON and JSONL reading, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import KilnError


def sha256(path: Path) -> str:
    """A file's sha256, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def free_port(host: str = "127.0.0.1", pair: bool = False) -> int:
    """A TCP port free on `host` now, for a server this process starts; with `pair`, one whose next
    port is free too (`kiln replica` answers its gateway on the next port)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if not pair:
                return port
            with socket.socket() as after:
                try:
                    after.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise OSError(f"no two free consecutive ports on {host}")


def writable_folder(path: Path) -> Path:
    """`path` as an existing folder this process can write into (created if missing); a KilnError
    naming it when it is a file or cannot be created or written (checked with a real write, which
    also holds for root on a read-only file system)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KilnError(f"{path}: exists and is not a folder (give a folder for the output)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise KilnError(f"{path}: not a writable folder ({exc.strerror or type(exc).__name__})") from None
    return path


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write (a file or a folder); rename it into place
    only when the block succeeds, so a crash never leaves a half-written artifact at `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)  # a folder cannot be replaced in one step: move the old aside first
    os.replace(tmp, final)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_jsonl(path: Path) -> Iterator[dict]:
    """Records split on "\n" only: a U+2028 or a bare CR inside a text is part of its line."""
    with Path(path).open(encoding="utf-8", newline="\n") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, rows) -> None:
    """One JSON object per line, written atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_json(path: Path, obj) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def model_context(checkpoint: Path) -> int:
    """The context a save_pretrained folder declares (config.json's max_position_embeddings): for
    kiln's own model the length it was trained at, carried through SFT and DPO merges."""
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise KilnError(f"{config}: no such file; not a checkpoint folder")
    context = read_json(config).get("max_position_embeddings")
    if not isinstance(context, int) or context < 1:
        raise KilnError(f"{config}: max_position_embeddings is missing, so the trained context is unknown")
    return context


def within_context(length: int | None, checkpoint: Path, key: str) -> int:
    """A length setting (`key`) checked against the checkpoint's trained context: null takes the
    context, a longer one is refused (positions past it were never trained)."""
    context = model_context(checkpoint)
    if length is None:
        return context
    if length > context:
        raise KilnError(f"{key} {length} exceeds the {context}-token context {checkpoint} was trained at")
    return length
