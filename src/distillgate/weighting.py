"""Loss weights (S2.5) and the ONE place channel losses are combined.

Three levels of weights, all multiplicative per prediction position ``[N]``:

1. *domain* (S2.5.1): each sample's business domain scales its tokens (``loss.domain_weights``, default 1)
   and each channel's share of them (``loss.domain_channel_shares`` ``{domain: {channel: share}}``, default 1:
   :func:`domain_channel_weights`, applied per channel in :func:`combine_sum`);
2. *difficulty* (S2.5.2): tokens where the teacher is unsure (low top-1 probability or high normalised
   entropy) are down-weighted to ``floor + (1 - floor) * confidence``;
3. *sample* (S4.3): hard-pool samples carry ``sample_weight`` 3.0 (from the batch).

The stability level (S2.5.3) raises a *channel* weight when its loss has plateaued; the strategy engine
decides it between rounds with :func:`plateau_boost`.

Channels are registered in :data:`CHANNELS` with what they need, so later channels (hidden-state, attention,
response cloning) plug in by registering here; a config naming an unregistered channel fails loudly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Channel:
    """A loss channel: its config name, what it measures, the inputs it needs (e.g. 'teacher_topk' or
    'teacher_hidden', 'target_ids', 'hidden_states') and which code computes it ('lm_head': the fused
    lm-head loss in :mod:`distillgate.losses.fused`)."""

    name: str
    description: str
    needs: tuple[str, ...]
    computed_by: str


CHANNELS: dict[str, Channel] = {}


def register_channel(name: str, description: str, needs: Sequence[str], computed_by: str) -> Channel:
    """Add a channel to :data:`CHANNELS` (a name may be registered once)."""
    if name in CHANNELS:
        raise ValueError(f"channel {name!r} is already registered")
    CHANNELS[name] = ch = Channel(name, description, tuple(needs), computed_by)
    return ch


register_channel("kd", "token-level divergence (loss.divergence) between teacher and student next-token "
                       "distributions, at the per-token temperature (S2.1)",
                 needs=("teacher_topk|teacher_hidden",), computed_by="lm_head")
register_channel("ce", "cross-entropy of the student on the teacher's response tokens (hard labels, T=1)",
                 needs=("target_ids",), computed_by="lm_head")
register_channel("clone", "response behaviour cloning (S2.4): sequence log-likelihood of the teacher's sampled "
                          "answers under the diversity mask and coherence weights, plus a conciseness term "
                          "(loss.clone)", needs=("teacher_samples",), computed_by="lm_head")
register_channel("attn", "key-head attention alignment (S2.2): KL over keys per query of the teacher's key heads "
                         "(found by attention rollout) and their output-norm pattern, through the layer map",
                 needs=("teacher_attention",), computed_by="attention")
register_channel("feature", "gated intermediate adapters (S2.3): the teacher's matching block feature injected "
                            "through an annealed gate, and the student's block outputs aligned with it",
                 needs=("teacher_features",), computed_by="adapters")


def check_channels(channel_weights: dict[str, float], field: str = "loss.channels") -> None:
    """Raise ConfigError naming any unknown channel (and the known ones) or a negative/non-finite weight."""
    for name, w in channel_weights.items():
        if name not in CHANNELS:
            raise ConfigError(f"{field}.{name}", name, f"a registered channel, one of {sorted(CHANNELS)}")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"{field}.{name}", w, "a finite weight >= 0")


def combine_sum(per_token: dict[str, torch.Tensor], channel_weights: dict[str, float],
                token_weight: torch.Tensor | None,
                channel_token_weight: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``sum_n token_weight[n] * sum_c w_c * s_c[n] * loss_c[n]`` as a differentiable 0-dim float32 tensor.

    ``per_token`` maps channel -> ``[N]``; every channel with a non-zero weight must be present (zero-weight
    channels are skipped, so a NaN in an unused channel cannot poison the total). ``token_weight`` ``[N]`` or
    None (all 1). ``channel_token_weight``: channel -> ``[N]`` per-token share ``s_c`` (S2.5 level 1, the
    domain's share of that channel, :func:`domain_channel_weights`); a channel not in it has ``s_c = 1``.
    With N = 0 the result is an exact 0.
    """
    check_channels(channel_weights)
    total = None
    for name, w in channel_weights.items():
        if w == 0:
            continue
        if name not in per_token:
            raise ConfigError(f"loss.channels.{name}", w,
                              f"a channel that was computed for this batch (computed: {sorted(per_token)})")
        term = per_token[name].float() * w
        if channel_token_weight is not None and name in channel_token_weight:
            term = term * channel_token_weight[name].to(term.device, torch.float32)
        total = term if total is None else total + term
    if total is None:                                                    # every weight zero: validated away
        raise ConfigError("loss.channels", dict(channel_weights), "at least one channel with weight > 0")
    if token_weight is not None:
        total = total * token_weight.to(total.device, torch.float32)
    return total.sum()


def channel_terms(per_token: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-token mean of each channel's (unweighted) loss, for logging; 0.0 for an empty batch."""
    return {name: (float(t.detach().float().mean()) if t.numel() else 0.0) for name, t in per_token.items()}


def combine(per_token: dict[str, torch.Tensor], channel_weights: dict[str, float],
            token_weight: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """``(total_sum, terms)``: the weighted sum of :func:`combine_sum` and every channel's per-token mean."""
    return combine_sum(per_token, channel_weights, token_weight), channel_terms(per_token)


# ---------------------------------------------------------------------------------- token weights

def domain_weight(domains: Sequence[str], weights: dict[str, float]) -> torch.Tensor:
    """Per-sample domain weight ``[B]`` float32: ``weights.get(domain, 1.0)``."""
    return torch.tensor([float(weights.get(d, 1.0)) for d in domains], dtype=torch.float32)


def check_domain_channel_shares(shares: dict[str, dict[str, float]],
                                field: str = "loss.domain_channel_shares") -> None:
    """Raise ConfigError naming an unknown channel or a negative / non-finite share in ``{domain: {channel:
    share}}`` (domains are checked by the config)."""
    for domain, per in shares.items():
        check_channels(per, f"{field}.{domain}")


def domain_channel_weights(domains: Sequence[str], shares: dict[str, dict[str, float]],
                           channels: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-sample share of each channel ``{channel: [B]}`` float32 from ``loss.domain_channel_shares``
    (S2.5 level 1): ``shares[domain][channel]``, 1.0 where a domain or a channel is not listed. Only the
    channels some listed domain names are returned (the others are 1 everywhere)."""
    named = {c for per in shares.values() for c in per}
    return {c: torch.tensor([float(shares.get(d, {}).get(c, 1.0)) for d in domains], dtype=torch.float32)
            for c in channels if c in named}


def difficulty_weight(confidence: torch.Tensor, floor: float) -> torch.Tensor:
    """``floor + (1 - floor) * confidence`` ``[N]`` float32; confidence ``[N]`` in [0, 1] (teacher top-1
    probability, or 1 - normalised entropy; see :func:`distillgate.losses.stats.teacher_token_stats`)."""
    if not 0.0 <= floor <= 1.0:
        raise ConfigError("loss.difficulty_floor", floor, "a number in [0, 1]")
    return floor + (1.0 - floor) * confidence.float().clamp(0.0, 1.0)


def sample_weight(values: torch.Tensor | Sequence[float] | None, batch_size: int) -> torch.Tensor:
    """Per-sample weight ``[B]`` float32 from the batch's ``sample_weight`` (1.0; 3.0 for hard-pool samples,
    S4.3), or all ones when absent. Negative or non-finite weights are refused."""
    if values is None:
        return torch.ones(batch_size, dtype=torch.float32)
    w = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if w.numel() != batch_size:
        raise ValueError(f"batch['sample_weight']: expected {batch_size} values, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"batch['sample_weight']: weights must be finite and >= 0, got {w.tolist()}")
    return w


def token_weights(b_idx: torch.Tensor, per_sample: Sequence[torch.Tensor],
                  per_token: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Product of per-sample weights ``[B]`` broadcast to tokens via ``b_idx`` ``[N]`` and per-token weights
    ``[N]``: the ``[N]`` float32 token weight handed to :func:`combine`."""
    w = torch.ones(b_idx.shape[0], dtype=torch.float32, device=b_idx.device)
    for s in per_sample:
        w = w * s.to(b_idx.device, torch.float32)[b_idx]
    for t in per_token:
        w = w * t.to(b_idx.device, torch.float32)
    return w


# ---------------------------------------------------------------------------------- stability (S2.5.3)

def plateau_boost(history: Sequence[float], threshold: float, rounds: int = 3, factor: float = 1.5) -> float:
    """Weight multiplier for a channel whose loss has plateaued: ``factor`` if each of the last ``rounds``
    round-to-round relative changes ``|h[i] - h[i-1]| / max(|h[i-1]|, 1e-12)`` is below ``threshold``,
    else 1.0. Needs ``rounds + 1`` values of ``history`` (one loss per round, oldest first); fewer -> 1.0."""
    if rounds < 1 or threshold < 0 or factor <= 0:
        raise ValueError(f"plateau_boost: need rounds >= 1, threshold >= 0, factor > 0 "
                         f"(got {rounds}, {threshold}, {factor})")
    if len(history) < rounds + 1:
        return 1.0
    tail = [float(h) for h in history[-(rounds + 1):]]
    if not all(math.isfinite(h) for h in tail):
        return 1.0
    slopes = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(tail[:-1], tail[1:])]
    return float(factor) if all(s < threshold for s in slopes) else 1.0
