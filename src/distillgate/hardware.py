"""What the hardware does natively (one place, so the trainer and the fused loss agree)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str = "cpu") -> bool:
    """True where bf16 matmuls run natively: CUDA with bf16 support, a CPU with AVX512-BF16 or AMX.

    Measured on this project's AVX-512 CPU without them: bf16 matmul 14.9 vs fp32 52 GFLOP/s (1 thread,
    1024^3) -- PyTorch emulates bf16 there, 3.5x slower than fp32."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return True                                     # mps/xpu/...: trust the backend's autocast choice
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
