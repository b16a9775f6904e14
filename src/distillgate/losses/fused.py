"""Chunked fused lm-head + distillation loss: full-vocabulary logits never exist for all N positions.

The student's logits ``h_s @ W_s.T`` (``[N, V]``: 1024 x 49152 fp32 is 192 MiB, and autograd keeps several
such tensors alive until backward) are formed ``chunk_size`` rows at a time. For each chunk the forward pass
computes the channel losses, combines them with :func:`distillgate.weighting.combine_sum`, and immediately
back-propagates to the chunk's logits; the gradients w.r.t. ``h_s`` (its rows) and ``W_s`` (accumulated in
float32) are computed right there with two matmuls and the chunk's logits are freed (Liger-kernel style).
Backward then only scales the stored gradients by the incoming scalar. Cost: the same three matmuls as the
unfused path; memory: one chunk's logits graph plus ``[N, H]`` and ``[V, H]`` float32 gradient buffers.

Mixed precision: under ``torch.autocast`` (or with bf16 inputs) the matmuls run in the autocast dtype, the
softmax/losses in float32, exactly what autocast does for the unfused ``F.linear`` + ``float()`` path -- except
bf16 autocast on a CPU without native bf16, where the head stays float32 (:func:`_compute_dtype`).
The temperature and token weights are constants (no gradient flows to them).

Teacher: :class:`TopKTargets` rows are sliced per chunk and take the closed-form path (:func:`_topk_chunk`:
the gradient w.r.t. the chunk's logits from one exp pass, no autograd over ``[c, V]``: 0.94 s vs 2.38 s per
1,024 x 49,152 forward+backward in fp32, ``bench/fused_loss.py --dtype fp32 --autograd``); tail samples, when the targets carry
them, make forward KL unbiased (:func:`sampled_forward_kl`). For :class:`TeacherHidden` (online teacher) the
teacher's logits are formed per chunk from ``hidden @ weight.T`` under no_grad and the gradient is closed-form
too (:func:`_dense_chunk`: softmaxes of both sides, no autograd over ``[c, V]``).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..hardware import native_bf16
from ..targets import TeacherHidden, TopKTargets
from ..weighting import CHANNELS, check_channels, combine_sum
from .divergence import (DIVERGENCES, LOGP_FLOOR, _inv_temperature, _t2, cross_entropy, divergence as divergence_fn,
                         temper_buckets, topk_teacher_buckets)

CLOSED_FORM = True
"""Top-k targets (:func:`_topk_chunk`) and dense / online teachers (:func:`_dense_chunk`) take the closed-form
chunk gradient; False forces per-chunk autograd
(same values; ``bench/fused_loss.py`` switches it off to measure the difference)."""

LM_HEAD = "lm_head"
"""``Channel.computed_by`` value of the channels this module computes (kd, ce, clone)."""
_LM = "['ce', 'clone', 'kd']"


def lm_head_channels(channels: dict[str, float]) -> dict[str, float]:
    """The subset of ``channels`` computed from the student's logits (by this module)."""
    check_channels(channels)
    return {k: w for k, w in channels.items() if CHANNELS[k].computed_by == LM_HEAD}


def channel_losses(logits: torch.Tensor, teacher, target_ids: torch.Tensor, temperature: torch.Tensor | None,
                   names, divergence: str, beta: float, t2_scale: bool = True) -> dict[str, torch.Tensor]:
    """Per-token losses ``{name: [n]}`` float32 of the lm-head channels ``names`` from logits ``[n, V]``.

    ``teacher``: dense teacher logits ``[n, V]`` or :class:`TopKTargets` with n rows.
    """
    out = {}
    for name in names:
        if name == "kd" and isinstance(teacher, TopKTargets) and teacher.indices.shape[1] < logits.shape[1] \
                and uses_tail_samples(teacher, divergence, beta):
            it = _inv_temperature(temperature, logits.shape[0], logits.device)
            lq = torch.log_softmax(logits.float() if it is None else logits.float() * it, dim=-1)
            idx, s_idx = (t.to(logits.device, torch.long) for t in (teacher.indices, teacher.tail_indices))
            out[name] = _t2(sampled_forward_kl(lq.gather(1, idx), lq.gather(1, s_idx), teacher, logits.shape[1],
                                               temperature), temperature, t2_scale)
        elif name == "kd":
            out[name] = divergence_fn(divergence, logits, teacher, beta=beta, temperature=temperature,
                                      t2_scale=t2_scale)
        elif name in ("ce", "clone"):             # clone: the teacher sample's NLL; its mask is a token weight
            out[name] = cross_entropy(logits, target_ids)
        else:
            raise ConfigError(f"loss.channels.{name}", name, f"a channel computed from logits: {_LM}")
    return out


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The lm-head matmuls' dtype: autocast's, except bf16 autocast on a CPU without native bf16, where the
    head runs in float32 -- PyTorch emulates bf16 matmuls there (3.5x slower than fp32, measured), the head is
    about a third of a small student's FLOPs, and float32 logits are also the more precise ones."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt == torch.bfloat16 and dev == "cpu" and not native_bf16("cpu"):
            return torch.float32
        return dt
    return torch.promote_types(h.dtype, w.dtype)


def _teacher_slicer(teacher, cd: torch.dtype):
    """``rows(s, e)`` -> the teacher for positions s:e (TopKTargets slice, or dense float32 logits)."""
    if isinstance(teacher, TopKTargets):
        return lambda s, e: teacher.select(slice(s, e))
    if isinstance(teacher, TeacherHidden):
        tw = teacher.weight.detach().to(cd)

        def rows(s, e):
            with torch.no_grad():
                return (teacher.hidden[s:e].detach().to(cd) @ tw.T).float()
        return rows
    if isinstance(teacher, torch.Tensor):
        return lambda s, e: teacher[s:e].detach()
    raise TypeError(f"teacher: expected TopKTargets, TeacherHidden or dense logits, got {type(teacher).__name__}")


def uses_tail_samples(targets: TopKTargets, divergence: str, beta: float) -> bool:
    """Whether the KD loss uses the targets' tail samples: forward KL (``gjsd`` with beta 0 is forward KL).
    Other divergences use the one-bucket tail."""
    if targets.tail_indices is None or targets.tail_indices.shape[1] == 0:
        return False
    return divergence == "forward_kl" or (divergence == "gjsd" and beta == 0.0)


def sampled_forward_kl(student_top: torch.Tensor, student_samples: torch.Tensor, targets: TopKTargets,
                       vocab_size: int, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL per token ``[N]`` with the tail estimated from samples (value and gradient).

    At T = 1: ``KL = sum_i p_i (log p_i - log q_i) + r * E_{j ~ p_tail}[log p_j - log q_j]``, the tail
    expectation replaced by the mean over the m stored draws (r: the teacher's tail mass). Equivalently the
    student is pulled towards ``p_hat``, exact on the top k and with ``r / m`` on each drawn token: unbiased,
    its expected gradient is the dense forward-KL gradient, where the one-bucket tail only fixes the tail's
    total mass. At T != 1 the tempered teacher ``p^(1/T) / Z`` is formed by importance weighting the same
    draws (each stands for ``(r / m) p_j^(1/T - 1)`` of the tail's ``sum p^(1/T)``; Z includes that estimate):
    self-normalised, so consistent rather than exactly unbiased. ``student_top [N, k]`` / ``student_samples
    [N, m]``: the student's log-probs at those tokens, at the same temperature. No T^2 factor here.
    """
    from .divergence import LOGP_FLOOR

    dev = student_top.device
    lp = targets.logprobs.to(dev, torch.float32).clamp_min(LOGP_FLOOR)
    log_r = topk_teacher_buckets(targets.logprobs.to(dev), vocab_size, None, targets.log_tail)[:, -1]
    lps = targets.tail_logprobs.to(dev, torch.float32).clamp_min(LOGP_FLOOR)
    m = lps.shape[1]
    if temperature is None:
        return (lp.exp() * (lp - student_top)).sum(-1) + log_r.exp() / m * (lps - student_samples).sum(-1)
    it = _inv_temperature(temperature, lp.shape[0], dev)                          # [N, 1]
    a_top = lp * it                                                                # log p_i^(1/T)
    a_s = (log_r - math.log(m)).unsqueeze(1) + lps * (it - 1.0)                    # each draw's share of the tail
    log_z = torch.logsumexp(torch.cat([a_top, a_s], dim=1), dim=1, keepdim=True)
    p_top, w_s = (a_top - log_z).exp(), (a_s - log_z).exp()
    return (p_top * (a_top - log_z - student_top)).sum(-1) + (w_s * (lps * it - log_z - student_samples)).sum(-1)


_TAIL_UNDERFLOW = 1e-30
"""Below this student tail mass (relative to the row's largest probability) a row's tail is recomputed
exactly (masked logsumexp, autograd path) instead of from the single-pass sum."""


def _topk_chunk(logits: torch.Tensor, targets: TopKTargets, target_ids: torch.Tensor,
                temperature: torch.Tensor | None, names, weights: dict[str, float],
                token_weight: torch.Tensor | None, divergence: str, beta: float, t2_scale: bool, need_grad: bool,
                channel_token_weight: dict[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Channel losses of one chunk against top-k targets, and their gradient w.r.t. the logits, analytically.

    Every top-k loss depends on the ``[c, V]`` logits only through the student's T = 1 bucket log-probs
    ``b_i = z_{idx_i} - lse`` (k of them), ``b_tail = log sum_{j not in top-k} e^{z_j} - lse`` and, for 'ce',
    ``z_t - lse``. Those ``[c, k+2]`` values are computed in one exp pass over the logits; the divergence,
    tempering and weights then run through autograd on the small tensors only, and the chain rule back to
    the logits is closed-form: ``d b_i / d z_j = [j = idx_i] - q_j``, ``d b_tail / d z_j = [j in tail]
    q_j / Q_tail - q_j``. So ``grad = e * (g_tail / S_tail - G / S)`` on tail tokens, ``-q G + g_i`` at the
    top-k tokens (``+ g_ce`` at the target), with ``e = exp(z - max)``, ``S = sum e``, ``G`` the sum of all
    bucket gradients. With tail samples (forward KL) the samples' log-probs are leaves like the top-k ones and
    there is no tail bucket; at T != 1 the leaves are log-probs of ``z / T`` (one exp pass over ``(z - max) / T``,
    a 1/T factor on the gradient) and 'ce' gets its T = 1 softmax from a second pass. Same values as the
    autograd path (tested in float64); about a third of its passes over ``[c, V]``. Returns
    ``(chunk_total, per_token, grad_logits or None)``.
    """
    c, v = logits.shape
    idx = targets.indices.to(logits.device, torch.long)
    k = idx.shape[1]
    sampled = k < v and "kd" in names and uses_tail_samples(targets, divergence, beta)
    has_tail = k < v and not sampled            # sampled tail: no bucket leaf, the samples stand for the tail
    z = logits.detach()
    # With tail samples at T != 1 the leaves are tempered log-probs log softmax(z / T) (the bucket path tempers
    # its k+1 buckets instead), so the exp pass runs on (z - max) / T and the gradient gets a 1/T factor.
    scale = _inv_temperature(temperature, c, z.device) if sampled and temperature is not None \
        and not bool((temperature == 1).all()) else None
    m = z.amax(dim=1, keepdim=True)                                              # [c, 1]
    z_top = z.gather(1, idx)                                                     # [c, k]
    if scale is None:
        e_top = (z_top - m).exp()
        e = torch.sub(z, m).exp_()                                               # [c, V] (becomes the grad)
    else:
        e_top = ((z_top - m) * scale).exp()
        e = torch.sub(z, m).mul_(scale).exp_()
    e.scatter_(1, idx, 0.0)
    s_tail = e.sum(dim=1)                                                        # exact tail sum, no cancellation
    s_all = e_top.sum(dim=1) + s_tail
    zs = z_top if scale is None else z_top * scale
    lse = (m if scale is None else m * scale).squeeze(1) + s_all.log()         # of z (or of z / T)
    bad = (s_tail < _TAIL_UNDERFLOW) if has_tail else torch.zeros(c, dtype=torch.bool, device=z.device)
    leaves = {"top": (zs - lse.unsqueeze(1)).requires_grad_(need_grad)}
    if has_tail:
        leaves["tail"] = (s_tail.clamp_min(torch.finfo(torch.float32).tiny).log() + m.squeeze(1) - lse
                          ).requires_grad_(need_grad)
    if "ce" in names or "clone" in names:                                        # never tempered
        tgt = target_ids.to(z.device, torch.long)
        lse1 = lse if scale is None else torch.logsumexp(z, dim=1)
        leaves["ce"] = (z.gather(1, tgt.unsqueeze(1)).squeeze(1) - lse1).requires_grad_(need_grad)
    if sampled:
        s_idx = targets.tail_indices.to(z.device, torch.long)
        z_s = z.gather(1, s_idx)
        leaves["samples"] = ((z_s if scale is None else z_s * scale) - lse.unsqueeze(1)).requires_grad_(need_grad)
    with torch.enable_grad():
        per: dict[str, torch.Tensor] = {}
        for name in names:
            if name == "kd" and sampled:
                per[name] = _t2(sampled_forward_kl(leaves["top"], leaves["samples"], targets, v,
                                                   None if scale is None else temperature), temperature, t2_scale)
            elif name == "kd":
                inv_t = _inv_temperature(temperature, c, z.device)
                q = temper_buckets(leaves["top"], leaves.get("tail"), v - k, inv_t)
                with torch.no_grad():
                    p = topk_teacher_buckets(targets.logprobs.to(z.device), v, temperature,
                                             targets.log_tail)
                per[name] = _t2(DIVERGENCES[divergence](p, q, beta), temperature, t2_scale)
            elif name in ("ce", "clone"):
                per[name] = -leaves["ce"]
            else:
                raise ConfigError(f"loss.channels.{name}", name, f"a channel computed from logits: {_LM}")
        chunk_total = combine_sum(per, weights, token_weight, channel_token_weight)
    if bad.any():      # rare: the student's tail under float32 range -> exact path for those rows
        rows = bad.nonzero().squeeze(1)
        sub = targets.select(rows)           # its tail samples (if any) are unused: bad rows use the bucket
        zr = z[rows].clone().requires_grad_(need_grad)
        with torch.enable_grad():
            per_r = channel_losses(zr, sub, target_ids[rows], None if temperature is None else temperature[rows],
                                   names, divergence, beta, t2_scale)
            ctw_r = None if channel_token_weight is None else {k_: v_[rows] for k_, v_ in channel_token_weight.items()}
            tot_r = combine_sum(per_r, weights, None if token_weight is None else token_weight[rows], ctw_r)
            keep = (~bad).float()
            mask_tot = combine_sum({n_: t * keep for n_, t in per.items()}, weights, token_weight,
                                   channel_token_weight)
        chunk_total = mask_tot + tot_r
        fixed = {}
        for n_, t in per.items():
            fixed[n_] = t.detach().clone()
            fixed[n_][rows] = per_r[n_].detach()
        per = fixed
    else:
        tot_r = None
        mask_tot = chunk_total
    if not need_grad:
        return chunk_total.detach(), {n_: t.detach() for n_, t in per.items()}, None
    names_l = list(leaves)
    grads = dict(zip(names_l, torch.autograd.grad(mask_tot, [leaves[n_] for n_ in names_l], allow_unused=True)))
    zero = torch.zeros(c, device=z.device)
    g_top = grads["top"] if grads["top"] is not None else torch.zeros_like(z_top)
    g_tail = grads.get("tail") if grads.get("tail") is not None else zero
    g_ce = grads.get("ce") if grads.get("ce") is not None else zero
    g_s = grads.get("samples") if grads.get("samples") is not None else None
    ce_apart = "ce" in leaves and scale is not None          # CE's softmax is at T = 1, the leaves' at T
    big_g = g_top.sum(dim=1) + g_tail + (0.0 if ce_apart else g_ce)
    if g_s is not None:
        big_g = big_g + g_s.sum(dim=1)
    inv_s = 1.0 / s_all
    c_tail = torch.where(s_tail > 0, g_tail / s_tail.clamp_min(torch.finfo(torch.float32).tiny), zero) \
        if has_tail else zero
    row = (c_tail - big_g * inv_s).unsqueeze(1)
    top_vals = e_top * (-big_g * inv_s).unsqueeze(1) + g_top
    if scale is not None:                                    # d(z / T) / dz = 1 / T
        row, top_vals = row * scale, top_vals * scale
    grad = e.mul_(row)                                                           # tail tokens
    grad.scatter_(1, idx, top_vals)                                              # top-k tokens
    if g_s is not None:                                      # samples are outside the top k; repeats accumulate
        grad.scatter_add_(1, s_idx, g_s if scale is None else g_s * scale)
    if ce_apart:
        grad.sub_(torch.sub(z, lse1.unsqueeze(1)).exp_().mul_(g_ce.unsqueeze(1)))
    if "ce" in leaves:
        grad.scatter_add_(1, tgt.unsqueeze(1), g_ce.unsqueeze(1))
    if tot_r is not None:
        (g_r,) = torch.autograd.grad(tot_r, zr)
        grad[rows] = g_r
    return chunk_total.detach(), {n_: t.detach() for n_, t in per.items()}, grad


def _centred_softmax_(x: torch.Tensor, floor: float | None = None):
    """In place on ``x`` (rows of logits): ``(xc, probs, lse)`` with ``xc = x - max`` per row (floored at ``floor``
    when given), ``probs = softmax(x)`` from one exp pass and ``lse`` the log of the centred normaliser, so
    ``log softmax(x) = xc - lse``."""
    xc = x.sub_(x.amax(dim=1, keepdim=True))
    if floor is not None:
        xc = xc.clamp_min_(floor)
    e = torch.exp(xc)
    s = e.sum(dim=1, keepdim=True)
    e.div_(s)
    return xc, e, s.log_()


def _dense_chunk(logits: torch.Tensor, teacher_logits: torch.Tensor, target_ids: torch.Tensor,
                 temperature: torch.Tensor | None, names, weights: dict[str, float],
                 token_weight: torch.Tensor | None, divergence: str, beta: float, t2_scale: bool, need_grad: bool,
                 channel_token_weight: dict[str, torch.Tensor] | None = None, teacher_owned: bool = False,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Channel losses of one chunk against a dense teacher (the online teacher's ``[c, V]`` logits) and their
    gradient w.r.t. the student's logits in closed form, no autograd over ``[c, V]``.

    With ``zs = z / T``, ``q = softmax(zs)``, ``p = softmax(t / T)`` (floored like :func:`dense_logprobs`):
    forward KL ``d/dzs = q * sum(p) - p``; any divergence written ``D(p, q)`` with ``g = dD/dq`` has
    ``d/dzs = q * (g - <q, g>)``: reverse KL ``g = log q - log p + 1``, TRL's generalized JSD
    ``g = (1 - beta) (log q - log m)`` with ``m = beta p + (1 - beta) q``, TV ``g = sign(q - p) / 2``; then
    ``d/dz = d/dzs / T`` and the T^2 factor. CE: ``softmax(z) - onehot(target)`` at T = 1. Each term is scaled
    by its channel weight times the token weight (the sum :func:`combine_sum` forms). Same values as the
    autograd path (tested in float64). Forward KL (the default, and gjsd at beta 0) takes one exp pass per side
    over ``[c, V]`` (no log-prob tensors; the KL from the two log-normalisers) and works in place: ``logits``
    is overwritten, and so are ``teacher_logits`` when ``teacher_owned`` (the online teacher's per-chunk logits,
    formed for this call). Returns ``(chunk_total, per_token, grad_logits or None)``."""
    c, v = logits.shape
    z = logits.detach().float()
    if temperature is not None and bool((torch.as_tensor(temperature) == 1).all()):
        temperature = None                            # T = 1 everywhere: the same values without the 1/T passes
    inv_t = _inv_temperature(temperature, c, z.device)
    kind = divergence
    if kind == "gjsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "gjsd" and beta == 1.0:
        kind = "reverse_kl"
    fast = kind == "forward_kl" and "kd" in names
    hard = [n_ for n_ in names if n_ in ("ce", "clone")]       # NLL of the teacher's token, T = 1
    zs = z if inv_t is None else z * inv_t
    if fast:
        # Forward KL from one exp pass per side: zc = zs - max, q = exp(zc) / S_q, lse_q = log S_q (the same
        # for the teacher, whose centred logits are floored at LOGP_FLOOR like dense_logprobs' log-probs; the
        # floor moves only probabilities below float32's normal range). KL = <p, lp - lq> = <p, tc - zc> -
        # lse_p + lse_q, since sum p = 1. ``zs`` is this chunk's own logits buffer (``logits`` is overwritten;
        # at T != 1 its tempered copy, and ``z`` stays raw for CE's T = 1 softmax): centred in place.
        zc, q, lse_q = _centred_softmax_(zs)
        lq = None
    else:
        lq = torch.log_softmax(zs, dim=-1)
        q = lq.exp()
    per: dict[str, torch.Tensor] = {}
    grad = None
    tw = None if token_weight is None else token_weight.to(z.device, torch.float32)

    def coeff(name):            # [c, 1] weight of d loss_name / d logits in the chunk total
        a = torch.full((c,), float(weights.get(name, 0.0)), dtype=torch.float32, device=z.device)
        if channel_token_weight is not None and name in channel_token_weight:
            a = a * channel_token_weight[name].to(z.device, torch.float32)
        return (a if tw is None else a * tw).unsqueeze(1)

    unknown = [n_ for n_ in names if n_ not in ("kd", "ce", "clone")]
    if unknown:
        raise ConfigError(f"loss.channels.{unknown[0]}", unknown[0], f"a channel computed from logits: {_LM}")
    if "kd" in names:
        tl = teacher_logits.to(z.device, torch.float32)
        if fast:
            ts = tl * inv_t if inv_t is not None else (tl if teacher_owned or tl is not teacher_logits else tl.clone())
            tc, p, lse_p = _centred_softmax_(ts, floor=LOGP_FLOOR)
            lp = None
        else:
            lp = torch.log_softmax(tl if inv_t is None else tl * inv_t, dim=-1).clamp_min_(LOGP_FLOOR)
            p = lp.exp()
        t2 = None
        if temperature is not None and t2_scale:
            t = torch.as_tensor(temperature, dtype=torch.float32, device=z.device).expand(c)
            t2 = t * t
        k = None
        if need_grad:
            k = coeff("kd")
            if t2 is not None:
                k = k * t2.unsqueeze(1)
            if inv_t is not None:
                k = k * inv_t
        if kind == "forward_kl":
            d = tc.sub_(zc)                                          # lp - lq + (lse_p - lse_q), in place
            val = (torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).view(c) - lse_p.view(c) + lse_q.view(c))
            del d, tc
            if need_grad:                                            # (q - p) * k (sum p = 1)
                hard_q = bool(hard) and inv_t is None
                grad = (torch.sub(q, p) if hard_q else q.sub_(p)).mul_(k)   # q is reused unless CE needs it
        else:
            if kind == "reverse_kl":
                g = torch.sub(lq, lp)
                val = (q * g).sum(-1)
                g.add_(1.0)
            elif kind == "gjsd":
                if not 0.0 <= beta <= 1.0:
                    raise ConfigError("loss.beta", beta, "a number in [0, 1]")
                lm = torch.logsumexp(torch.stack([lq + math.log1p(-beta), lp + math.log(beta)]), dim=0)
                val = beta * (p * (lp - lm)).sum(-1) + (1.0 - beta) * (q * (lq - lm)).sum(-1)
                g = torch.sub(lq, lm).mul_(1.0 - beta)
                del lm
            elif kind == "tv":
                val = 0.5 * (p - q).abs().sum(-1)
                g = torch.sign(q - p).mul_(0.5)
            else:
                raise ConfigError("loss.divergence", divergence, f"one of {sorted(DIVERGENCES)}")
            if need_grad:                                            # q * (g - <q, g>) * k
                g.sub_((q * g).sum(-1, keepdim=True)).mul_(q).mul_(k)
                grad = g
            del g
        per["kd"] = val if t2 is None else val * t2
        del lp, p
    if hard:
        tgt = target_ids.to(z.device, torch.long)
        if lq is None and inv_t is None:                   # fast path: log q at the target from zc and lse_q
            l1 = None
            nll = lse_q.view(c) - zc.gather(1, tgt.unsqueeze(1)).squeeze(1)
        else:
            l1 = lq if inv_t is None else torch.log_softmax(z, dim=-1)
            nll = -l1.gather(1, tgt.unsqueeze(1)).squeeze(1)
        for n_ in hard:
            per[n_] = nll
        if need_grad:                                                # (softmax(z) - onehot) * k
            k = coeff(hard[0]) if len(hard) == 1 else coeff(hard[0]) + coeff(hard[1])
            g = (q if inv_t is None else l1.exp()) * k
            g.scatter_add_(1, tgt.unsqueeze(1), -k)
            grad = g if grad is None else grad.add_(g)
            del g
    if need_grad and grad is None:
        grad = torch.zeros_like(z)
    chunk_total = combine_sum(per, weights, token_weight, channel_token_weight)
    return chunk_total.detach(), per, grad


class _FusedLMHeadLoss(torch.autograd.Function):
    """(total 0-dim, per-token [C, N]) with d total / d(h, W) computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, w, teacher, target_ids, token_weight, temperature, cfg, channel_token_weight=None):
        names, weights, divergence, beta, t2_scale, chunk, want_grad = cfg
        n, dev = h.shape[0], h.device
        cd = _compute_dtype(h, w)
        need_h, need_w = want_grad and h.requires_grad, want_grad and w.requires_grad
        teacher_rows = _teacher_slicer(teacher, cd)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        per_token = torch.zeros(len(names), n, dtype=torch.float32, device=dev)
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
        with torch.autocast(dev.type, enabled=False):
            wc = w.detach().to(cd)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                hc = h[s:e].detach().to(cd)
                logits = (hc @ wc.T).float()                                       # [c, V]
                tw = None if token_weight is None else token_weight[s:e]
                temp = None if temperature is None else temperature[s:e]
                ctw = None if channel_token_weight is None else {k_: v_[s:e] for k_, v_ in channel_token_weight.items()}
                if isinstance(teacher, TopKTargets) and CLOSED_FORM:               # closed-form gradient
                    chunk_total, per, g = _topk_chunk(logits, teacher_rows(s, e), target_ids[s:e], temp, names,
                                                      weights, tw, divergence, beta, t2_scale, need_h or need_w,
                                                      ctw)
                elif not isinstance(teacher, TopKTargets) and CLOSED_FORM:          # dense / online teacher
                    chunk_total, per, g = _dense_chunk(logits, teacher_rows(s, e), target_ids[s:e], temp, names,
                                                       weights, tw, divergence, beta, t2_scale, need_h or need_w,
                                                       ctw, teacher_owned=isinstance(teacher, TeacherHidden))
                else:                                                              # autograd per chunk
                    if need_h or need_w:
                        logits.requires_grad_(True)
                    with torch.enable_grad():
                        per = channel_losses(logits, teacher_rows(s, e), target_ids[s:e], temp, names,
                                             divergence, beta, t2_scale)
                        chunk_total = combine_sum(per, weights, tw, ctw)
                    g = torch.autograd.grad(chunk_total, logits)[0] if need_h or need_w else None
                if g is not None:
                    g = g.to(cd)
                    if need_h:
                        grad_h[s:e] = g @ wc
                    if need_w:
                        if cd == torch.float32:
                            grad_w.addmm_(g.T, hc)
                        else:
                            grad_w.add_(g.T @ hc)                                  # low-precision matmul,
                                                                                   # fp32 accumulation
                total += chunk_total.detach()
                for i, name in enumerate(names):
                    per_token[i, s:e] = per[name].detach()
                del logits, per, chunk_total, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, w.dtype                  # gradients go back in these dtypes
        ctx.mark_non_differentiable(per_token)
        return total, per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_total).to(ctx.h_dtype)
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None


def _validate(h_s, w_s, target_ids, token_weight, temperature, chunk_size, divergence):
    n = h_s.shape[0]
    if h_s.dim() != 2 or w_s.dim() != 2 or h_s.shape[1] != w_s.shape[1]:
        raise ValueError(f"h_s {tuple(h_s.shape)} and W_s {tuple(w_s.shape)}: expected [N, H] and [V, H]")
    for name, t in (("target_ids", target_ids), ("token_weight", token_weight), ("temperature", temperature)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name}: expected shape [{n}], got {tuple(t.shape)}")
    if chunk_size < 1:
        raise ConfigError("loss.chunk_size", chunk_size, "an integer >= 1")
    if divergence not in DIVERGENCES:
        raise ConfigError("loss.divergence", divergence, f"one of {sorted(DIVERGENCES)}")


def fused_distill_loss(h_s: torch.Tensor, W_s: torch.Tensor, teacher: TopKTargets | TeacherHidden | torch.Tensor,
                       target_ids: torch.Tensor, token_weight: torch.Tensor | None,
                       temperature: torch.Tensor | None, channels: dict[str, float], divergence: str,
                       beta: float, chunk_size: int, *, t2_scale: bool = True,
                       channel_token_weight: dict[str, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Chunked lm-head + channel losses.

    Args:
        h_s: ``[N, H]`` student final hidden states at the prediction positions (differentiable).
        W_s: ``[V, H]`` student output embedding (differentiable; may be tied to the input embedding).
        teacher: :class:`TopKTargets` (N rows), :class:`TeacherHidden` (``hidden [N, Ht]``, ``weight [V, Ht]``)
            or dense teacher logits ``[N, V]``.
        target_ids: ``[N]`` long, the teacher's tokens (for 'ce').
        token_weight: ``[N]`` float or None (ones); temperature: ``[N]`` float or None (T = 1).
        channels: lm-head channel -> weight (``kd``, ``ce``); zero-weight channels are computed and reported
            but do not contribute.
        divergence, beta: ``loss.divergence`` / ``loss.beta``; chunk_size: rows of logits per chunk.
        t2_scale: multiply the KD term by T^2 (Hinton).
        channel_token_weight: channel -> ``[N]`` per-token share of that channel (S2.5 level 1, by domain;
            :func:`distillgate.weighting.domain_channel_weights`), or None (all 1).

    Returns:
        ``(total_sum, per_token)``: 0-dim float32 ``sum_n token_weight[n] * sum_c w_c * s_c[n] * loss_c[n]``
        (differentiable w.r.t. h_s and W_s) and ``{channel: [N] float32}`` detached.
    """
    _validate(h_s, W_s, target_ids, token_weight, temperature, chunk_size, divergence)
    weights = lm_head_channels(channels)
    other = sorted(set(channels) - set(weights))
    if other:
        raise ConfigError("loss.channels", other, f"channels computed from logits here: {_LM}")
    names = tuple(weights)
    want_grad = torch.is_grad_enabled() and (h_s.requires_grad or W_s.requires_grad)
    cfg = (names, weights, divergence, float(beta), t2_scale, int(chunk_size), want_grad)
    ctw = None
    if channel_token_weight:
        ctw = {k: v.to(h_s.device, torch.float32) for k, v in channel_token_weight.items() if k in weights}
        for k, v in ctw.items():
            if tuple(v.shape) != (h_s.shape[0],):
                raise ValueError(f"channel_token_weight[{k!r}]: expected shape [{h_s.shape[0]}], got {tuple(v.shape)}")
    total, stacked = _FusedLMHeadLoss.apply(h_s, W_s, teacher, target_ids, token_weight, temperature, cfg, ctw)
    return total, {name: stacked[i] for i, name in enumerate(names)}


def unfused_distill_loss(h_s: torch.Tensor, W_s: torch.Tensor, teacher, target_ids: torch.Tensor,
                         token_weight: torch.Tensor | None, temperature: torch.Tensor | None,
                         channels: dict[str, float], divergence: str, beta: float, *, t2_scale: bool = True,
                         channel_token_weight: dict[str, torch.Tensor] | None = None,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain reference: full ``[N, V]`` logits through autograd (same maths, same return values as
    :func:`fused_distill_loss`). For tests and benchmarks; peaks at several ``[N, V]`` float32 tensors."""
    _validate(h_s, W_s, target_ids, token_weight, temperature, 1, divergence)
    weights = lm_head_channels(channels)
    logits = (h_s @ W_s.T).float()
    cd = _compute_dtype(h_s, W_s)
    t = _teacher_slicer(teacher, cd)(0, h_s.shape[0])
    per = channel_losses(logits, t, target_ids, temperature, tuple(weights), divergence, beta, t2_scale)
    total = combine_sum(per, weights, token_weight, channel_token_weight)
    return total, {k: v.detach() for k, v in per.items()}
