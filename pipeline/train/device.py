"""What this machine offers the training stages, checked before a long run starts.

Pretraining on CUDA wants bf16 and Liger-Kernel's fused loss; QLoRA (SFT, DPO) on CUDA needs
bitsandbytes built for CUDA, or the 4-bit layers fail deep inside the first step. `kiln device`
prints the report and exits 2 where a GPU is there but that build is not.
"""

from __future__ import annotations

import torch

from pipeline.errors import KilnError
from pipeline.train.loss import liger_installed, loss_kind
from pipeline.train.throughput import peak_flops


def bitsandbytes_has_cuda() -> bool:
    """Whether bitsandbytes loaded its CUDA library (its CPU build loads on any machine)."""
    from bitsandbytes.cextension import lib

    return bool(getattr(lib, "compiled_with_cuda", False))


def check_quantization_device() -> None:
    """On a CUDA machine, 4-bit training needs bitsandbytes' CUDA build: say so before loading."""
    if torch.cuda.is_available() and not bitsandbytes_has_cuda():
        raise KilnError(
            f"a CUDA GPU is here but bitsandbytes has no CUDA build for CUDA {torch.version.cuda}: "
            "4-bit SFT and DPO need one (reinstall bitsandbytes for this CUDA, or set dpo.quantize to false)"
        )


def device_report() -> dict:
    """The device, its bf16 support and peak FLOP/s, the pretraining loss kernel and the 4-bit backend."""
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {
        "device": name,
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "peak_bf16_tflops": (peak_flops(name) or 0) / 1e12 or None,
        "pretrain_loss": loss_kind("cuda" if cuda else "cpu", liger_installed()),
        "bitsandbytes_cuda": bitsandbytes_has_cuda() if cuda else None,
    }
