"""Distillation temperature per prediction position (S2.1), from :class:`distillgate.config.TemperatureSpec`.

Policies (all return ``[N]`` float32, constant within a sample for the dynamic ones):

* ``fixed``: ``spec.value`` everywhere.
* ``complexity``: ``T_b = max - c_b * (max - min)`` with the sample's complexity ``c_b`` in [0, 1]
  (``batch['complexity']``): simple statements (c ~ 0) get the highest temperature and so a richer, softer
  teacher distribution; nested conditionals (c ~ 1) the lowest, so the student follows sharper choices.
* ``entropy``: ``T_b = max - e_b * (max - min)`` with ``e_b`` the mean normalised teacher entropy over the
  sample's prediction positions (:func:`distillgate.losses.stats.teacher_token_stats`). High teacher entropy
  -> low T: a teacher that is already unsure carries its "dark knowledge" at T = 1, and heating it further
  flattens it towards uniform; a confident (low-entropy) teacher is heated to expose the ranking of its
  runner-up tokens. Note the scale: top-k targets normalise the bucket entropy by log(k+1), dense teachers
  by log V (see stats.py).
"""

from __future__ import annotations

import torch

from ..config import TemperatureSpec
from ..errors import ConfigError


def _per_sample_mean(values: torch.Tensor, b_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of ``values`` ``[N]`` per sample ``[B]`` (0 for a sample with no positions)."""
    sums = torch.zeros(batch_size, dtype=torch.float32, device=values.device).index_add_(0, b_idx, values.float())
    counts = torch.bincount(b_idx, minlength=batch_size).to(torch.float32)
    return sums / counts.clamp_min(1.0)


def _interpolate(spec: TemperatureSpec, x: torch.Tensor) -> torch.Tensor:
    """``max - x * (max - min)`` for x in [0, 1] (clamped)."""
    return spec.max - x.float().clamp(0.0, 1.0) * (spec.max - spec.min)


def temperatures(spec: TemperatureSpec, b_idx: torch.Tensor, batch_size: int,
                 complexity: torch.Tensor | None = None,
                 teacher_norm_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature ``[N]`` float32 for the N prediction positions.

    Args:
        spec: the temperature policy (``loss.temperature``).
        b_idx: ``[N]`` long, the sample of each prediction position.
        batch_size: B.
        complexity: ``[B]`` in [0, 1] (``batch['complexity']``), needed by policy 'complexity'.
        teacher_norm_entropy: ``[N]`` in [0, 1], needed by policy 'entropy'.
    """
    n = b_idx.shape[0]
    dev = b_idx.device
    if spec.policy == "fixed":
        return torch.full((n,), float(spec.value), dtype=torch.float32, device=dev)
    if spec.policy == "complexity":
        if complexity is None:
            raise ConfigError("loss.temperature.policy", "complexity",
                              "a batch with 'complexity' [B] (from distillgate.data); this one has none")
        c = torch.as_tensor(complexity, dtype=torch.float32, device=dev).reshape(-1)
        if c.numel() != batch_size:
            raise ValueError(f"batch['complexity']: expected {batch_size} values, got {c.numel()}")
        return _interpolate(spec, c)[b_idx]
    if spec.policy == "entropy":
        if teacher_norm_entropy is None:
            raise ValueError("temperature policy 'entropy' needs the teacher's normalised entropy per token")
        e = _per_sample_mean(teacher_norm_entropy.to(dev), b_idx, batch_size)
        return _interpolate(spec, e)[b_idx]
    raise ConfigError("loss.temperature.policy", spec.policy, "one of ['fixed', 'complexity', 'entropy']")
