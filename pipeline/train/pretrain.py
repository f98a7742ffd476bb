"""base_model's training: pretrain a Llama-architecture model from scratch on packed token files.

Reads top to bottom: model → `build_training` (model, loss, optimizer, schedule on this
process's device) → `train_step` (one optimizer step over the micro-batches) → `fit` (the loop:
steps, evaluation, checkpoints) → `pretrain` (checks, build, resume, fit, save). The token files
come first (pipeline/train/pack.py); the stage around it, and torchrun's entry when the profile
asks for several devices, are in pipeline/train/launch.py. The model is transformers'
LlamaForCausalLM (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention through SDPA), so
every later stage (peft, TRL, lm-eval, the GGUF converter) loads it as it is.

Resume is exact (pipeline/train/checkpoint.py): a checkpoint holds the model, the optimizer, the
scheduler, the step, and every random generator; the data position is the step itself, because
the order of the packed sequences is a pure function of (seed, epoch).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import logs
from pipeline.config import ModelShape, PretrainSettings
from pipeline.errors import KilnError
from pipeline.io import atomic_path, write_json
from pipeline.layout import BaseModelFiles
from pipeline.train.checkpoint import Checkpoints, run_key
from pipeline.train.device import bf16_native
from pipeline.train.distributed import Distributed
from pipeline.train.loss import CausalLMLoss, linear_cross_entropy
from pipeline.train.pack import TOKEN_DTYPE as TOKEN_DTYPE  # re-exported: the token files' readers import them here
from pipeline.train.pack import PackedTokens as PackedTokens
from pipeline.train.pack import tokenize_to_file as tokenize_to_file
from pipeline.train.pack import unigram_bpb as unigram_bpb
from pipeline.train.throughput import flops_per_token, matmul_parameters, mfu, peak_flops, steady_tokens_per_s
from pipeline.train.tokenizer import bits_per_byte, set_stop_tokens, text_nats_and_bytes

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
    tokens_per_s: float  # all devices together; steady state: median step, without compile, evaluation or checkpoint
    parameters: int
    mfu: float | None = None  # per device: share of one device's peak bf16 FLOP/s; None off the peak table
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
        """Over all processes."""
        s = self.settings
        return s.micro_batch * s.grad_accum * self.dist.world * s.seq_len

    def mfu(self, tokens_per_s: float) -> float | None:
        """Per-device MFU of the whole run's `tokens_per_s` (each of the world's devices did a share)."""
        return mfu(tokens_per_s, self.flops_per_token, self.peak_flops, devices=self.dist.world)


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
        flops_per_token(
            matmul_parameters(n_params, config.vocab_size, shape.hidden_size, shape.tie_embeddings),
            shape.num_layers, shape.hidden_size, s.seq_len,
        ),
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
        share = t.mfu(steady)
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
    """Train, checkpointing and saving the model into the run folder `out_dir` (`BaseModelFiles`).

    A checkpoint left by an interrupted run with the same settings and training tokens is resumed;
    one left by a finished run is reused as it is (the weights would come out the same).
    `stop_after` ends this call after that many steps of the run (as a kill would, right after
    a checkpoint): the next call resumes. Under torchrun every process calls this; rank 0 writes.
    """
    s, files, dist = settings, BaseModelFiles(Path(out_dir)), Distributed.from_env()
    train, val = PackedTokens(train_tokens, s.seq_len, s.seed), PackedTokens(val_tokens, s.seq_len, s.seed)
    vocab = len(tokenizer)
    _check_data(train, val, s, dist.world, vocab)
    config = llama_config(
        shape, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, context=s.seq_len
    )
    random.seed(s.seed)
    np.random.seed(s.seed)
    t = build_training(config, shape, s, dist)
    key = dist.share(run_key(shape, s, vocab, Path(train_tokens), t.dtype) if dist.main else None)
    ckpt = Checkpoints(files.checkpoint, key)
    start, history, evals = ckpt.resume(t)
    log = fit(t, train, val, torch.tensor(token_bytes, dtype=torch.float64), ckpt, start, FitLog(history, evals),
              progress, stop_after, on_step)  # fmt: skip
    tokens_per_s = steady_tokens_per_s(log.step_seconds, t.tokens_per_step)
    share = t.mfu(tokens_per_s)
    if log.stopped_early:
        return PretrainResult(
            steps=len(log.history), tokens_seen=0, final_train_loss=log.history[-1]["loss"], val_loss=float("nan"),
            val_bpb=float("nan"), tokens_per_s=tokens_per_s, parameters=t.parameters, mfu=share, loss=t.loss,
            history=log.history, evals=log.evals, resumed_from=start,
        )  # fmt: skip
    if dist.main:
        t.model.config._attn_implementation = "sdpa"  # what later stages load it with
        set_stop_tokens(t.model, tokenizer)
        with atomic_path(files.model) as tmp:
            t.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        write_json(files.metrics, {"history": log.history, "evals": log.evals, "context_length": s.seq_len})
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
