"""Chunked fused lm-head + distillation loss: full-vocabulary logits never exist for all N positions.

The student's logits ``h_s @ W_s.T`` (``[N, V]``: 1024 x 49152 fp32 is 192 MiB, and autograd keeps several
such tensors alive until backward) are formed ``chunk_size`` rows at a time. For each chunk the forward pass
computes the channel losses, combines them with :func:`distillgate.weighting.combine_sum`, and immediately
back-propagates to the chunk's logits; the gradients w.r.t. ``h_s`` (its rows) and ``W_s`` (accumulated in
float32) are computed right there with two matmuls and the chunk's logits are freed (Liger-kernel style).
Backward then only scales the stored gradients by the incoming scalar. Cost: the same three matmuls as the
unfused path; memory: one chunk's logits graph plus ``[N, H]`` and ``[V, H]`` float32 gradient buffers.

Mixed precision: under ``torch.autocast`` (or with bf16 inputs) the matmuls run in the autocast dtype, the
softmax/losses in float32, exactly what autocast does for the unfused ``F.linear`` + ``float()`` path.
The temperature and token weights are constants (no gradient flows to them).

Teacher: :class:`TopKTargets` rows are sliced per chunk; for :class:`TeacherHidden` the teacher's logits are
formed per chunk from ``hidden @ weight.T`` under no_grad.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from ..targets import TeacherHidden, TopKTargets
from ..weighting import CHANNELS, check_channels, combine_sum
from .divergence import DIVERGENCES, cross_entropy, divergence as divergence_fn

LM_HEAD = "lm_head"
"""``Channel.computed_by`` value of the channels this module computes (kd, ce)."""


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
        if name == "kd":
            out[name] = divergence_fn(divergence, logits, teacher, beta=beta, temperature=temperature,
                                      t2_scale=t2_scale)
        elif name == "ce":
            out[name] = cross_entropy(logits, target_ids)
        else:
            raise ConfigError(f"loss.channels.{name}", name, f"a channel computed from logits: ['ce', 'kd']")
    return out


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


def _teacher_slicer(teacher, cd: torch.dtype):
    """``rows(s, e)`` -> the teacher for positions s:e (TopKTargets slice, or dense float32 logits)."""
    if isinstance(teacher, TopKTargets):
        def topk_rows(s, e):
            rows = {"indices": teacher.indices[s:e], "logprobs": teacher.logprobs[s:e]}
            if getattr(teacher, "log_tail", None) is not None:                 # optional exact tail [N]
                rows["log_tail"] = teacher.log_tail[s:e]
            return dataclasses.replace(teacher, **rows)
        return topk_rows
    if isinstance(teacher, TeacherHidden):
        tw = teacher.weight.detach().to(cd)

        def rows(s, e):
            with torch.no_grad():
                return (teacher.hidden[s:e].detach().to(cd) @ tw.T).float()
        return rows
    if isinstance(teacher, torch.Tensor):
        return lambda s, e: teacher[s:e].detach()
    raise TypeError(f"teacher: expected TopKTargets, TeacherHidden or dense logits, got {type(teacher).__name__}")


class _FusedLMHeadLoss(torch.autograd.Function):
    """(total 0-dim, per-token [C, N]) with d total / d(h, W) computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, w, teacher, target_ids, token_weight, temperature, cfg):
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
                if need_h or need_w:
                    logits.requires_grad_(True)
                with torch.enable_grad():
                    per = channel_losses(logits, teacher_rows(s, e), target_ids[s:e],
                                         None if temperature is None else temperature[s:e], names,
                                         divergence, beta, t2_scale)
                    tw = None if token_weight is None else token_weight[s:e]
                    chunk_total = combine_sum(per, weights, tw)
                if need_h or need_w:
                    (g,) = torch.autograd.grad(chunk_total, logits)
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
                del logits, per, chunk_total
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, w.dtype                  # gradients go back in these dtypes
        ctx.mark_non_differentiable(per_token)
        return total, per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_total).to(ctx.h_dtype)
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None


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

    Returns:
        ``(total_sum, per_token)``: 0-dim float32 ``sum_n token_weight[n] * sum_c w_c * loss_c[n]``
        (differentiable w.r.t. h_s and W_s) and ``{channel: [N] float32}`` detached.
    """
    _validate(h_s, W_s, target_ids, token_weight, temperature, chunk_size, divergence)
    weights = lm_head_channels(channels)
    other = sorted(set(channels) - set(weights))
    if other:
        raise ConfigError("loss.channels", other, "channels computed from logits here: ['ce', 'kd']")
    names = tuple(weights)
    want_grad = torch.is_grad_enabled() and (h_s.requires_grad or W_s.requires_grad)
    cfg = (names, weights, divergence, float(beta), t2_scale, int(chunk_size), want_grad)
    total, stacked = _FusedLMHeadLoss.apply(h_s, W_s, teacher, target_ids, token_weight, temperature, cfg)
    return total, {name: stacked[i] for i, name in enumerate(names)}


def unfused_distill_loss(h_s: torch.Tensor, W_s: torch.Tensor, teacher, target_ids: torch.Tensor,
                         token_weight: torch.Tensor | None, temperature: torch.Tensor | None,
                         channels: dict[str, float], divergence: str, beta: float, *, t2_scale: bool = True,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain reference: full ``[N, V]`` logits through autograd (same maths, same return values as
    :func:`fused_distill_loss`). For tests and benchmarks; peaks at several ``[N, V]`` float32 tensors."""
    _validate(h_s, W_s, target_ids, token_weight, temperature, 1, divergence)
    weights = lm_head_channels(channels)
    logits = (h_s @ W_s.T).float()
    cd = _compute_dtype(h_s, W_s)
    t = _teacher_slicer(teacher, cd)(0, h_s.shape[0])
    per = channel_losses(logits, t, target_ids, temperature, tuple(weights), divergence, beta, t2_scale)
    total = combine_sum(per, weights, token_weight)
    return total, {k: v.detach() for k, v in per.items()}
