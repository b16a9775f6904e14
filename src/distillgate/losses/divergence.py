"""Per-token divergences between a teacher and a student next-token distribution.

Every public loss takes the student's logits ``[N, V]`` (any float dtype; softmax runs in float32) and a
teacher given either as dense logits ``[N, V]`` or as :class:`~distillgate.targets.TopKTargets`, and returns
a per-token loss ``[N]`` float32. Reductions, masking and weights belong to the caller
(:mod:`distillgate.weighting`): positions that are not predicted are simply not among the N rows.

Conventions
-----------
* ``p`` is the teacher distribution, ``q`` the student's. ``forward_kl`` = KL(p || q) (mass-covering),
  ``reverse_kl`` = KL(q || p) (mode-seeking), ``total_variation`` = 0.5 * sum |p - q|.
* ``gjsd(beta)`` follows TRL's ``GKDTrainer.generalized_jsd_loss`` exactly (Agarwal et al. 2023, eq. 1):
  the mixture is ``m = beta * p + (1 - beta) * q`` and ``JSD = beta * KL(p || m) + (1 - beta) * KL(q || m)``;
  ``beta == 0`` is special-cased to forward KL and ``beta == 1`` to reverse KL. Note the discontinuity this
  convention implies: as beta -> 0 the mixture JSD itself tends to 0 (like beta * KL(p || q)), so the two
  endpoints are not limits of the interior; they are TRL's documented aliases and we keep them.
* Temperature is per token ``[N]`` (or None = 1): both logit sets are divided by T before the softmax and,
  with ``t2_scale=True`` (default), the KD loss is multiplied by T^2 (Hinton et al. 2015) so that its
  gradient magnitude does not shrink as 1/T^2 when T changes. We apply the same factor to every divergence
  (for TV the gradient scales as 1/T, so T^2 over-compensates it; one convention for all kinds is simpler
  to reason about when switching divergence). Cross-entropy is never tempered.

Top-k + tail (cached targets)
-----------------------------
A :class:`TopKTargets` row holds the teacher's k largest log-probs at T = 1 and implies a tail mass
``r = 1 - sum(exp(logprobs))`` (or carries it exactly as an optional ``log_tail [N]`` attribute). At T = 1
we compare the *coarsened* (k+1)-bucket distributions
``[p_1..p_k, r]`` and ``[q_1..q_k, 1 - sum q_i]`` (the student's buckets are taken at the teacher's indices,
its tail is computed exactly as a logsumexp over the other V - k logits, no cancellation). This is the exact
divergence between the coarsened distributions; by the data-processing inequality it is a lower bound of the
dense KL/JSD/TV, and it equals the dense value when k = V (then there is no tail bucket).

With T != 1 the tail must be re-tempered, but the teacher's inner tail distribution is unknown: we treat it
as uniform over the V - k remaining tokens, so a bucket distribution ``[b_1..b_k, b_tail]`` at T = 1 becomes
``softmax([log b_1 / T, ..., log b_k / T, log(V-k) + (log b_tail - log(V-k)) / T])``. The *same* tempering is
applied to the student's T = 1 buckets. Why both sides: the student's exact tempered tail is not comparable
with the teacher's uniform-tail guess (at T = 2, V = 49,152, r = 0.1 the uniform guess gives the tail bucket
more tempered weight than the top tokens), so tempering only the teacher makes a student identical to its
teacher pay a large loss (measured on SmolLM2 against itself, T ~ 1.7, top-64: KD up to 0.69 nats per token)
and pulls its tail mass the wrong way. Tempering both sides alike keeps "student = teacher" an exact zero
and is exact for T = 1 or k = V (then it is ``log_softmax(z / T)`` itself).
Caveat (measured, SmolLM2 top-64 on real text): the tempered tail bucket holds on average 10% of the mass at
T = 1, 65% at T = 1.5 and 89% at T = 2, so with cached targets a hot temperature mostly trains the tail mass;
prefer T <= ~1.2 with cached targets and the online teacher (dense, exact) for hotter temperatures.

Numerics: the teacher's log-probs are floored at ``LOGP_FLOOR`` (a teacher that rules tokens out with -inf
logits would otherwise give 0 * inf = NaN in the losses or their gradients); the student's log-probs are left
untouched (they are finite for finite logits), so no student gradient is clipped.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..targets import TopKTargets

Teacher = Union[torch.Tensor, TopKTargets]

LOGP_FLOOR = -100.0
"""Lowest teacher log-probability used (e^-100 ~ 4e-44, below float32's normal range)."""

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------- helpers

def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012); x > 0 is clamped to 0 -> -inf."""
    x = x.clamp_max(0.0)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _inv_temperature(temperature: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
    """``[N, 1]`` float32 1/T, or None for T = 1."""
    if temperature is None:
        return None
    t = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"temperature: expected shape [{n}] (one per token), got {tuple(t.shape)}")
    return (1.0 / t).unsqueeze(-1)


def _scaled(logits: torch.Tensor, inv_t: torch.Tensor | None) -> torch.Tensor:
    z = logits.float()
    return z if inv_t is None else z * inv_t


def _t2(loss: torch.Tensor, temperature: torch.Tensor | None, t2_scale: bool) -> torch.Tensor:
    if temperature is None or not t2_scale:
        return loss
    t = torch.as_tensor(temperature, dtype=torch.float32, device=loss.device)
    return loss * t * t


# -------------------------------------------------------------------- teacher/student distributions

def dense_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tempered log-probs ``(p [N, V], q [N, V])`` float32 of teacher and student.

    ``teacher_logits`` may also be log-probs (log_softmax is shift-invariant); p is floored at LOGP_FLOOR.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits "
                         f"{tuple(student_logits.shape)}")
    inv_t = _inv_temperature(temperature, student_logits.shape[0], student_logits.device)
    q = F.log_softmax(_scaled(student_logits, inv_t), dim=-1)
    with torch.no_grad():
        p = F.log_softmax(_scaled(teacher_logits, inv_t), dim=-1).clamp_min(LOGP_FLOOR)
    return p, q


def temper_buckets(log_top: torch.Tensor, log_tail: torch.Tensor | None, tail_size: int,
                   inv_t: torch.Tensor | None) -> torch.Tensor:
    """Bucket log-probs ``[N, k(+1)]`` at temperature T from T = 1 bucket log-probs ``log_top [N, k]`` and
    ``log_tail [N]`` (None: no tail), the tail's mass assumed uniform over ``tail_size`` tokens."""
    if log_tail is None:
        return log_top if inv_t is None else F.log_softmax(log_top * inv_t, dim=-1)
    if inv_t is None:
        return torch.cat([log_top, log_tail.unsqueeze(-1)], dim=-1)
    log_m = math.log(tail_size)
    a_tail = log_m + (log_tail - log_m) * inv_t.squeeze(-1)
    return F.log_softmax(torch.cat([log_top * inv_t, a_tail.unsqueeze(-1)], dim=-1), dim=-1)


def topk_teacher_buckets(logprobs: torch.Tensor, vocab_size: int, temperature: torch.Tensor | None = None,
                         log_tail: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher bucket log-probs ``[N, k+1]`` (``[N, k]`` when k = V) from top-k log-probs ``[N, k]`` at T = 1.

    Tail mass: ``log_tail`` ``[N]`` when the targets carry it (exact, from the teacher's full logits), else
    r = 1 - sum exp(logprobs), clamped >= e^LOGP_FLOOR (its relative precision is lost when r is below about
    1e-6 for float32 log-probs, 1e-3 for float16 ones); tempered by :func:`temper_buckets`.
    """
    n, k = logprobs.shape
    if k > vocab_size:
        raise ValueError(f"top-k targets have k={k} > vocabulary size {vocab_size}")
    lp = logprobs.float().clamp_min(LOGP_FLOOR)
    inv_t = _inv_temperature(temperature, n, lp.device)
    if k == vocab_size:
        log_r = None
    elif log_tail is not None:
        log_r = log_tail.to(lp.device, torch.float32).clamp_min(LOGP_FLOOR)
    else:
        log_r = log1mexp(torch.logsumexp(lp, dim=-1)).clamp_min(LOGP_FLOOR)
    return temper_buckets(lp, log_r, vocab_size - k, inv_t).clamp_min(LOGP_FLOOR)


def topk_student_buckets(student_logits: torch.Tensor, indices: torch.Tensor,
                         temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Student bucket log-probs ``[N, k+1]`` (``[N, k]`` when k = V): log q at the teacher's top-k indices and
    the exact log of the remaining mass (logsumexp over the other V - k logits), at T = 1, then tempered by
    :func:`temper_buckets` exactly like the teacher's."""
    n, v = student_logits.shape
    inv_t = _inv_temperature(temperature, n, student_logits.device)
    z = student_logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, indices) - lse
    k = indices.shape[-1]
    tail = None if k == v else (torch.logsumexp(z.scatter(-1, indices, float("-inf")), dim=-1) - lse.squeeze(-1))
    return temper_buckets(top, tail, v - k, inv_t)


def teacher_student_logprobs(student_logits: torch.Tensor, teacher: Teacher,
                             temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, q)`` log-probs over matching supports: the V tokens (dense teacher logits ``[N, V]``) or the
    k+1 buckets (:class:`TopKTargets`). q is differentiable w.r.t. ``student_logits``; p is not."""
    if isinstance(teacher, TopKTargets):
        n, v = student_logits.shape
        if teacher.indices.shape != teacher.logprobs.shape or teacher.indices.shape[0] != n:
            raise ValueError(f"top-k targets indices {tuple(teacher.indices.shape)} / logprobs "
                             f"{tuple(teacher.logprobs.shape)} do not match {n} student rows")
        idx = teacher.indices.to(device=student_logits.device, dtype=torch.long)
        with torch.no_grad():
            p = topk_teacher_buckets(teacher.logprobs.to(student_logits.device), v, temperature,
                                     teacher.log_tail)
        return p, topk_student_buckets(student_logits, idx, temperature)
    if isinstance(teacher, torch.Tensor):
        return dense_logprobs(student_logits, teacher, temperature)
    raise TypeError(f"teacher: expected dense logits (Tensor) or TopKTargets, got {type(teacher).__name__}")


# ------------------------------------------------------------- divergences on log-prob tensors [N, B]

def kl_logprobs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) ``[N]`` from log-probs ``[N, B]`` (a's zero-mass entries contribute 0)."""
    return (a.exp() * (a - b)).sum(-1)


def gjsd_logprobs(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD ``[N]`` from teacher/student log-probs ``[N, B]`` (see module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError("loss.beta", beta, "a number in [0, 1]")
    if beta == 0.0:
        return kl_logprobs(p, q)
    if beta == 1.0:
        return kl_logprobs(q, p)
    m = torch.logsumexp(torch.stack([q + math.log1p(-beta), p + math.log(beta)]), dim=0)
    return beta * kl_logprobs(p, m) + (1.0 - beta) * kl_logprobs(q, m)


def tv_logprobs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total variation 0.5 * sum |p - q| ``[N]`` from log-probs ``[N, B]``."""
    return 0.5 * (p.exp() - q.exp()).abs().sum(-1)


# ---------------------------------------------------------------------------------- public losses

def forward_kl(student_logits: torch.Tensor, teacher: Teacher, temperature: torch.Tensor | None = None,
               *, t2_scale: bool = True) -> torch.Tensor:
    """KL(p_teacher || q_student) per token ``[N]`` float32. Logits ``[N, V]``, temperature ``[N]`` or None."""
    p, q = teacher_student_logprobs(student_logits, teacher, temperature)
    return _t2(kl_logprobs(p, q), temperature, t2_scale)


def reverse_kl(student_logits: torch.Tensor, teacher: Teacher, temperature: torch.Tensor | None = None,
               *, t2_scale: bool = True) -> torch.Tensor:
    """KL(q_student || p_teacher) per token ``[N]`` float32."""
    p, q = teacher_student_logprobs(student_logits, teacher, temperature)
    return _t2(kl_logprobs(q, p), temperature, t2_scale)


def gjsd(student_logits: torch.Tensor, teacher: Teacher, beta: float = 0.5,
         temperature: torch.Tensor | None = None, *, t2_scale: bool = True) -> torch.Tensor:
    """Generalized JSD per token ``[N]`` float32, TRL semantics: beta=0 forward KL, beta=1 reverse KL."""
    p, q = teacher_student_logprobs(student_logits, teacher, temperature)
    return _t2(gjsd_logprobs(p, q, beta), temperature, t2_scale)


def total_variation(student_logits: torch.Tensor, teacher: Teacher, temperature: torch.Tensor | None = None,
                    *, t2_scale: bool = True) -> torch.Tensor:
    """Total variation distance per token ``[N]`` float32 (in [0, 1] before the T^2 factor)."""
    p, q = teacher_student_logprobs(student_logits, teacher, temperature)
    return _t2(tv_logprobs(p, q), temperature, t2_scale)


def cross_entropy(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """-log q_student(target) per token ``[N]`` float32 at T = 1. Logits ``[N, V]``, target ids ``[N]`` long."""
    z = student_logits.float()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forward_kl": lambda p, q, beta: kl_logprobs(p, q),
    "reverse_kl": lambda p, q, beta: kl_logprobs(q, p),
    "gjsd": gjsd_logprobs,
    "tv": lambda p, q, beta: tv_logprobs(p, q),
}
"""Divergence name (``loss.divergence``) -> ``fn(p_logprobs, q_logprobs, beta) -> [N]``."""


def divergence(name: str, student_logits: torch.Tensor, teacher: Teacher, *, beta: float = 0.5,
               temperature: torch.Tensor | None = None, t2_scale: bool = True) -> torch.Tensor:
    """The divergence named ``name`` (a key of :data:`DIVERGENCES`) per token ``[N]`` float32."""
    fn = DIVERGENCES.get(name)
    if fn is None:
        raise ConfigError("loss.divergence", name, f"one of {sorted(DIVERGENCES)}")
    p, q = teacher_student_logprobs(student_logits, teacher, temperature)
    return _t2(fn(p, q, beta), temperature, t2_scale)
