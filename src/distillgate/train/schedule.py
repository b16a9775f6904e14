"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak.

The schedule is a pure function of the optimizer-step index, so its state is three numbers (JSON) and a
resumed run gets exactly the lr the uninterrupted run had. ``scale`` carries the rollback halving
(each rollback after repeated non-finite steps multiplies it by 0.5; see :mod:`distillgate.train.loop`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ArtifactError, ConfigError


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index ``step``.

    * warmup (``step < warmup_steps``): ``(step + 1) / warmup_steps``, so the first step already moves
      (HF's ``step / warmup`` spends step 0 at lr 0) and the last warmup step reaches the peak;
    * then cosine over the remaining steps: ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with
      ``p = (step - warmup) / (total - warmup - 1)`` clamped to [0, 1]: the first post-warmup step is at
      the peak and the last step (``total - 1``) is exactly at ``min_lr_ratio`` (a lone post-warmup step stays at the peak).

    >>> [round(lr_factor(s, 10, 2, 0.1), 4) for s in range(10)]
    [0.5, 1.0, 1.0, 0.9554, 0.8306, 0.6501, 0.4499, 0.2694, 0.1446, 0.1]
    """
    if total_steps < 1:
        raise ConfigError("train.steps", total_steps, ">= 1")
    if warmup_steps < 0:
        raise ConfigError("train.warmup_steps", warmup_steps, ">= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError("train.min_lr_ratio", min_lr_ratio, "0 <= ratio <= 1")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = total_steps - warmup_steps - 1
    p = 0.0 if span <= 0 else min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass
class WarmupCosine:
    """Sets every param group's lr to ``peak_lr * scale * lr_factor(step, ...)`` before each step."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float
    scale: float = 1.0

    def lr(self, step: int) -> float:
        return self.peak_lr * self.scale * lr_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "scheduler.json") -> "WarmupCosine":
        try:
            return cls(**{k: state[k] for k in ("peak_lr", "total_steps", "warmup_steps", "min_lr_ratio", "scale")})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{source}: not a WarmupCosine state ({e})") from e
