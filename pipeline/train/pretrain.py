"""base_model: pretrain a Llama-architecture model from scratch on the packed train split.

Reads top to bottom: token files and packing → model → `build_training` (model, loss,
optimizer, schedule on this process's device) → `train_step` (one optimizer step over the
micro-batches) → checkpoints → `fit` (the loop: steps, evaluation, checkpoints) → `pretrain`
(checks, build, resume, fit, save) → `build_base_model` (token files, then pretrain; under
torchrun when the profile asks for several devices). The model is transformers'
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
import random
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import logs
from pipeline.config import ModelShape, PretrainSettings, Profile
from pipeline.errors import KilnError
from pipeline.io import atomic_path, read_json, write_json
from pipeline.train.device import bf16_native
from pipeline.train.distributed import Distributed, launched_by_torchrun, torchrun_command
from pipeline.train.loss import CausalLMLoss, linear_cross_entropy
from pipeline.train.throughput import flops_per_token, mfu, peak_flops, steady_tokens_per_s
from pipeline.train.tokenizer import (
    bits_per_byte,
    document_start_ids,
    load_tokenizer,
    set_stop_tokens,
    text_nats_and_bytes,
    texts_of,
    token_byte_lengths,
)

TOKEN_DTYPE = np.uint16  # 32k vocabulary fits; a quarter of int64's disk and memory


# ---------------------------------------------------------------- token files and packing


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


# ---------------------------------------------------------------- model


def llama_config(shape: ModelShape, vocab_size: int, bos: int, eos: int, pad: int, context: int):
    """The HF config of `shape`, declaring `context` positions: the length it trains at, so that
    every reader of max_position_embeddings (evaluation, GGUF export, serving) stays within it."""
    from transformers import LlamaConfig

    if shape.max_position not in (None, context):
        raise KilnError(f"model.max_position {shape.max_position} is not the trained context {context}")

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=context,
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
        # the context sizes no weight (RoPE has none), so any will do
        model = LlamaForCausalLM(llama_config(shape, vocab_size, 0, 1, 2, context=shape.max_position or 1))
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal SDPA for packed training sequences: no mask tensor, grouped-query heads as they are.

    transformers builds a full (T, T) mask while compiling (it can only drop it in eager mode),
    which keeps SDPA off its flash kernel and repeats the key/value heads; training batches have
    no padding, so `is_causal` says all of it. Masked or one-token inputs go to the stock path.
    """
    if attention_mask is not None or query.shape[2] == 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def build_model(config, device: torch.device):
    """LlamaForCausalLM on `device`, attention through `causal_attention` (the saved config says sdpa)."""
    from transformers import AttentionInterface, LlamaForCausalLM

    AttentionInterface.register("kiln_causal", causal_attention)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "kiln_causal"
    return model


# ---------------------------------------------------------------- training state


@dataclass
class PretrainResult:
    steps: int
    tokens_seen: int
    final_train_loss: float
    val_loss: float
    val_bpb: float
    tokens_per_s: float  # steady state: median step, without compile, evaluation or checkpoint time
    parameters: int
    mfu: float | None = None  # share of the device's peak bf16 FLOP/s; None off the peak table
    loss: str = "chunked"  # which linear cross-entropy ran
    history: list = field(default_factory=list)  # one dict per step
    evals: list = field(default_factory=list)  # one dict per evaluation
    resumed_from: int = 0


@dataclass
class Training:
    """Everything a step needs, built once by `build_training`."""

    settings: PretrainSettings
    model: torch.nn.Module  # the LlamaForCausalLM that is saved
    objective: torch.nn.Module  # CausalLMLoss, wrapped in DDP on several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None is fp32
    dist: Distributed
    loss: str
    parameters: int
    flops_per_token: float
    peak_flops: float | None

    @property
    def tokens_per_step(self) -> int:
        s = self.settings
        return s.micro_batch * s.grad_accum * self.dist.world * s.seq_len


def autocast_dtype(settings: PretrainSettings, device: torch.device) -> torch.dtype | None:
    bf16_ok = bf16_native(device)
    if settings.precision == "bf16" and not bf16_ok:
        raise KilnError(f"pretrain.precision is bf16 but this {device.type} has no native bf16 (use auto or fp32)")
    return torch.bfloat16 if settings.precision in ("auto", "bf16") and bf16_ok else None


def lr_at(step: int, s: PretrainSettings) -> float:
    """The learning rate of step `step` (0-based): linear warm-up to lr, then cosine down to
    lr * min_lr_ratio at the last step that runs, `steps - 1`."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - 1 - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_training(config, shape: ModelShape, settings: PretrainSettings, dist: Distributed) -> Training:
    """Model, loss, optimizer and schedule on this process's device, seeded by the settings."""
    s = settings
    device = dist.device()
    dtype = autocast_dtype(s, device)
    dist.start(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what fp32 matmuls remain (optimizer-side, eval) use TF32
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(s.seed)
    model = build_model(config, device)
    if dtype is not None:
        # the residual stream in the compute dtype, as the attention and MLP outputs already are:
        # the norms, RoPE and SwiGLU then move half the bytes (the norms still reduce in fp32)
        model.model.embed_tokens.register_forward_hook(lambda _module, _inputs, out: out.to(dtype))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
        fused=device.type == "cuda", foreach=device.type != "cuda",
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, s) / s.lr)
    body = model.model
    if s.compile == "on" or (s.compile == "auto" and device.type == "cuda"):
        body = torch.compile(body)  # the transformer body; the loss runs its own kernels
    loss_name, loss_fn = linear_cross_entropy(device.type, dtype)
    objective = CausalLMLoss(model, body, loss_fn)
    if dist.world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Training(
        s, model, objective, optimizer, scheduler, device, dtype, dist, loss_name, n_params,
        flops_per_token(n_params, shape.num_layers, shape.hidden_size, s.seq_len),
        peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
    )  # fmt: skip


def train_step(t: Training, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches: gradients synchronized across ranks on
    the last one only, clipped, applied. Returns (the mean loss over all ranks, the gradient norm)."""
    loss_sum = torch.zeros((), device=t.device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
        with t.dist.no_sync(t.objective, last_micro_batch=i == len(micro_batches) - 1):
            with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype is not None):
                loss = t.objective(x, y) / len(micro_batches)
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.settings.grad_clip)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return float(t.dist.mean(loss_sum)), float(grad_norm)  # one host sync per step, after the optimizer


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # generator states are CPU byte tensors, whatever device the checkpoint was loaded onto
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _run_key(shape: ModelShape, settings: PretrainSettings, vocab: int, train_tokens: Path, dtype) -> str:
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
    """`latest.pt` under a run's folder: the weights, optimizer, schedule, step, logs and every
    random generator, written by rank 0 under a temporary name, keyed to the run."""

    path: Path
    key: str

    def save(self, t: Training, step: int, history: list, evals: list) -> None:
        if not t.dist.main:
            return
        state = {
            "run_key": self.key, "step": step, "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "rng": _rng_state(), "history": history, "evals": evals,
        }  # fmt: skip
        with atomic_path(self.path) as tmp:  # a kill during the write leaves the previous checkpoint
            torch.save(state, tmp)

    def resume(self, t: Training) -> tuple[int, list, list]:
        """(step, history, evals) of a matching checkpoint, loaded into `t`; (0, [], []) without one."""
        if not self.path.exists():
            return 0, [], []
        state = torch.load(self.path, map_location=t.device, weights_only=False)
        if state["run_key"] != self.key:
            return 0, [], []
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return state["step"], state["history"], state["evals"]


# ---------------------------------------------------------------- the loop


@torch.no_grad()
def evaluate(model, data: PackedTokens, token_bytes: torch.Tensor, batches: int, micro_batch: int, device, dtype):
    """Mean validation loss (nats/token, every target) and bits per byte (text targets only, see
    `text_nats_and_bytes`) over the first `batches` batches."""
    model.eval()
    nll = n_tok = text_nll = n_bytes = 0.0
    n_batches = min(batches, max(1, data.n // micro_batch))
    for b in range(n_batches):
        x, y = data.batch(b * micro_batch, min(micro_batch, data.n))  # fixed, unshuffled-by-step
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=x, use_cache=False).logits
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").cpu()
        nll += losses.sum().item()
        n_tok += y.numel()
        nats, nbytes = text_nats_and_bytes(losses, y.flatten().cpu(), token_bytes)
        text_nll, n_bytes = text_nll + nats, n_bytes + nbytes
    model.train()
    return nll / n_tok, bits_per_byte(text_nll, n_bytes)


@dataclass
class FitLog:
    """What `fit` leaves: the rows of every step and evaluation, and this call's step times."""

    history: list
    evals: list
    step_seconds: list = field(default_factory=list)
    stopped_early: bool = False


events = logs.get("training")  # one line per step (debug) and per evaluation, for log collectors


def fit(
    t: Training, train: PackedTokens, val: PackedTokens, token_bytes: torch.Tensor, ckpt: Checkpoints,
    start: int, log: FitLog, progress: bool, stop_after: int | None, on_step: Callable[[dict], None] | None,
) -> FitLog:  # fmt: skip
    """Steps `start`..settings.steps: train, log, evaluate and checkpoint on schedule."""
    s, d = t.settings, t.dist
    quiet = not progress or not d.main or logs.json_lines()
    bar = tqdm(total=s.steps, initial=start, desc="base_model", unit="step", disable=quiet)
    t.model.train()
    for step in range(start, s.steps):
        t0 = time.perf_counter()
        batches = [
            train.batch(((step * s.grad_accum + micro) * d.world + d.rank) * s.micro_batch, s.micro_batch)
            for micro in range(s.grad_accum)
        ]
        lr = t.optimizer.param_groups[0]["lr"]  # this step's: train_step advances the schedule to the next
        loss, grad_norm = train_step(t, batches)
        log.step_seconds.append(time.perf_counter() - t0)
        steady = steady_tokens_per_s(log.step_seconds, t.tokens_per_step)
        row = {
            "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": t.tokens_per_step / log.step_seconds[-1],
        }  # fmt: skip
        log.history.append(row)
        if d.main:
            events.debug("step", **row, steady_tokens_per_s=steady)
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            val_loss, val_bpb = evaluate(t.model, val, token_bytes, s.eval_batches, s.micro_batch, t.device, t.dtype)
            log.evals.append({"step": step + 1, "val_loss": val_loss, "val_bpb": val_bpb})
            row.update(val_loss=val_loss, val_bpb=val_bpb)
            if d.main:
                events.info("evaluation", step=step + 1, val_loss=val_loss, val_bpb=val_bpb)
        if on_step:
            on_step(row)
        share = mfu(steady, t.flops_per_token, t.peak_flops)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{steady:.0f}", **({"mfu": f"{share:.1%}"} if share else {}))
        bar.update(1)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps:
            ckpt.save(t, step + 1, log.history, log.evals)
        if stop_after is not None and step + 1 >= stop_after and step + 1 < s.steps:
            ckpt.save(t, step + 1, log.history, log.evals)
            log.stopped_early = True
            break
    bar.close()
    return log


def _check_data(train: PackedTokens, val: PackedTokens, s: PretrainSettings, world: int, vocab: int) -> None:
    per_step = s.micro_batch * s.grad_accum * world
    if train.n < per_step:
        raise KilnError(
            f"the train split has {len(train.tokens):,} tokens, {train.n} sequences of pretrain.seq_len={s.seq_len}; "
            f"one step needs {per_step} (micro_batch * grad_accum * devices): add data or lower them"
        )
    if val.n < 1:
        raise KilnError(f"the validation split has {len(val.tokens)} tokens: fewer than one sequence of {s.seq_len}")
    if max(int(train.tokens.max()), int(val.tokens.max())) >= vocab:
        raise KilnError(f"token ids reach past the tokenizer's {vocab} tokens: the token files and tokenizer differ")


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
    a checkpoint): the next call resumes. Under torchrun every process calls this; rank 0 writes.
    """
    s, out_dir, dist = settings, Path(out_dir), Distributed.from_env()
    train, val = PackedTokens(train_tokens, s.seq_len, s.seed), PackedTokens(val_tokens, s.seq_len, s.seed)
    vocab = len(tokenizer)
    _check_data(train, val, s, dist.world, vocab)
    config = llama_config(
        shape, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, context=s.seq_len
    )
    random.seed(s.seed)
    np.random.seed(s.seed)
    t = build_training(config, shape, s, dist)
    key = dist.share(_run_key(shape, s, vocab, Path(train_tokens), t.dtype) if dist.main else None)
    ckpt = Checkpoints(out_dir / "checkpoints" / "latest.pt", key)
    start, history, evals = ckpt.resume(t)
    log = fit(t, train, val, torch.tensor(token_bytes, dtype=torch.float64), ckpt, start, FitLog(history, evals),
              progress, stop_after, on_step)  # fmt: skip
    tokens_per_s = steady_tokens_per_s(log.step_seconds, t.tokens_per_step)
    share = mfu(tokens_per_s, t.flops_per_token, t.peak_flops)
    if log.stopped_early:
        return PretrainResult(
            steps=len(log.history), tokens_seen=0, final_train_loss=log.history[-1]["loss"], val_loss=float("nan"),
            val_bpb=float("nan"), tokens_per_s=tokens_per_s, parameters=t.parameters, mfu=share, loss=t.loss,
            history=log.history, evals=log.evals, resumed_from=start,
        )  # fmt: skip
    if dist.main:
        t.model.config._attn_implementation = "sdpa"  # what later stages load it with
        set_stop_tokens(t.model, tokenizer)
        with atomic_path(out_dir / "model") as tmp:
            t.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        write_json(out_dir / "metrics.json", {"history": log.history, "evals": log.evals, "context_length": s.seq_len})
    dist.barrier()
    dist.stop()
    return PretrainResult(
        steps=s.steps,
        tokens_seen=s.steps * t.tokens_per_step,
        final_train_loss=log.history[-1]["loss"],
        val_loss=log.evals[-1]["val_loss"],
        val_bpb=log.evals[-1]["val_bpb"],
        tokens_per_s=tokens_per_s,
        parameters=t.parameters,
        mfu=share,
        loss=t.loss,
        history=log.history,
        evals=log.evals,
        resumed_from=start,
    )


def unigram_bpb(train_tokens: Path, val_tokens: Path, vocab: int, token_bytes: list[int]) -> float:
    """Bits per byte of a unigram model (add-one smoothed train frequencies) on the validation
    tokens: the floor any trained model must beat."""
    counts = np.bincount(np.memmap(train_tokens, dtype=TOKEN_DTYPE, mode="r"), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.memmap(val_tokens, dtype=TOKEN_DTYPE, mode="r")
    return bits_per_byte(*text_nats_and_bytes(-logp[val], val, np.asarray(token_bytes)))


def build_base_model(
    clean_dir: Path, tokenizer_dir: Path, out_dir: Path, profile: Profile, progress=True, on_step=None,
    profile_ref: str | None = None,
) -> tuple[PretrainResult, float]:  # fmt: skip
    """The base_model stage: packed token files of both splits, then pretrain; writes
    `out_dir/summary.json`. Returns (result, the unigram baseline's bits per byte).

    With `pretrain.devices` > 1 outside torchrun, this starts `kiln pretrain` under torchrun
    (one process per device, each reading the profile again from `profile_ref`, else as this
    process did: $KILN_PROFILE or the default) and
    reads the result back from the files rank 0 wrote.
    """
    s = profile.pretrain
    if s.devices > 1 and not launched_by_torchrun():
        args = ["pipeline.cli", "pretrain", "--clean", str(clean_dir), "--tokenizer", str(tokenizer_dir),
                "--output", str(out_dir)] + (["--profile", profile_ref] if profile_ref else [])  # fmt: skip
        done = subprocess.run(torchrun_command(s.devices, args), check=False)
        if done.returncode != 0:
            raise KilnError(f"pretraining on {s.devices} devices (pretrain.devices) failed: exit {done.returncode}")
        return _result_from_files(Path(out_dir))
    from pipeline.data.clean import read_split  # datatrove: not needed by pretrain() itself

    dist = Distributed.from_env()
    dist.start(dist.device())
    tok = load_tokenizer(tokenizer_dir)
    tokens = Path(out_dir) / "tokens"
    token_bytes = token_byte_lengths(tok)
    baseline = None
    if dist.main:  # token files and the baseline once; the other ranks wait, then read the files
        tokenize_to_file(texts_of(read_split(clean_dir, "train")), tok, tokens / "train.bin")
        tokenize_to_file(texts_of(read_split(clean_dir, "validation")), tok, tokens / "validation.bin")
        baseline = unigram_bpb(tokens / "train.bin", tokens / "validation.bin", len(tok), token_bytes)
    baseline = dist.share(baseline)
    result = pretrain(
        tokens / "train.bin", tokens / "validation.bin", tok, token_bytes, out_dir, profile.model, s,
        progress=progress, on_step=on_step,
    )  # fmt: skip
    if dist.main:
        write_json(
            Path(out_dir) / "summary.json",
            {
                "parameters": result.parameters,
                "parameters_budget": count_parameters(profile.model, len(tok)),
                "steps": result.steps,
                "final_train_loss": result.final_train_loss,
                "val_loss": result.val_loss,
                "val_bpb": result.val_bpb,
                "unigram_bpb": baseline,
                "tokens_seen": result.tokens_seen,
                "tokens_per_s": result.tokens_per_s,
                "mfu": result.mfu,
                "loss": result.loss,
                "devices": max(s.devices, 1),
                "context_length": s.seq_len,
                "resumed_from": result.resumed_from,
            },
        )
    return result, baseline


def _result_from_files(out_dir: Path) -> tuple[PretrainResult, float]:
    summary, metrics = read_json(out_dir / "summary.json"), read_json(out_dir / "metrics.json")
    result = PretrainResult(
        summary["steps"], summary["tokens_seen"], summary["final_train_loss"], summary["val_loss"], summary["val_bpb"],
        summary["tokens_per_s"], summary["parameters"], summary["mfu"], summary["loss"],
        metrics["history"], metrics["evals"], summary["resumed_from"],
    )  # fmt: skip
    return result, summary["unigram_bpb"]
