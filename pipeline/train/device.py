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


def bf16_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. There bf16 autocast is the faster choice (on a 2-core AVX512-BF16 CPU a
    (1024 x 256) @ (256 x 32000) matmul ran 2.6x fp32's speed); elsewhere bf16 is emulated, slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent in some builds
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


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
        "bf16": bf16_native(torch.device("cuda" if cuda else "cpu")),
        "peak_bf16_tflops": (peak_flops(name) or 0) / 1e12 or None,
        "pretrain_loss": loss_kind("cuda" if cuda else "cpu", liger_installed()),
        "bitsandbytes_cuda": bitsandbytes_has_cuda() if cuda else None,
    }
