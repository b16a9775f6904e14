"""Data-parallel hooks (torchrun / ``torch.distributed``), all no-ops in a single process.

Design: the trainer does not wrap the model in DDP. Each optimizer step takes ``grad_accum * world``
micro-batches from the (identical on every rank) batch source; rank r takes the ones with
``position % world == r``. Loss-token counts of the window are all-reduced *before* the backward passes so
every rank divides by the global count, and gradients are summed with one all-reduce per step, which makes
``world`` ranks x ``grad_accum`` micro-batches give the same update as 1 rank x ``world * grad_accum``.
Only rank 0 writes checkpoints, metrics and the progress bar.
"""

from __future__ import annotations

import torch


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (float64 so token counts stay exact); identity in one process."""
    if world_size() == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` over ranks in one flat buffer per dtype (params without a grad get zeros)."""
    if world_size() == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
