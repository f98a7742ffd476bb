"""The pretraining objective: next-token cross-entropy of the output projection, never holding
the whole (tokens, vocabulary) logits.

Two implementations, picked by device: on CUDA, Liger-Kernel's fused linear cross-entropy
(Triton kernels made for this; the optional `gpu` extra), on CPU kiln's own chunked loss, which
measured faster than a plain loop there. `loss_kind` is the one place that decides.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, weight, targets) -> mean


def weight_grad(probs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One chunk's output-weight gradient `probs.T @ h` (V, d), multiplied in the compute dtype: a
    third of the output layer's FLOPs, which in bf16 run on the bf16 units where fp32 copies of both
    operands would not. The matmul accumulates in fp32 (cuBLAS and oneDNN do for bf16); on CUDA it
    also returns fp32 (`out_dtype`), elsewhere the chunk's result is rounded to bf16 once and the
    caller sums the chunks in fp32."""
    if probs.dtype != torch.float32 and probs.is_cuda:
        return torch.mm(probs.T, h, out_dtype=torch.float32)
    return probs.T @ h


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of `hidden @ weight.T`, without the whole (N, V) logits.

    Rows go through in chunks: logits of a chunk, log-sum-exp, loss, and at once the chunk's
    gradients (softmax minus one-hot) for the hidden states and the output weight. Next to
    autograd's path this skips the full log-softmax backward and two (N, V) zero-fills, and
    holds one (chunk, V) block instead of three (N, V) ones.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n, dtype = hidden.shape[0], hidden.dtype  # hidden: (N, d); weight: (V, d); targets: (N,)
        w = weight.to(dtype)
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
            grad_weight += weight_grad(probs, h)  # summed over chunks in fp32 whatever the compute dtype
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def loss_kind(device_type: str, liger_available: bool) -> str:
    """ "fused" (Liger's kernel) on CUDA when it is installed, else "chunked"."""
    return "fused" if device_type == "cuda" and liger_available else "chunked"


def linear_cross_entropy(device_type: str, compute_dtype: torch.dtype | None, chunk: int = 256) -> tuple[str, LossFn]:
    """The loss for this device, with its name (what the run's parameters record)."""
    kind = loss_kind(device_type, liger_installed())
    if device_type == "cuda" and kind == "chunked":
        warnings.warn(
            "liger-kernel is not installed: pretraining on CUDA uses the slower chunked loss "
            "(pip install 'kiln[gpu]' for the fused one)",
            stacklevel=2,
        )
    if kind == "chunked":
        return kind, lambda hidden, weight, targets: ChunkedLinearCrossEntropy.apply(
            hidden.to(compute_dtype or hidden.dtype), weight, targets, chunk
        )
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # fp32 master weight, hidden states in the compute dtype: the kernel's matmuls run in bf16 and
    # it accumulates the weight's gradient in fp32
    fused = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)
    return kind, lambda hidden, weight, targets: fused(weight, hidden.to(compute_dtype or hidden.dtype), targets)


class CausalLMLoss(torch.nn.Module):
    """The training objective as one module (what DDP wraps): the transformer body (possibly
    compiled), then the linear cross-entropy against the output projection (the tied embedding
    when the shape ties them). Training builds no KV cache."""

    def __init__(self, model, body, loss_fn: LossFn):
        super().__init__()
        self.model, self.body, self.loss_fn = model, body, loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=x, use_cache=False).last_hidden_state  # (B, T, d)
        return self.loss_fn(hidden.flatten(0, 1), self.model.lm_head.weight, y.flatten())
