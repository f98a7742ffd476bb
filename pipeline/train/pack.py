"""Token packing, base_model's first step: every document of both clean splits encoded once into a
flat uint16 file, `PackedTokens` cutting fixed-length training sequences from it in a seeded order,
and the unigram baseline a trained model must beat.

`pack_tokens` runs in one process before any training process starts (torchrun's processes only
read its files), and records what it packed in `tokens/stats.json`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.io import atomic_path, write_json
from pipeline.layout import BaseModelFiles
from pipeline.train.tokenizer import (
    bits_per_byte,
    document_start_ids,
    load_tokenizer,
    text_nats_and_bytes,
    texts_of,
    token_byte_lengths,
)

TOKEN_DTYPE = np.uint16  # 32k vocabulary fits; a quarter of int64's disk and memory
SPLITS = ("train", "validation")


def tokenize_to_file(texts: Iterable[str], tokenizer, out: Path, batch: int = 256) -> int:
    """Encode `texts` into one flat uint16 file, each as <|bos|> text <|eos|>; returns the token count."""
    start, eos, n = document_start_ids(tokenizer), tokenizer.eos_token_id, 0
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        chunk: list[str] = []

        def flush() -> int:
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*start, *doc, eos)), dtype=TOKEN_DTYPE)
            flat.tofile(fh)
            return len(flat)

        for text in texts:
            chunk.append(text)
            if len(chunk) == batch:
                n += flush()
                chunk = []
        if chunk:
            n += flush()
    return n


class PackedTokens:
    """Fixed-length sequences cut from a memory-mapped token file, in a seeded order per epoch.

    Sample k of the run is sequence perm(epoch)[k % n] with epoch = k // n: the data position is
    just k, so resuming needs no saved iterator state.
    """

    def __init__(self, path: Path, seq_len: int, seed: int = 0):
        self.tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        self.seq_len, self.seed = seq_len, seed
        self.n = (len(self.tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}

    def sequence(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def sample(self, k: int) -> np.ndarray:
        epoch, j = divmod(k, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self.sequence(int(self._perms[epoch][j]))

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (size, seq_len)."""
        seqs = torch.from_numpy(np.stack([self.sample(first + b) for b in range(size)]))
        return seqs[:, :-1], seqs[:, 1:]


def unigram_bpb(train_tokens: Path, val_tokens: Path, vocab: int, token_bytes: list[int]) -> float:
    """Bits per byte of a unigram model (add-one smoothed train frequencies) on the validation
    tokens: the floor any trained model must beat."""
    counts = np.bincount(np.memmap(train_tokens, dtype=TOKEN_DTYPE, mode="r"), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.memmap(val_tokens, dtype=TOKEN_DTYPE, mode="r")
    return bits_per_byte(*text_nats_and_bytes(-logp[val], val, np.asarray(token_bytes)))


def pack_tokens(clean_dir: Path, tokenizer_dir: Path, files: BaseModelFiles) -> dict:
    """Both splits of the clean corpus as token files in `files.tokens`, and the unigram baseline;
    writes and returns `files.token_stats` (which also names the tokenizer, for the training processes)."""
    from pipeline.data.clean import read_split  # datatrove: only this step reads the clean corpus

    tok = load_tokenizer(tokenizer_dir)
    counts = {split: tokenize_to_file(texts_of(read_split(clean_dir, split)), tok, files.token_file(split))
              for split in SPLITS}  # fmt: skip
    baseline = unigram_bpb(files.token_file("train"), files.token_file("validation"), len(tok), token_byte_lengths(tok))
    stats = {"tokenizer": str(Path(tokenizer_dir).resolve()), "tokens": counts, "unigram_bpb": baseline}
    write_json(files.token_stats, stats)
    return stats
