"""Reading GGUF files and loading them under llama.cpp: what the release stages, evaluation,
tuning and serving share. The core, so that each of those layers may import it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from pipeline.errors import KilnError

GGUF_MAGIC = b"GGUF"
THREADS = os.cpu_count() or 1  # llama.cpp's threads, and the bandwidth measurement's


@contextlib.contextmanager
def quiet_native():
    """Silence what llama.cpp's C code prints on stdout/stderr (a line per tensor when quantizing)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def check_gguf(path: Path) -> None:
    """A clear error for a missing, truncated or foreign file before llama.cpp sees it."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise KilnError(f"{path}: not a GGUF file (starts with {head!r}, not {GGUF_MAGIC!r})")


def declared_context(path: Path) -> int:
    """The context a GGUF declares (`<arch>.context_length`): for kiln's model, the trained one."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        reader = GGUFReader(str(path))
        arch = reader.get_field("general.architecture")
        field = arch and reader.get_field(f"{arch.contents()}.context_length")
    except (ValueError, IndexError, KeyError) as exc:  # the reader's words for a cut-off or damaged header
        raise KilnError(f"{path}: cannot read its metadata ({exc}); the file may be truncated or corrupt") from None
    if field is None:
        raise KilnError(f"{path}: the GGUF declares no context_length")
    return int(field.contents())


def load(path: Path, n_ctx: int | None = None, logits_all: bool = False, threads: int = THREADS):
    """The GGUF under llama.cpp with `n_ctx` positions, never more than the file declares (its
    `context_length`, the trained one); None: the declared context."""
    import llama_cpp

    declared = declared_context(path)
    n_ctx = declared if n_ctx is None else min(n_ctx, declared)
    try:
        with quiet_native():
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=logits_all,
                n_threads=threads, verbose=False,
            )  # fmt: skip
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python's words for "could not load"
        raise KilnError(f"{path}: llama.cpp cannot load it ({exc}); the file may be truncated or corrupt") from None


def usable_context(llm) -> int:
    """Positions a loaded model may use: llama.cpp pads its context (to a multiple of 256), but
    llama-cpp-python's buffers and the model's training end at the context it was given."""
    return min(llm.n_ctx(), llm.context_params.n_ctx)
