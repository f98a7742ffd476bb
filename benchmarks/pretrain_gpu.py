"""Pretraining on one CUDA GPU: kiln's training step against the loop a user writes in ten lines.

    python benchmarks/pretrain_gpu.py [--profile 300m] [--steps 24] [--rounds 2] [--micro-batch N] [--grad-accum N]
                                      [--kiln-micro-batch N]

Both train the profile's model (same shape, same initial weights, same random-token batches of
micro_batch x seq_len, grad_accum micro-batches per step, gradient clipping in both), alternating
rounds in this one process. The plain loop: transformers' LlamaForCausalLM with SDPA attention,
`torch.compile(model)`, bf16 autocast, `F.cross_entropy` on the full logits, fused AdamW. kiln's:
`build_training` + `train_step` from pipeline.train.pretrain, as `kiln pretrain` runs them.
Each reports steady-state tokens/s (median step after the first few), MFU (6N + 12 L d T FLOPs per
token against the device's peak from pipeline.train.throughput) and peak GPU memory.
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import time

import torch
import torch.nn.functional as F

from pipeline.config import load_profile
from pipeline.train.distributed import Distributed
from pipeline.train.pretrain import build_training, llama_config, train_step
from pipeline.train.throughput import WARMUP_STEPS, flops_per_token, mfu, peak_flops, steady_tokens_per_s

VOCAB = 32_000


def random_batches(steps: int, accum: int, micro: int, seq: int, seed: int) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        seqs = [torch.randint(0, VOCAB, (micro, seq + 1), generator=g) for _ in range(accum)]
        out.append([(s[:, :-1].contiguous().pin_memory(), s[:, 1:].contiguous().pin_memory()) for s in seqs])
    return out


def plain_loop(profile, data) -> list[float]:
    from transformers import LlamaForCausalLM

    s = profile.pretrain
    torch.manual_seed(s.seed)
    config = llama_config(profile.model, VOCAB, 1, 2, 0, profile.pretrain.seq_len)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, fused=True)
    step_model = torch.compile(model)
    times = []
    for micro_batches in data:
        t0 = time.perf_counter()
        total = torch.zeros((), device="cuda")
        for x, y in micro_batches:
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = step_model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = total.item()
        times.append(time.perf_counter() - t0)
    print(f"  plain: loss {last:.4f}")
    return times


def regroup(micro_batches: list[tuple], size: int) -> list[tuple]:
    """The same sequences of one step in micro-batches of `size`."""
    x, y = torch.cat([b[0] for b in micro_batches]), torch.cat([b[1] for b in micro_batches])
    return [(x[i : i + size].pin_memory(), y[i : i + size].pin_memory()) for i in range(0, len(x), size)]


def kiln_loop(profile, data, micro_batch: int | None = None) -> list[float]:
    s = profile.pretrain
    if micro_batch and micro_batch != s.micro_batch:
        data = [regroup(step, micro_batch) for step in data]
        s = dataclasses.replace(s, micro_batch=micro_batch, grad_accum=s.micro_batch * s.grad_accum // micro_batch)
    config = llama_config(profile.model, VOCAB, 1, 2, 0, profile.pretrain.seq_len)
    training = build_training(config, profile.model, s, Distributed())
    times, losses = [], []
    for micro_batches in data:
        t0 = time.perf_counter()
        losses.append(train_step(training, micro_batches)[0])  # ends with the step's one host sync
        times.append(time.perf_counter() - t0)
    print(f"  kiln: {training.loss} loss kernel, micro-batch {s.micro_batch} x {s.grad_accum}, loss {losses[-1]:.4f}")
    return times


def measure(loop, profile, data) -> tuple[list[float], float]:
    """Step times and peak allocated GiB of one fresh run of `loop`."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = loop(profile, data)
    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    return times, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="300m")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=None)
    ap.add_argument(
        "--kiln-micro-batch", type=int, default=None, help="kiln's micro-batch (same sequences per step, regrouped)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("pretrain_gpu: no CUDA device on this machine; nothing measured")
        return 0
    profile = load_profile(args.profile)
    s = profile.pretrain
    s = dataclasses.replace(
        s, micro_batch=args.micro_batch or s.micro_batch, grad_accum=args.grad_accum or s.grad_accum,
        steps=max(s.steps, args.steps + 1), warmup_steps=1, eval_every=10**9, checkpoint_every=10**9,
    )  # fmt: skip
    profile = dataclasses.replace(profile, pretrain=s)
    data = random_batches(args.steps, s.grad_accum, s.micro_batch, s.seq_len, s.seed)
    tokens_per_step = s.micro_batch * s.grad_accum * s.seq_len
    config = llama_config(profile.model, VOCAB, 1, 2, 0, profile.pretrain.seq_len)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    per_token = flops_per_token(n_params, profile.model.num_layers, profile.model.hidden_size, s.seq_len)
    peak = peak_flops(torch.cuda.get_device_name())

    results = {"plain": ([], 0.0), "kiln": ([], 0.0)}
    for r in range(args.rounds):
        kiln = functools.partial(kiln_loop, micro_batch=args.kiln_micro_batch)
        for name, loop in (("plain", plain_loop), ("kiln", kiln)):
            times, mem = measure(loop, profile, data)
            rate = steady_tokens_per_s(times, tokens_per_step)
            print(f"round {r + 1} {name}: {rate:,.0f} tokens/s, first step {times[0]:.1f} s, peak {mem:.1f} GiB")
            steady, old_mem = results[name]
            results[name] = (steady + times[WARMUP_STEPS:], max(old_mem, mem))

    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, profile {profile.name}: {n_params / 1e6:.1f}M "
        f"parameters, {s.micro_batch} x {s.seq_len} tokens x grad_accum {s.grad_accum}, {args.steps} steps x "
        f"{args.rounds} rounds, median of steps after the first {WARMUP_STEPS} of each round"
    )
    print(f"MFU: (6N + 12 L d T) = {per_token / 1e9:.3f} GFLOP/token against {peak and peak / 1e12:.0f} TFLOP/s")
    print(f"{'loop':<8}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    rates = {}
    for name, (times, mem) in results.items():
        rates[name] = steady_tokens_per_s(times, tokens_per_step, warmup=0)
        share = mfu(rates[name], per_token, peak)
        print(f"{name:<8}{rates[name]:>12,.0f}{(f'{share:.1%}' if share else 'n/a'):>8}{mem:>10.1f}")
    print(f"ratio kiln/plain: {rates['kiln'] / rates['plain']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
