"""Training speed as users compare it: steady-state tokens/s and model FLOPs utilization (MFU).

Steady state is the median step time over the steps after the first few of a call, so the
compile, the first CUDA allocations, evaluations and checkpoints (timed apart) stay out of it.
MFU is per device: tokens/s of the whole run x FLOPs per token / (devices x one device's peak
dense bf16 FLOP/s), with the usual count of FLOPs per token for a decoder: 6N for the matmuls of N
parameters (forward and backward) plus 12 L d T for attention scores and values (L layers, width
d, sequence T; causal masking not discounted). N leaves out the input embedding when it is not
tied to the output layer: a lookup multiplies nothing. A device missing from the table gets no
MFU rather than a guessed one.
"""

from __future__ import annotations

import statistics

WARMUP_STEPS = 3  # steps of each call left out of the steady state (compile, allocator, autotuning)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' data sheets; the first
# name that occurs in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str) -> float | None:
    """The device's peak bf16 FLOP/s, or None for a device (or a CPU) the table does not know."""
    for name, flops in PEAK_BF16_FLOPS:
        if name in device_name:
            return flops
    return None


def matmul_parameters(parameters: int, vocab_size: int, hidden: int, tied: bool) -> int:
    """The N of 6N: all parameters but an untied input embedding (vocab x hidden); a tied one is
    the output layer's weight, which is a matmul and stays."""
    return parameters if tied else parameters - vocab_size * hidden


def flops_per_token(parameters: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 L d T."""
    return 6 * parameters + 12 * layers * hidden * seq_len


def steady_tokens_per_s(step_seconds: list[float], tokens_per_step: int, warmup: int = WARMUP_STEPS) -> float:
    """Tokens per step over the median step time, the first `warmup` steps left out (all kept
    when there are no more than that)."""
    if not step_seconds:
        return 0.0
    steady = step_seconds[warmup:] or step_seconds
    return tokens_per_step / statistics.median(steady)


def mfu(tokens_per_s: float, flops_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved FLOP/s per device as a share of one device's peak, or None without a known peak.
    `tokens_per_s` is the whole run's, over all `devices` (data parallel: each does its share)."""
    return tokens_per_s * flops_token / (peak * devices) if peak else None
