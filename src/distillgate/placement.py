"""Where each model runs, and in what precision (SPEC W3).

``teacher.device`` / ``student.device``: ``auto`` (this rank's GPU, ``cuda:<LOCAL_RANK>``, when CUDA is
available, else ``cpu``), ``cpu``, ``cuda`` or ``cuda:N``; ``teacher.dtype`` / ``student.dtype`` the weights'
dtype. When the teacher does not fit the free memory of its device (``teacher.fit: auto``), it is first kept in
bfloat16 (half the bytes of float32), then, if that still does not fit, offloaded: kept on the CPU while the
student trains on the accelerator (its targets are computed there and moved; a cached-targets run needs the
teacher only for extraction and validation). ``teacher.fit: strict`` refuses instead. Each decision is a
:class:`Placement` with its reason; the loop commits them in every version's meta and the report shows them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError, InputError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 1.25
"""Weights x 1.25: activations, the KV cache of generation and the allocator's slack (a teacher only runs
forward passes; the student's optimizer state is not counted here)."""


@dataclass
class Placement:
    device: str
    dtype: str
    requested_device: str
    requested_dtype: str
    weight_bytes: int | None = None
    free_bytes: int | None = None
    reason: str = "as configured"

    def to_json(self) -> dict:
        return asdict(self)


def resolve_device(name: str, field: str) -> str:
    """``auto`` -> this rank's GPU or ``cpu``; ``cuda`` -> ``cuda:<LOCAL_RANK>``; validated against the machine."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(field, name, "'cpu' or 'auto' (CUDA is not available on this machine)")
        idx = local if name == "cuda" else int(name[5:])
        if idx >= torch.cuda.device_count():
            raise ConfigError(field, name, f"a CUDA device index below {torch.cuda.device_count()}")
        return f"cuda:{idx}"
    raise ConfigError(field, name, "'auto', 'cpu', 'cuda' or 'cuda:N'")


def free_bytes(device: str) -> int | None:
    """Free memory of ``device`` now (CUDA: the driver's count; CPU: available RAM), None when unknown."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil: do not guess
        return None


def plan_teacher(device: str, dtype: str, n_params: int, fit: str, free: int | None) -> Placement:
    """Where the teacher goes: as requested if ``n_params`` weights (x :data:`HEADROOM`) fit ``free`` bytes; else
    (``fit='auto'``) bfloat16, then the CPU. ``free`` None: as requested (nothing to decide on)."""
    need = lambda dt: int(n_params * BYTES[dt] * HEADROOM)  # noqa: E731
    p = Placement(device, dtype, device, dtype, need(dtype), free)
    if free is None or need(dtype) <= free:
        return p
    short = f"{need(dtype) / 2**30:.2f} GiB needed ({n_params:,} parameters in {dtype}), {free / 2**30:.2f} GiB free " \
            f"on {device}"
    if fit == "strict":
        raise InputError(f"teacher does not fit: {short}; set teacher.fit=auto to allow bfloat16 or CPU offload, "
                         f"or choose teacher.device / teacher.dtype")
    if dtype == "float32" and need("bfloat16") <= free:
        return Placement(device, "bfloat16", device, dtype, need("bfloat16"), free, f"kept in bfloat16: {short}")
    if device != "cpu":
        cpu_free = free_bytes("cpu")
        lower = "bfloat16" if cpu_free is not None and need(dtype) > cpu_free else dtype
        return Placement("cpu", lower, device, dtype, need(lower), cpu_free, f"offloaded to the CPU: {short}")
    raise InputError(f"teacher does not fit in memory: {short} (even in bfloat16)")


def place_teacher(spec, n_params: int) -> Placement:
    """The teacher's placement from its config (``teacher.device``, ``teacher.dtype``, ``teacher.fit``)."""
    device = resolve_device(spec.device, "teacher.device")
    return plan_teacher(device, spec.dtype, n_params, spec.fit, free_bytes(device))


def place_student(spec) -> Placement:
    return Placement(resolve_device(spec.device, "student.device"), spec.dtype, spec.device, spec.dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor on ``device`` (the same dict when nothing moves: CPU training)."""
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
