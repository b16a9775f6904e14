"""Interfaces of the trainer: what it consumes (batches, a loss function) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..errors import DistillgateError

Batch = Mapping[str, Any]
"""A batch dict (see docs/architecture.md): ``input_ids`` [B,T], ``attention_mask`` [B,T], ``loss_mask``
[B,T] (long), plus metadata. The trainer reads only ``loss_mask`` and ``attention_mask``/``input_ids``
(token counts); everything else is for the loss function."""


@runtime_checkable
class BatchSource(Protocol):
    """``source.batches(epoch)`` returns that epoch's micro-batches, identical every time it is called with
    the same ``epoch`` (shuffling, if any, seeded by the epoch): a resumed run replays the data exactly.
    :func:`distillgate.train.train` also accepts a plain function ``epoch -> Sequence[Batch]``."""

    def batches(self, epoch: int) -> Sequence[Batch]: ...


def as_batch_fn(source: BatchSource | Callable[[int], Sequence[Batch]]) -> Callable[[int], Sequence[Batch]]:
    """A BatchSource object or a plain ``epoch -> batches`` function, as a function."""
    fn = getattr(source, "batches", None)
    if callable(fn):
        return fn
    if callable(source):
        return source
    raise TypeError(f"batches: {type(source).__name__} is neither a BatchSource (.batches(epoch)) nor a "
                    f"function epoch -> Sequence[Batch]")


class LossOutputLike(Protocol):
    """Shape of :class:`distillgate.losses.LossOutput`: ``total_sum`` is a differentiable 0-dim tensor (sum of
    the per-token loss over the micro-batch's prediction positions), ``terms`` per-token means for logging."""

    total_sum: torch.Tensor
    n_tokens: int
    terms: dict[str, float]


LossFn = Callable[[torch.nn.Module, Batch], LossOutputLike]


class NonFiniteError(DistillgateError):
    """Training produced NaN/Inf that the skip/rollback policy could not (or was told not to) absorb."""


class StopTraining(Exception):
    """Raise from a callback to end training after the current step; a final checkpoint is still written."""


@dataclass
class StepInfo:
    """What callbacks receive after every optimizer step (``step`` is 1-based: steps done so far)."""

    step: int
    total_steps: int
    lr: float
    loss: float
    terms: dict[str, float]
    grad_norm: float
    loss_tokens: int
    input_tokens: int
    seconds: float
    skipped: bool
    epoch: int


@dataclass
class TrainEvent:
    """A skipped step or a rollback (``kind`` in {'skip', 'rollback', 'resume', 'checkpoint_fallback'})."""

    kind: str
    step: int
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"event": self.kind, "step": self.step, **self.detail}


@dataclass
class TrainResult:
    """Summary of a :func:`distillgate.train.train` call (tokens are loss tokens = prediction positions)."""

    steps: int
    tokens: int
    input_tokens: int
    seconds: float
    tokens_per_s: float
    input_tokens_per_s: float
    final_loss: float
    mean_loss: float
    final_terms: dict[str, float]
    skipped_steps: int
    rollbacks: int
    events: list[dict]
    last_checkpoint: Path | None
    metrics_path: Path
    peak_rss_mb: float
    stopped_early: bool = False
    precision: str = ""  # what autocast ran with after resolving "auto"
    compile_seconds: float = 0.0  # time spent compiling (train.compile), not counted in any step's seconds
    compiled: bool = False  # whether the decoder layers ran compiled (train.compile after resolving "auto")
    teacher_compiled: bool = False  # whether the online teacher's decoder layers ran compiled too

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["last_checkpoint"] = str(self.last_checkpoint) if self.last_checkpoint else None
        d["metrics_path"] = str(self.metrics_path)
        return d
