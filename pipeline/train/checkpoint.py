"""Exact resume for pretraining: a checkpoint holds the model, the optimizer, the scheduler, the
step, the logs so far and every random generator, keyed to the run it belongs to.

The data position is the step itself (see `PackedTokens`), so on CPU a resumed run ends with the
same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelShape, PretrainSettings
from pipeline.io import atomic_path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # generator states are CPU byte tensors, whatever device the checkpoint was loaded onto
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def run_key(shape: ModelShape, settings: PretrainSettings, vocab: int, train_tokens: Path, dtype) -> str:
    """What a checkpoint must match to be resumed: same shape, settings, compute dtype (what
    `auto` chose) and training tokens."""
    digest = hashlib.sha256()
    with open(train_tokens, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    blob = json.dumps([asdict(shape), asdict(settings), vocab, digest.hexdigest(), str(dtype)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Checkpoints:
    """One checkpoint file of a run (`BaseModelFiles.checkpoint`), written by rank 0 under a
    temporary name, keyed to the run. `t` is the run's `Training` (pipeline/train/pretrain.py)."""

    path: Path
    key: str

    def save(self, t, step: int, history: list, evals: list) -> None:
        if not t.dist.main:
            return
        state = {
            "run_key": self.key, "step": step, "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "rng": rng_state(), "history": history, "evals": evals,
        }  # fmt: skip
        with atomic_path(self.path) as tmp:  # a kill during the write leaves the previous checkpoint
            torch.save(state, tmp)

    def resume(self, t) -> tuple[int, list, list]:
        """(step, history, evals) of a matching checkpoint, loaded into `t`; (0, [], []) without one."""
        if not self.path.exists():
            return 0, [], []
        state = torch.load(self.path, map_location=t.device, weights_only=False)
        if state["run_key"] != self.key:
            return 0, [], []
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["step"], state["history"], state["evals"]
