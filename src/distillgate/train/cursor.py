"""Position in the training data: (epoch, index of the next micro-batch in that epoch's list)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import InputError
from .types import Batch


class DataCursor:
    """Walks ``batch_fn(0), batch_fn(1), ...`` micro-batch by micro-batch; only (epoch, index) is state.

    ``batch_fn(epoch)`` is called once per epoch (its list is kept until the next epoch starts).
    """

    def __init__(self, batch_fn: Callable[[int], Sequence[Batch]], epoch: int = 0, index: int = 0):
        self.batch_fn, self.epoch, self.index = batch_fn, epoch, index
        self._cached: tuple[int, Sequence[Batch]] | None = None

    def _epoch_batches(self) -> Sequence[Batch]:
        if self._cached is None or self._cached[0] != self.epoch:
            got = self.batch_fn(self.epoch)
            if len(got) == 0:
                raise InputError(f"batches({self.epoch}) returned no micro-batches (the training data is empty)")
            self._cached = (self.epoch, got)
        return self._cached[1]

    def next(self) -> Batch:
        batches = self._epoch_batches()
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self._epoch_batches()
        batch = batches[self.index]
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def loss_token_count(batch: Batch) -> int:
    """Prediction positions of a batch: ``loss_mask[:, 1:].sum()`` (a target at t is predicted from t-1)."""
    mask = batch.get("loss_mask") if hasattr(batch, "get") else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise InputError(f"batch['loss_mask']: expected a [B,T] tensor, got "
                         f"{type(mask).__name__}{'' if mask is None else getattr(mask, 'shape', '')}")
    return int(mask[:, 1:].sum())


def input_token_count(batch: Batch) -> int:
    """Real (non-padding) input tokens: ``attention_mask.sum()``, or ``input_ids.numel()`` without a mask."""
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor):
        return int(am.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
