"""S2.2 key-head attention alignment: pure functions (tensors in, tensors out).

* :func:`head_attention` -- log attention probabilities over keys ``[B, h, T, T]`` (float32, causal and padding
  masks) and the log-norm of each head's output ``[B, h, T]`` from the heads' q, k, v (rotary already applied).
  Only the chosen heads go through it: the model's own SDPA path is never switched to eager attention.
* :func:`attention_kl` -- per query and head ``KL(teacher || student)`` over keys against the teacher's top-k
  keys plus a one-bucket tail (dense when k covers every key), ``[N, h]``.
* :func:`attention_loss` -- the channel's per-token loss ``[N]``: mean over heads of the KL plus
  ``norm_weight * (log|o_s| - log|o_t|)^2`` (the output-norm pattern).
* :func:`rollout_head_scores` -- which heads carry the aggregation: attention rollout through the residual
  stream (``0.5 I + 0.5 mean_h A``) back from the last positions; a head's score is the flow it moves into
  those positions from *other* tokens (its own position and the attention sink, token 0, excluded).

Masking: keys ``j > t`` (causal) and keys with ``attention_mask == 0`` get probability 0; a query row without
any valid key (an all-padding row) gets log-probs 0 and never reaches a loss (only prediction positions do).
"""

from __future__ import annotations

import torch

from .divergence import LOGP_FLOOR

_TINY = torch.finfo(torch.float32).tiny


def key_mask(attention_mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    """``[B, 1, T, T]`` bool: key j is visible from query i (``j <= i`` and ``attention_mask[b, j] == 1``)."""
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    m = causal.view(1, 1, t, t).expand(b, 1, t, t)
    if attention_mask is not None:
        m = m & (attention_mask.to(device) != 0).view(b, 1, 1, t)
    return m


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scaling: float,
                   attention_mask: torch.Tensor | None, chunk_rows: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp [B, h, T, T], out_lognorm [B, h, T] or None)`` float32.

    q, k: ``[B, h, T, d]`` (rotary applied; k already repeated for GQA), v: ``[B, h, T, dv]`` or None.
    ``logp[b, h, i, j] = log softmax_j(q_i . k_j * scaling)`` over the visible keys; ``out_lognorm`` is
    ``log |sum_j p_ij v_j|`` (the head's output before o_proj). ``chunk_rows`` > 0 computes that many batch
    rows at a time (same values).
    """
    bsz, _, t, _ = q.shape
    if chunk_rows and chunk_rows < bsz:
        parts = [head_attention(q[s:s + chunk_rows], k[s:s + chunk_rows],
                                None if v is None else v[s:s + chunk_rows], scaling,
                                None if attention_mask is None else attention_mask[s:s + chunk_rows])
                 for s in range(0, bsz, chunk_rows)]
        return torch.cat([p[0] for p in parts]), None if v is None else torch.cat([p[1] for p in parts])
    mask = key_mask(attention_mask, bsz, t, q.device)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)                                      # rows with no visible key
    scores = scores.masked_fill(empty, 0.0)
    logp = torch.log_softmax(scores, dim=-1).masked_fill(empty, 0.0)
    if v is None:
        return logp, None
    out = torch.matmul(logp.exp().masked_fill(~mask, 0.0), v.float())      # [B, h, T, dv]
    return logp, 0.5 * (out.pow(2).sum(-1) + _TINY).log()


def gather_queries(x: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [B, h, T, ...]`` at the prediction positions: ``[N, h, ...]``."""
    return x[b_idx, :, t_idx]


def attention_kl(student_logp: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p_t || p_s)`` over keys per query and head, ``[N, h]`` float32.

    student_logp: ``[N, h, T]`` log-probs over keys (masked keys -inf or any value: a key only counts where the
    teacher puts mass or in the student's tail). t_idx: ``[N, h, k]`` long key positions of the teacher's top-k
    keys; t_logp: ``[N, h, k]`` their log-probs (entries below ``LOGP_FLOOR``, e.g. padding when fewer than k
    keys are visible, carry no mass). The teacher's remaining mass ``r = 1 - sum p`` is one bucket against the
    student's mass on every key outside the top k; with k covering every visible key the result is the dense KL.
    """
    lp_t = t_logp.float()
    has = lp_t > LOGP_FLOOR
    p_t = torch.where(has, lp_t.exp(), torch.zeros_like(lp_t))
    lq = student_logp.float()
    lq_top = lq.gather(-1, t_idx)
    top = torch.where(has, p_t * (lp_t - lq_top.clamp_min(LOGP_FLOOR)), torch.zeros_like(lp_t)).sum(-1)
    r = (1.0 - p_t.sum(-1)).clamp_min(0.0)                                   # teacher tail mass
    # student tail: logsumexp over the keys outside the teacher's top-k, exact (no 1 - sum cancellation)
    # (no visible key outside the top k -- short rows -- means no tail: the teacher's r there is fp16 rounding)
    outside = lq.scatter(-1, t_idx, float("-inf"))
    lq_tail_raw = torch.logsumexp(outside, dim=-1)
    lq_tail = lq_tail_raw.clamp_min(LOGP_FLOOR)
    some = (r > 1e-6) & torch.isfinite(lq_tail_raw)
    tail = torch.where(some, r * ((r + _TINY).log() - lq_tail), torch.zeros_like(r))
    return top + tail


def attention_loss(student_logp: torch.Tensor, student_lognorm: torch.Tensor | None, t_idx: torch.Tensor,
                   t_logp: torch.Tensor, t_lognorm: torch.Tensor | None, norm_weight: float) -> torch.Tensor:
    """The ``attn`` channel's per-token loss ``[N]``: mean over the h heads of the key KL plus
    ``norm_weight * (student_lognorm - t_lognorm)^2`` (both ``[N, h]``; skipped when ``norm_weight`` is 0)."""
    loss = attention_kl(student_logp, t_idx, t_logp).mean(-1)
    if norm_weight and student_lognorm is not None and t_lognorm is not None:
        loss = loss + norm_weight * (student_lognorm.float() - t_lognorm.float()).pow(2).mean(-1)
    return loss


def topk_keys(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, logp)`` ``[..., k]`` of the k most attended keys per row of ``logp [..., T]``; with T < k the rest is
    padding (key 0 at log-prob 2 * LOGP_FLOOR). Masked and padding keys carry no mass in :func:`attention_kl`."""
    kk = min(k, logp.shape[-1])
    v, i = logp.float().topk(kk, dim=-1)
    v = v.clamp_min(2 * LOGP_FLOOR)
    if kk < k:                                  # fewer keys than k: pad (key 0, no mass) to a fixed width
        pad = (*v.shape[:-1], k - kk)
        i = torch.cat([i, torch.zeros(pad, dtype=i.dtype, device=i.device)], -1)
        v = torch.cat([v, torch.full(pad, 2 * LOGP_FLOOR, device=v.device)], -1)
    return i, v


# ------------------------------------------------------------------------------------------- key heads

def rollout_head_scores(probs: list[torch.Tensor], n_valid: int, last_positions: int) -> torch.Tensor:
    """``[L, H]`` float64 flow scores of one sequence.

    probs: per layer ``[H, T, T]`` attention probabilities (rows sum to 1 over visible keys); ``n_valid``: real
    tokens (the rest is padding). Rollout back from the last ``last_positions`` real tokens: ``u`` starts as
    their one-hot rows and is pushed down through ``R_l = 0.5 I + 0.5 mean_h A_{l,h}`` (the residual stream
    carries half). Head h of layer l scores ``sum_q u[q] * sum_{k not in {q, 0}} A_{l,h}[q, k]``: how much of
    what reaches the last positions it gathered from other tokens (token 0 is the attention sink, not content).
    Each layer's scores are taken with ``u`` of the layers above it, so later layers are not favoured by
    construction: every u row sums to 1.
    """
    n = int(n_valid)
    m = max(1, min(int(last_positions), n))
    u = torch.zeros(m, n, dtype=torch.float64)
    u[torch.arange(m), torch.arange(n - m, n)] = 1.0
    off = torch.ones(n, n, dtype=torch.float64)
    off.fill_diagonal_(0.0)
    off[:, 0] = 0.0
    scores = torch.zeros(len(probs), probs[0].shape[0], dtype=torch.float64)
    for layer in range(len(probs) - 1, -1, -1):
        a = probs[layer][:, :n, :n].double()                                 # [H, n, n]
        w = u.sum(0)                                                         # [n] flow arriving at each query
        scores[layer] = torch.einsum("q,hqk,qk->h", w, a, off) / m
        mix = 0.5 * torch.eye(n, dtype=torch.float64) + 0.5 * a.mean(0)
        u = u @ mix
    return scores
