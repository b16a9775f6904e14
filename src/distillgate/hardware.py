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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc <malloc.h>
MALLOC_MMAP_BYTES = 256 << 20
MALLOC_TRIM_BYTES = 512 << 20
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Let glibc keep and reuse freed blocks below 256 MiB instead of returning each to the OS (once per process).

    By default glibc serves blocks above its (dynamic, <= 32 MiB) mmap threshold with fresh ``mmap`` pages and
    unmaps them on free, so every large temporary -- a chunk's ``[256, V]`` logits (50 MB), the ``[V, H]``
    lm-head gradient (113 MB), the embedding's dense gradient -- page-faults in anew every step. Measured on the
    81M-parameter student, fp32, 2 threads: zero-filling the 113 MB gradient took 168 ms, a 50 MB subtraction
    74 ms; with this tuning the cached distillation step went from 305 to 354 loss tokens/s at +0.1 GiB peak
    RSS (``bench/distill_throughput.py --precision fp32``). The same as exporting
    ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912``; ``DISTILLGATE_MALLOC_TUNING=0`` turns
    it off. Returns whether it is applied (False off glibc, or when turned off).
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    import ctypes
    import ctypes.util
    import os
    import sys

    _malloc_tuned = False
    if os.environ.get("DISTILLGATE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                 # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                     MALLOC_TRIM_BYTES))
    return _malloc_tuned
