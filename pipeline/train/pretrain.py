"""base_model: pretrain a Llama-architecture model from scratch on the packed train split.

Reads top to bottom: token files on disk → model → optimizer and schedule → resume → the loop
(accumulate, clip, step, evaluate, checkpoint) → save_pretrained. The model is transformers'
LlamaForCausalLM (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention through SDPA), so
every later stage (peft, TRL, lm-eval, the GGUF converter) loads it as it is.

Resume is exact: a checkpoint holds the model, the optimizer, the scheduler, the step, and
every random generator; the data position is the step itself, because the order of the
packed sequences is a pure function of (seed, epoch). On CPU a resumed run ends with the same
weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import ModelShape, PretrainSettings
from pipeline.errors import KilnError
from pipeline.io import atomic_path, write_json

TOKEN_DTYPE = np.uint16  # 32k vocabulary fits; a quarter of int64's disk and memory


# ---------------------------------------------------------------- token files and packing


def tokenize_to_file(texts: Iterable[str], tokenizer, out: Path, batch: int = 256) -> int:
    """Encode `texts` (each followed by <|eos|>) into one flat uint16 file; returns the token count."""
    eos, n = tokenizer.eos_token_id, 0
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        chunk: list[str] = []

        def flush() -> int:
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=TOKEN_DTYPE)
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


# ---------------------------------------------------------------- model


def llama_config(shape: ModelShape, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.norm_eps,
        tie_word_embeddings=shape.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def count_parameters(shape: ModelShape, vocab_size: int = 32_000) -> int:
    """Exact parameter count of the model a shape builds, on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, vocab_size, 0, 1, 2))
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once


# ---------------------------------------------------------------- objective


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of `hidden @ weight.T`, without the whole (N, V) logits.

    Rows go through in chunks: logits of a chunk, log-sum-exp, loss, and at once the chunk's
    gradients (softmax minus one-hot) for the hidden states and the output weight. Next to
    autograd's path this skips the full log-softmax backward and two (N, V) zero-fills, and
    holds one (chunk, V) block instead of three (N, V) ones: faster on CPU, far smaller on GPU.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n, dtype = hidden.shape[0], hidden.dtype  # hidden: (N, d); weight: (V, d); targets: (N,)
        w = weight.to(dtype)  # under bf16 autocast the matmuls run in bf16, the softmax in fp32
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ w.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            probs = probs.div_(n).to(dtype)
            torch.mm(probs, w, out=grad_hidden[start : start + chunk])
            grad_weight.addmm_(probs.T.float(), h.float())  # accumulated in fp32 whatever the compute dtype
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


class CausalLMLoss(torch.nn.Module):
    """The training objective as one module (what DDP wraps): transformer body, then chunked CE
    against the output projection (the tied embedding when the shape ties them)."""

    def __init__(self, model, body, chunk: int = 256):
        super().__init__()
        self.model, self.body, self.chunk = model, body, chunk

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=x).last_hidden_state  # (B, T, d)
        return ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), self.model.lm_head.weight, y.flatten(), self.chunk)


# ---------------------------------------------------------------- training


@dataclass
class PretrainResult:
    steps: int
    tokens_seen: int
    final_train_loss: float
    val_loss: float
    val_bpb: float
    tokens_per_s: float
    parameters: int
    history: list = field(default_factory=list)  # one dict per step
    evals: list = field(default_factory=list)  # one dict per evaluation
    resumed_from: int = 0


def _device_and_precision(settings: PretrainSettings) -> tuple[torch.device, torch.dtype | None]:
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if settings.precision == "bf16" and not bf16_ok:
        raise KilnError("pretrain.precision is bf16 but this device has no bf16 support (use auto or fp32)")
    return device, torch.bfloat16 if settings.precision in ("auto", "bf16") and bf16_ok else None


def lr_at(step: int, s: PretrainSettings) -> float:
    """Linear warm-up to lr, then cosine down to lr * min_lr_ratio at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_key(shape: ModelShape, settings: PretrainSettings, vocab: int, train_tokens: Path) -> str:
    """What a checkpoint must match to be resumed: same shape, settings and training tokens."""
    digest = hashlib.sha256()
    with open(train_tokens, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    blob = json.dumps([asdict(shape), asdict(settings), vocab, digest.hexdigest()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model, data: PackedTokens, token_bytes: torch.Tensor, batches: int, micro_batch: int, device, dtype):
    """Mean validation loss (nats/token) and bits per byte over the first `batches` batches."""
    model.eval()
    nll = n_tok = n_bytes = 0.0
    n_batches = min(batches, max(1, data.n // micro_batch))
    for b in range(n_batches):
        x, y = data.batch(b * micro_batch, min(micro_batch, data.n))  # fixed, unshuffled-by-step
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=x).logits
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nll += losses.sum().item()
        n_tok += y.numel()
        n_bytes += token_bytes[y.flatten().cpu()].sum().item()
    model.train()
    return nll / n_tok, nll / math.log(2) / max(n_bytes, 1)


def pretrain(
    train_tokens: Path,
    val_tokens: Path,
    tokenizer,
    token_bytes: list[int],
    out_dir: Path,
    shape: ModelShape,
    settings: PretrainSettings,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """Train, checkpointing to `out_dir/checkpoints`, and save the model to `out_dir/model`.

    A checkpoint left by an interrupted run with the same settings and training tokens is resumed;
    one left by a finished run is reused as it is (the weights would come out the same).
    `stop_after` ends this call after that many steps of the run (as a kill would, right after
    a checkpoint): the next call resumes.
    """
    from transformers import LlamaForCausalLM

    out_dir, ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    s = settings
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    train = PackedTokens(train_tokens, s.seq_len, s.seed)
    val = PackedTokens(val_tokens, s.seq_len, s.seed)
    per_step = s.micro_batch * s.grad_accum * world
    if train.n < per_step:
        raise KilnError(
            f"the train split has {len(train.tokens):,} tokens, {train.n} sequences of pretrain.seq_len={s.seq_len}; "
            f"one step needs {per_step} (micro_batch * grad_accum): add data or lower them"
        )
    if val.n < 1:
        raise KilnError(f"the validation split has {len(val.tokens)} tokens: fewer than one sequence of {s.seq_len}")
    vocab = len(tokenizer)
    if max(int(train.tokens.max()), int(val.tokens.max())) >= vocab:
        raise KilnError(f"token ids reach past the tokenizer's {vocab} tokens: the token files and tokenizer differ")

    device, dtype = _device_and_precision(s)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _seed_everything(s.seed)
    config = llama_config(shape, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"  # fused attention kernels (flash on GPU)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
        fused=device.type == "cuda", foreach=device.type != "cuda",
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, s) / s.lr)

    key = _run_key(shape, s, vocab, Path(train_tokens))
    latest = ckpt_dir / "latest.pt"
    start, history, evals = 0, [], []
    if latest.exists():
        state = torch.load(latest, map_location=device, weights_only=False)
        if state["run_key"] == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start, history, evals = state["step"], state["history"], state["evals"]
    resumed_from = start

    body = model.model
    if s.compile == "on" or (s.compile == "auto" and device.type == "cuda"):
        body = torch.compile(body)  # the transformer body; the chunked loss stays eager
    step_loss = CausalLMLoss(model, body)
    if world > 1:
        step_loss = torch.nn.parallel.DistributedDataParallel(step_loss)
    tb = torch.tensor(token_bytes, dtype=torch.float64)
    tokens_per_step = per_step * s.seq_len

    def save_checkpoint(step: int) -> None:
        if rank != 0:
            return
        state = {
            "run_key": key, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history, "evals": evals,
        }  # fmt: skip
        with atomic_path(latest) as tmp:  # a kill during the write leaves the previous checkpoint
            torch.save(state, tmp)

    bar = tqdm(total=s.steps, initial=start, desc="base_model", unit="step", disable=not progress or rank != 0)
    model.train()
    t_run, steps_run = time.perf_counter(), 0
    for step in range(start, s.steps):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(s.grad_accum):
            first = (step * s.grad_accum + micro) * s.micro_batch * world + rank * s.micro_batch
            x, y = train.batch(first, s.micro_batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = step_loss(x, y) / s.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss_sum)  # one host sync per step, after the optimizer has run
        dt = time.perf_counter() - t0
        row = {
            "step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / dt,
        }  # fmt: skip
        history.append(row)
        steps_run += 1
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            val_loss, val_bpb = evaluate(model, val, tb, s.eval_batches, s.micro_batch, device, dtype)
            evals.append({"step": step + 1, "val_loss": val_loss, "val_bpb": val_bpb})
            row.update(val_loss=val_loss, val_bpb=val_bpb)
        if on_step:
            on_step(row)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps:
            save_checkpoint(step + 1)
        if stop_after is not None and step + 1 >= stop_after and step + 1 < s.steps:
            save_checkpoint(step + 1)
            bar.close()
            return PretrainResult(step + 1, 0, loss_value, float("nan"), float("nan"), 0.0, n_params, history, evals)
    bar.close()
    elapsed = time.perf_counter() - t_run

    if rank == 0:
        with atomic_path(out_dir / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        write_json(out_dir / "metrics.json", {"history": history, "evals": evals})
    if world > 1:
        torch.distributed.destroy_process_group()
    last = evals[-1]
    return PretrainResult(
        steps=s.steps,
        tokens_seen=s.steps * tokens_per_step,
        final_train_loss=history[-1]["loss"],
        val_loss=last["val_loss"],
        val_bpb=last["val_bpb"],
        tokens_per_s=steps_run * tokens_per_step / elapsed if steps_run else 0.0,
        parameters=n_params,
        history=history,
        evals=evals,
        resumed_from=resumed_from,
    )


def unigram_bpb(train_tokens: Path, val_tokens: Path, vocab: int, token_bytes: list[int]) -> float:
    """Bits per byte of a unigram model (add-one smoothed train frequencies) on the validation
    tokens: the floor any trained model must beat."""
    counts = np.bincount(np.memmap(train_tokens, dtype=TOKEN_DTYPE, mode="r"), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.memmap(val_tokens, dtype=TOKEN_DTYPE, mode="r")
    nll = -logp[val].sum()
    return float(nll / math.log(2) / max(np.asarray(token_bytes)[val].sum(), 1))
