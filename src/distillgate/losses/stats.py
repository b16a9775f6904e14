"""Teacher confidence per prediction position: top-1 probability and normalised entropy (T = 1).

Used by the entropy temperature policy (:mod:`distillgate.losses.temperature`) and by difficulty weighting
(:func:`distillgate.weighting.difficulty_weight`). Both are statistics of the teacher alone, computed without
gradients.

Normalised entropy is in [0, 1]:
* dense teacher (``TeacherHidden`` or dense logits): ``H(p) / log V``;
* ``TopKTargets``: the entropy of the (k+1)-bucket distribution ``[p_1..p_k, r]`` divided by ``log(k+1)``
  (its maximum). The bucket entropy is a lower bound of H(p) and ``log(k+1)`` is far smaller than ``log V``,
  so the two modes are on different scales; with k = V both reduce to ``H(p) / log V`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..targets import TeacherHidden, TopKTargets
from .divergence import LOGP_FLOOR, topk_teacher_buckets


@dataclass
class TeacherStats:
    """``top1`` ``[N]``: teacher's largest probability; ``norm_entropy`` ``[N]`` in [0, 1]. Float32."""

    top1: torch.Tensor
    norm_entropy: torch.Tensor


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    logp = logp.clamp_min(LOGP_FLOOR)                      # 0 * -inf would be NaN for ruled-out tokens
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def teacher_token_stats(teacher: TopKTargets | TeacherHidden | torch.Tensor, vocab_size: int,
                        chunk_size: int = 1024, compute_dtype: torch.dtype | None = None) -> TeacherStats:
    """Top-1 probability and normalised entropy of the teacher at each of the N positions.

    ``TeacherHidden`` logits are formed ``chunk_size`` rows at a time (``hidden @ weight.T`` in
    ``compute_dtype``, default the hidden states' dtype), so full-vocabulary logits never exist for all N;
    this costs one extra teacher lm-head matmul per batch.
    """
    if isinstance(teacher, TopKTargets):
        lp = teacher.logprobs.float()
        k = lp.shape[-1]
        buckets = topk_teacher_buckets(lp, vocab_size)
        denom = math.log(vocab_size) if k == vocab_size else math.log(k + 1)
        top1 = lp.max(-1).values.exp()
        return TeacherStats(top1, (_entropy(buckets) / max(denom, 1e-12)).clamp(0.0, 1.0))
    if isinstance(teacher, TeacherHidden):
        hidden, weight = teacher.hidden, teacher.weight
        cd = compute_dtype or hidden.dtype
        w = weight.to(cd)
        n = hidden.shape[0]
        top1 = torch.empty(n, device=hidden.device)
        ent = torch.empty(n, device=hidden.device)
        for s in range(0, n, chunk_size):
            logp = F.log_softmax((hidden[s:s + chunk_size].to(cd) @ w.T).float(), dim=-1)
            top1[s:s + chunk_size] = logp.max(-1).values.exp()
            ent[s:s + chunk_size] = _entropy(logp)
        return TeacherStats(top1, (ent / math.log(vocab_size)).clamp(0.0, 1.0))
    if isinstance(teacher, torch.Tensor):
        logp = F.log_softmax(teacher.float(), dim=-1)
        return TeacherStats(logp.max(-1).values.exp(), (_entropy(logp) / math.log(vocab_size)).clamp(0.0, 1.0))
    raise TypeError(f"teacher: expected TopKTargets, TeacherHidden or logits, got {type(teacher).__name__}")
