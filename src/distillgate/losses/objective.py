"""The distillation objective: student forward to final hidden states -> teacher targets -> temperature and
token weights -> fused chunked lm-head loss -> channels combined in :mod:`distillgate.weighting`.

``DistillObjective(loss_spec, teacher)(model, batch) -> LossOutput`` is the trainer's loss function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, runtime_checkable

import torch

from ..config import LossSpec
from ..errors import ConfigError, InputError
from ..targets import TeacherHidden, TopKTargets, prediction_positions
from ..weighting import (CHANNELS, channel_terms, check_channels, check_domain_channel_shares, combine_sum,
                         difficulty_weight, domain_channel_weights, domain_weight, sample_weight,
                         token_weights)
from .fused import LM_HEAD, fused_distill_loss
from .stats import teacher_token_stats
from .temperature import temperatures


@dataclass
class LossOutput:
    """One micro-batch's loss.

    total_sum: differentiable 0-dim float32, the sum over the N prediction positions of the weighted
        per-token loss (the trainer divides by the loss tokens of the whole accumulation window).
    n_tokens: N, the number of prediction positions.
    terms: per-token mean of each channel's unweighted loss (for logging; 0.0 when N = 0).
    per_token: channel -> ``[N]`` float32, detached.
    aux: ``temperature`` and ``token_weight`` ``[N]`` float32, detached (for logging/attribution).
    """

    total_sum: torch.Tensor
    n_tokens: int
    terms: dict[str, float]
    per_token: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class TeacherProvider(Protocol):
    """``provider(batch)`` -> the teacher at the batch's N prediction positions (same order)."""

    def __call__(self, batch: Mapping[str, Any]) -> TopKTargets | TeacherHidden: ...


_UNSUPPORTED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def output_head(model: torch.nn.Module) -> torch.Tensor:
    """The student's lm-head weight ``[V, H]``; refuses heads whose logits are not ``hidden @ W.T``."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise InputError(f"{type(model).__name__}: no output embedding (lm_head) found")
    if getattr(head, "bias", None) is not None:
        raise InputError(f"{type(model).__name__}: lm_head has a bias; the fused loss supports bias-free heads")
    cfg = getattr(model, "config", None)
    for attr in _UNSUPPORTED_HEAD:
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise InputError(f"{type(model).__name__}: config.{attr}={getattr(cfg, attr)!r} changes the logits "
                             f"after the lm-head; the fused loss does not model it")
    return head.weight


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Final hidden states ``[B, T, H]`` of the model's decoder body (after its last norm)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if body is None:
        raise InputError(f"{type(model).__name__}: cannot find the decoder body (get_decoder() or .model)")
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class DistillObjective:
    """``objective(model, batch) -> LossOutput`` for the channels of ``loss_spec``: kd, ce and clone (the fused
    lm-head loss) and, with ``side``, attn and feature (:mod:`distillgate.side_channels`), summed in
    :func:`combine_sum`.

    Args:
        loss_spec: ``distillgate.config.LossSpec``.
        teacher: a :class:`TeacherProvider` (cached top-k targets or online teacher hidden states).
        vocab_size: the tokenizer's vocabulary; the student's lm-head must have at least this many rows.
        t2_scale: multiply the KD channel by T^2 (Hinton); on by default.
        confidence: teacher confidence used by difficulty weighting: 'top1' (top-1 probability) or
            'entropy' (1 - normalised entropy).
        clone: the clone channel's teacher side (:class:`distillgate.losses.clone.CloneProvider`); required
            when ``loss.channels`` names clone.
        side: the student side of attn / feature (``side_channels.StudentChannels``); the teacher provider then
            returns ``teacher_side.ChannelTargets``.
    """

    def __init__(self, loss_spec: LossSpec, teacher: TeacherProvider, vocab_size: int | None = None, *,
                 t2_scale: bool = True, confidence: Literal["top1", "entropy"] = "top1", clone=None, side=None):
        check_channels(loss_spec.channels)
        check_domain_channel_shares(loss_spec.domain_channel_shares)
        # side: the student side of the attn / feature channels (side_channels.StudentChannels), or None
        side_names = tuple(getattr(side, "names", ()))
        pending = sorted(k for k in loss_spec.channels if CHANNELS[k].computed_by != LM_HEAD and k not in side_names)
        if pending:
            raise ConfigError("loss.channels", pending, f"channels this objective computes: "
                                                        f"{sorted(['ce', 'clone', 'kd', *side_names])} (attn / "
                                                        f"feature need their teacher data: "
                                                        f"side_channels.ChannelSetup)")
        self.side = side
        if confidence not in ("top1", "entropy"):
            raise ConfigError("confidence", confidence, "'top1' or 'entropy'")
        if "clone" in loss_spec.channels and clone is None:
            raise ConfigError("loss.channels.clone", loss_spec.channels["clone"],
                              "a channel with its teacher data: several sampled teacher answers per prompt "
                              "(data.samples_per_prompt >= 2, data.gen_temperature > 0) turned into clone rows "
                              "(distillgate.data.samples.build_clone_rows)")
        self.spec, self.teacher, self.vocab_size, self.clone = loss_spec, teacher, vocab_size, clone
        self.t2_scale, self.confidence = t2_scale, confidence

    def online_teacher_model(self) -> torch.nn.Module | None:
        """The teacher module this objective runs at training time when it is the plain online provider
        (:class:`distillgate.targets.OnlineTeacher`), else None (cached targets; the attn / feature online
        provider, whose per-call hooks a compiled layer would not run). ``train.compile`` compiles it."""
        from ..targets import OnlineTeacher

        return self.teacher.model if isinstance(self.teacher, OnlineTeacher) else None

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        spec = self.spec
        input_ids = batch["input_ids"]
        bsz = input_ids.shape[0]
        weight = output_head(model)
        vocab = weight.shape[0]
        if self.vocab_size is not None and vocab < self.vocab_size:       # padded heads (more rows) are fine
            raise InputError(f"student lm-head has {vocab} rows but the vocabulary has {self.vocab_size} "
                             f"tokens")
        b_idx, t_idx = prediction_positions(batch)
        b_idx, t_idx = b_idx.to(input_ids.device), t_idx.to(input_ids.device)
        n = int(b_idx.shape[0])
        teacher, side_data = self._teacher(batch, n, vocab)
        if self.side is None:
            hidden = decoder_hidden(model, input_ids, batch.get("attention_mask"))[b_idx, t_idx]  # [N, H]
        else:                                    # attn / feature: hooks capture (and inject) during the forward
            with self.side.capture(model, side_data, b_idx, t_idx):
                hidden = decoder_hidden(model, input_ids, batch.get("attention_mask"))[b_idx, t_idx]
        target_ids = input_ids[b_idx, t_idx + 1]

        stats = None
        if spec.temperature.policy == "entropy" or spec.difficulty_weighting:
            stats = teacher_token_stats(teacher, vocab, spec.chunk_size)
        temp = temperatures(spec.temperature, b_idx, bsz, batch.get("complexity"),
                            None if stats is None else stats.norm_entropy)
        per_tok = []
        if spec.difficulty_weighting:
            conf = stats.top1 if self.confidence == "top1" else 1.0 - stats.norm_entropy
            per_tok.append(difficulty_weight(conf, spec.difficulty_floor))
        domains = batch.get("domains")
        per_sample = [sample_weight(batch.get("sample_weight"), bsz)]
        if domains is not None and spec.domain_weights:
            per_sample.append(domain_weight(domains, spec.domain_weights))
        tw = token_weights(b_idx, per_sample, per_tok)
        shares = self.channel_shares(batch, b_idx)
        cb = None
        if self.clone is not None and "clone" in spec.channels:
            cb = self.clone(batch)
            if cb.mask.shape[0] != n:
                raise InputError(f"clone provider gave {cb.mask.shape[0]} positions, the batch has {n}")
            shares = dict(shares or {})
            shares["clone"] = cb.mask.to(hidden.device) * shares.get("clone", 1.0)

        head = {k: w for k, w in spec.channels.items() if CHANNELS[k].computed_by == LM_HEAD}
        if any(w > 0 for w in head.values()):
            total, per_token = fused_distill_loss(hidden, weight, teacher, target_ids, tw, temp, head,
                                                  spec.divergence, spec.beta, spec.chunk_size,
                                                  t2_scale=self.t2_scale, channel_token_weight=shares)
            if cb is not None:
                total, per_token = self._concise(total, per_token, cb, hidden, weight, b_idx, batch, per_sample,
                                                 shares)
        else:                                  # only side channels weigh (e.g. an attn-only ablation)
            total, per_token = hidden.sum() * 0.0, {}
        if self.side is not None:
            extra = self.side.losses(model, side_data, b_idx, t_idx, batch.get("attention_mask"))
            weights = {k: spec.channels[k] for k in extra}
            if any(w > 0 for w in weights.values()):
                total = total + combine_sum(extra, weights, tw, shares)   # domain shares (S2.5.1) too
            per_token.update({k: v.detach() for k, v in extra.items()})
        return LossOutput(total_sum=total, n_tokens=n, terms=channel_terms(per_token), per_token=per_token,
                          aux={"temperature": temp.detach(), "token_weight": tw.detach()})

    def _concise(self, total, per_token, cb, hidden, weight, b_idx, batch, per_sample, shares):
        """The clone channel's report (masked NLL) and its conciseness term (:mod:`distillgate.losses.clone`),
        added to ``total`` with the clone weight, the sample's weight (hard pool, domain) and its domain's
        clone share."""
        from .clone import concise_penalty

        per_token = dict(per_token)
        per_token["clone"] = per_token["clone"] * shares["clone"]
        cs, w_clone = self.spec.clone, float(self.spec.channels["clone"])
        if cs.concise_weight > 0 and w_clone > 0 and b_idx.numel():
            pen = concise_penalty(hidden, weight, self.clone.eot_id, cb.counts, cb.ref_len, cs.concise_ratio,
                                  self.spec.chunk_size)                                            # [B]
            w_s = torch.ones_like(pen)
            for s in per_sample:
                w_s = w_s * s.to(pen.device, torch.float32)
            domains = batch.get("domains")
            if self.spec.domain_channel_shares and domains is not None:
                w_s = w_s * domain_channel_weights(domains, self.spec.domain_channel_shares, ["clone"]).get(
                    "clone", torch.ones_like(pen)).to(pen.device)
            total = total + w_clone * cs.concise_weight * (w_s * pen).sum()
            spread = (pen / cb.counts.clamp_min(1).float()).detach()[b_idx]
        else:
            spread = torch.zeros(b_idx.shape[0], dtype=torch.float32, device=b_idx.device)
        per_token["clone_concise"] = spread
        return total, per_token

    def channel_shares(self, batch: Mapping[str, Any], b_idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Per-token share of each channel ``{channel: [N]}`` from ``loss.domain_channel_shares`` and the
        batch's ``domains`` (S2.5 level 1), or None when no share is configured."""
        shares, domains = self.spec.domain_channel_shares, batch.get("domains")
        if not shares or domains is None:
            return None
        per_sample = domain_channel_weights(domains, shares, list(self.spec.channels))
        return {c: w.to(b_idx.device)[b_idx] for c, w in per_sample.items()}

    def _teacher(self, batch, n: int, vocab: int):
        t = self.teacher(batch)
        side = {}
        if hasattr(t, "kd") and hasattr(t, "side"):                      # teacher_side.ChannelTargets
            t, side = t.kd, t.side
        if isinstance(t, TopKTargets):
            rows = t.indices.shape[0]
            if rows == n and n and int(t.indices.max()) >= vocab:
                raise InputError(f"teacher top-k index {int(t.indices.max())} >= student vocabulary {vocab}: "
                                 f"teacher and student tokenizers differ")
        elif isinstance(t, TeacherHidden):
            rows = t.hidden.shape[0]
            if t.weight.shape[0] != vocab:
                raise InputError(f"teacher lm-head has {t.weight.shape[0]} rows, student {vocab}: the "
                                 f"vocabularies must match")
        else:
            raise TypeError(f"teacher provider returned {type(t).__name__}; expected TopKTargets or TeacherHidden")
        if rows != n:
            raise InputError(f"teacher gave {rows} positions but the batch has {n} prediction positions "
                             f"(loss_mask alignment: docs/architecture.md 'Data and alignment')")
        return t, side
