"""Pretraining throughput: kiln's training loop against a minimal plain-PyTorch loop.

    python benchmarks/pretrain_throughput.py [--profile tiny] [--steps 20] [--rounds 2]

Both loops train the profile's model (same initial weights, same packed batches from the tiny
corpus, same sequence length and micro-batch, gradient clipping in both) in this one process,
alternating rounds so that machine noise falls on both. Each reports the median tokens/s of its
steps after the first two (warm-up). The reference is what a minimal script writes:
`torch.optim.AdamW(model.parameters(), lr)` with its defaults, a forward, cross-entropy, backward,
clip, step. The ratio kiln / reference must be >= 1.0.

kiln's loop runs twice per round: with the profile's precision (auto: bf16 autocast where the
device multiplies bf16 natively, as a CPU with AVX512-BF16 does) and forced to fp32, the
reference's precision. Both print their held-out loss after the last step: the faster one must
not learn worse.

`--weight-grad` instead compares the chunked loss's output-weight gradient multiplied in the
compute dtype (kiln's) with the earlier fp32 copies of both operands, in one run: the loss alone
in bf16 at the profile's shape (forward and backward, tokens/s), and kiln's loop both ways at the
profile's precision (tokens/s and the loss curve, step by step).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import load_profile
from pipeline.train.device import bf16_native
from pipeline.train.pretrain import PackedTokens, llama_config, pretrain, tokenize_to_file
from pipeline.train.tokenizer import load_tokenizer, texts_of, token_byte_lengths

ROOT = Path(__file__).resolve().parent.parent


def _prepare(profile, tmp: Path):
    """Token files and tokenizer: the pipeline's own if `make run` made them, else built here."""
    work = ROOT / "data" / "work" / profile.name
    tok_dir, tokens = work / "tokenizer" / "tokenizer", work / "base_model" / "tokens"
    if (tok_dir / "tokenizer.json").exists() and (tokens / "train.bin").exists():
        return load_tokenizer(tok_dir), tokens / "train.bin", tokens / "validation.bin"
    from pipeline.data.clean import clean_corpus, read_split
    from pipeline.data.ingest import build_raw_corpus
    from pipeline.train.tokenizer import build_tokenizer

    c = profile.corpus
    build_raw_corpus(c.sources, tmp / "raw.jsonl", c.max_bytes, c.code_share, progress=False)
    clean_corpus([tmp / "raw.jsonl"], tmp / "clean_corpus", profile.clean, progress=False)
    build_tokenizer(tmp / "clean_corpus" / "clean", tmp / "tok", profile)
    tok = load_tokenizer(tmp / "tok" / "tokenizer")
    for split, name in (("train", "train.bin"), ("validation", "validation.bin")):
        tokenize_to_file(texts_of(read_split(tmp / "clean_corpus" / "clean", split)), tok, tmp / name)
    return tok, tmp / "train.bin", tmp / "validation.bin"


def reference_loop(tok, train: Path, profile, steps: int) -> list[float]:
    """The minimal loop: tokens/s of each step."""
    from transformers import LlamaForCausalLM

    s = profile.pretrain
    torch.manual_seed(s.seed)
    cfg = llama_config(profile.model, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, s.seq_len)
    model = LlamaForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    data = PackedTokens(train, s.seq_len, s.seed)
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = data.batch(step * s.micro_batch, s.micro_batch)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        rates.append(s.micro_batch * s.seq_len / (time.perf_counter() - t0))
    return rates


def kiln_loop(tok, train: Path, val: Path, profile, steps: int, out: Path, precision: str) -> tuple[list[float], float]:
    """kiln's loop: tokens/s of each step, and the held-out loss after the last."""
    settings = dataclasses.replace(
        profile.pretrain, steps=steps, grad_accum=1, warmup_steps=1, eval_every=steps, checkpoint_every=steps,
        precision=precision,
    )  # fmt: skip
    result = pretrain(train, val, tok, token_byte_lengths(tok), out, profile.model, settings, progress=False)
    return [h["tokens_per_s"] for h in result.history], result.val_loss


def _fp32_weight_grad(probs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The earlier weight gradient: fp32 copies of both operands, whatever the compute dtype."""
    return probs.T.float() @ h.float()


def _loss_rates(profile, vocab: int, repeats: int = 5) -> dict[str, float]:
    """Tokens/s of the chunked loss alone (forward and backward) with bf16 hidden states, each way."""
    from pipeline.train import loss

    s, d = profile.pretrain, profile.model.hidden_size
    n = s.micro_batch * s.seq_len
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    rates, kiln_grad = {}, loss.weight_grad
    for name, fn in (("compute dtype", kiln_grad), ("fp32 copies", _fp32_weight_grad)) * 2:  # alternated
        loss.weight_grad = fn
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss.ChunkedLinearCrossEntropy.apply(hidden.bfloat16(), weight, targets, 256).backward()
            times.append(time.perf_counter() - t0)
        rates.setdefault(name, []).extend(times)
    loss.weight_grad = kiln_grad
    return {name: n / statistics.median(times) for name, times in rates.items()}


def weight_grad_comparison(profile, steps: int) -> None:
    from pipeline.train import loss

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok, train, val = _prepare(profile, tmp)
        curves, rates, kiln_grad = {}, {}, loss.weight_grad
        for name, fn in (("compute dtype", kiln_grad), ("fp32 copies", _fp32_weight_grad)):
            loss.weight_grad = fn
            settings = dataclasses.replace(
                profile.pretrain, steps=steps, warmup_steps=2, eval_every=steps, checkpoint_every=steps
            )
            result = pretrain(train, val, tok, token_byte_lengths(tok), tmp / name.replace(" ", "_"), profile.model,
                              settings, progress=False)  # fmt: skip
            curves[name] = [h["loss"] for h in result.history]
            rates[name] = (statistics.median(h["tokens_per_s"] for h in result.history[2:]), result.val_loss)
        loss.weight_grad = kiln_grad
        # bf16 without native support is emulated (minutes per step at tiny's shape): nothing to compare
        loss_only = _loss_rates(profile, len(tok)) if bf16_native(torch.device("cpu")) else None
    dtype = _dtype(profile.pretrain)
    print(f"profile {profile.name}: {steps} steps of kiln's loop each way at its precision ({dtype}), device cpu")
    for name in curves:
        alone = f"loss alone in bf16 {loss_only[name]:8.0f} tokens/s" if loss_only else "no native bf16 here"
        print(f"  weight gradient from {name:<14} {rates[name][0]:8.0f} tokens/s (median), held-out loss "
              f"{rates[name][1]:.4f}, {alone}")  # fmt: skip
    gap = max(abs(a - b) for a, b in zip(curves["compute dtype"], curves["fp32 copies"], strict=True))
    print(f"  largest step-by-step loss difference: {gap:.2e}")
    print(f"  loss curve (compute dtype): {' '.join(f'{x:.3f}' for x in curves['compute dtype'])}")
    print(f"  loss curve (fp32 copies):   {' '.join(f'{x:.3f}' for x in curves['fp32 copies'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--weight-grad", action="store_true", help="compare the loss's weight gradient both ways")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    if args.weight_grad:
        weight_grad_comparison(profile, args.steps)
        return
    s = profile.pretrain
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok, train, val = _prepare(profile, tmp)
        ref, kiln, fp32, val_loss = [], [], [], {}
        for r in range(args.rounds):
            ref += reference_loop(tok, train, profile, args.steps)[2:]
            rates, val_loss["kiln"] = kiln_loop(tok, train, val, profile, args.steps, tmp / f"run{r}", s.precision)
            kiln += rates[2:]
            rates, val_loss["fp32"] = kiln_loop(tok, train, val, profile, args.steps, tmp / f"fp32-{r}", "fp32")
            fp32 += rates[2:]
    print(
        f"profile {profile.name}: {s.micro_batch} x {s.seq_len} tokens per step, {args.steps} steps x {args.rounds} "
        f"rounds, {torch.get_num_threads()} threads, device cpu"
    )
    r, k, f = statistics.median(ref), statistics.median(kiln), statistics.median(fp32)
    print(f"reference loop (fp32)         {r:8.0f} tokens/s (median)")
    label = f"kiln loop ({s.precision}: {_dtype(s)})"
    print(f"{label:<30}{k:8.0f} tokens/s (median), held-out loss {val_loss['kiln']:.4f}")
    print(f"kiln loop (fp32)              {f:8.0f} tokens/s (median), held-out loss {val_loss['fp32']:.4f}")
    print(f"ratio kiln/reference: {k / r:.2f}; kiln {s.precision}/fp32: {k / f:.2f}")


def _dtype(settings) -> str:
    from pipeline.train.pretrain import autocast_dtype

    return "bf16" if autocast_dtype(settings, torch.device("cpu")) == torch.bfloat16 else "fp32"


if __name__ == "__main__":
    main()
