"""Data-parallel hooks (torchrun / ``torch.distributed``), all no-ops in a single process.

Design: the trainer does not wrap the model in DDP. Each optimizer step takes ``grad_accum * world``
micro-batches from the (identical on every rank) batch source; rank r takes the ones with
``position % world == r``. Loss-token counts of the window are all-reduced *before* the backward passes so
every rank divides by the global count, and gradients are summed with one all-reduce per step, which makes
``world`` ranks x ``grad_accum`` micro-batches give the same update as 1 rank x ``world * grad_accum``.
Only rank 0 writes checkpoints, metrics and the progress bar. (DDP's own wrapper would overlap the all-reduce
with the backward pass; on CPU gloo with small students the one flat all-reduce per step costs little, and the
token-count normalisation stays exact.)

The loop under torchrun (:mod:`distillgate.loop.ranks`) adds: joining the process group from torchrun's
environment (:func:`init_from_env`), rank 0's objects on every rank (:func:`broadcast_object`), round-robin work
splitting (:func:`mine`) and merging (:func:`merge_shards`), and :class:`solo` for work rank 0 does alone.
"""

from __future__ import annotations

import torch


_SOLO = [0]


def _active() -> bool:
    import torch.distributed as dist

    return not _SOLO[0] and dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _active() else 0


class solo:
    """``with solo():`` this process acts alone (world 1, rank 0, no collectives), e.g. rank 0 measuring on its
    own while the others wait for the result."""

    def __enter__(self):
        _SOLO[0] += 1

    def __exit__(self, *exc):
        _SOLO[0] -= 1


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


def all_reduce_tensors(tensors: dict) -> dict:
    """``{key: tensor}`` summed over ranks (one flat float64 buffer, each result float64 on its tensor's device and
    in its shape); the same dict in one process."""
    if world_size() == 1:
        return tensors
    keys = sorted(tensors)
    flat = all_reduce_sum(torch.cat([tensors[k].flatten().double().cpu() for k in keys]).tolist())
    out, off = {}, 0
    for k in keys:
        n = tensors[k].numel()
        out[k] = torch.tensor(flat[off:off + n], dtype=torch.float64, device=tensors[k].device).view_as(tensors[k])
        off += n
    return out


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


# ------------------------------------------------------------------------------------------ the loop under torchrun

def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``, env://);
    a no-op in a single process or when a group exists already. Returns whether this call created the group.

    ``backend='auto'``: NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective: a rank
    that died (and was not reaped by torchrun's agent first) makes the others fail after at most this long
    instead of hanging."""
    import datetime
    import os

    import torch.distributed as torch_dist

    if not launched() or _active():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown(created: bool) -> None:
    if created and _active():
        import torch.distributed as torch_dist

        torch_dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (pickled by torch.distributed between our own ranks only)."""
    if world_size() == 1:
        return obj
    import torch.distributed as torch_dist

    box = [obj if is_main() else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as torch_dist

    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def mine(n: int) -> list[int]:
    """The indices of ``n`` work items (batches) this rank handles: round-robin, ``i % world == rank``."""
    return list(range(rank(), n, world_size()))


def merge_shards(part: dict, *, everywhere: bool = False) -> dict:
    """Every rank's ``{item index: result}`` merged into one dict on rank 0 (the ranks' keys are disjoint); the
    other ranks get ``{}`` (only rank 0 writes a merged artifact), or the whole dict with ``everywhere``."""
    if world_size() == 1:
        return part
    import torch.distributed as torch_dist

    if everywhere:
        parts = all_gather_object(part)
    else:
        parts = [None] * world_size() if is_main() else None
        torch_dist.gather_object(part, parts, dst=0)
    merged: dict = {}
    for p in parts or []:
        merged.update(p)
    return merged


def committed_by_rank0(path) -> None:
    """On a rank > 0: fail clearly when the artifact rank 0 just committed at ``path`` is not visible here."""
    import os

    if not is_main() and not os.path.exists(path):
        from ..errors import ArtifactError

        raise ArtifactError(f"rank {rank()}: {path}: rank 0 committed it but it is not visible on this node; a "
                            f"multi-node run needs store_root and DISTILLGATE_HOME on a file system every node shares")
