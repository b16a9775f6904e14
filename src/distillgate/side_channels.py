"""The attn (S2.2) and feature (S2.3) channels around one training call: :class:`StudentChannels` hooks the
student's forward (``models.adapters``) and returns the per-token losses ``{"attn": [N], "feature": [N]}`` the
objective combines with the KD terms; :class:`ChannelSetup` holds the plan, wraps the teacher provider (side
caches or the online capture of :mod:`distillgate.teacher_side`), attaches the feature adapters for the call and
anneals their gates; :func:`check_side_channels` is the preflight check."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .errors import ConfigError, InputError
from .losses.attention import attention_loss, gather_queries, head_attention
from .losses.feature import feature_loss
from .models.adapters import FeatureAdapters, HeadCapture, decoder_layers
from .teacher_side import (SIDE_CHANNELS, ChannelPlan, OnlineChannelTeacher, SideCache, SideProvider,
                           compute_side_cache)


# ------------------------------------------------------------------------------------------------ student side

class StudentChannels:
    """The student side of attn/feature for :class:`distillgate.losses.objective.DistillObjective`."""

    def __init__(self, plan: ChannelPlan, loss_spec, adapters: FeatureAdapters | None = None, setup=None):
        self.plan, self.spec, self._adapters, self._setup = plan, loss_spec, adapters, setup
        self.names = tuple(n for n in SIDE_CHANNELS if n in loss_spec.channels)

    @property
    def adapters(self) -> FeatureAdapters | None:
        """The adapters attached now (a ChannelSetup attaches them for each training call)."""
        return self._setup.adapters if self._setup is not None else self._adapters

    @contextlib.contextmanager
    def capture(self, model, side: dict, b_idx, t_idx):
        layers = sorted({p.student_layer for p in self.plan.heads}) if "attn" in self.names else []
        with HeadCapture(model, layers) as hc:
            if self.adapters is not None and "feature" in self.names:
                f = side.get("feature")
                inject = self.spec.feature.inject and f is not None
                self.adapters.set_teacher(f.feats if inject else None, b_idx, t_idx)
            self._hc = hc
            try:
                yield self
            finally:
                if self.adapters is not None:
                    self._captured = dict(self.adapters.captured)
                    self.adapters.clear()

    def losses(self, model, side: dict, b_idx, t_idx, attention_mask) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            if name not in side:
                fld = "loss.attention.cache_top_k" if name == "attn" else "loss.feature.cache_rank"
                raise ConfigError(f"loss.channels.{name}", self.spec.channels[name],
                                  f"a channel whose teacher data the provider gives (none for this batch: "
                                  f"targets.mode online, or {fld} > 0 with the side cache built)")
        if "attn" in self.names:
            a = side["attn"]
            lps, norms = [], []
            for p in self.plan.heads:
                q, k, v, sc = self._hc.qkv(p.student_layer, [p.student_head])
                logp, ln = head_attention(q, k, v, sc, attention_mask)
                lps.append(gather_queries(logp, b_idx, t_idx))
                norms.append(gather_queries(ln, b_idx, t_idx))
            out["attn"] = attention_loss(torch.cat(lps, 1), torch.cat(norms, 1), a.idx.to(b_idx.device),
                                         a.logprobs, a.lognorm, self.spec.attention.norm_weight)
        if "feature" in self.names:
            if self.adapters is None:
                raise InputError("the feature channel needs the student's FeatureAdapters attached")
            cap = self._captured
            f = side["feature"].feats
            proj = torch.stack([self.adapters.project(i, f[:, i]) for i in range(len(cap))], 1)
            s = torch.stack([cap[i] for i in range(len(cap))], 1)
            out["feature"] = feature_loss(s, proj, self.spec.feature.loss,
                                          None if self.plan.scale is None else self.plan.scale)
        return out


# ------------------------------------------------------------------------------------------------ one setup

class ChannelSetup:
    """Everything a training call needs for the side channels: the plan, the provider wrapper, the adapters
    (attached to the student only for the call) and the gate-anneal callback."""

    def __init__(self, loss_spec, plan: ChannelPlan, teacher, mode: str):
        self.spec, self.plan, self.teacher, self.mode = loss_spec, plan, teacher, mode
        self.adapters: FeatureAdapters | None = None
        self.caches: list[SideCache] = []

    def provider(self, kd_provider, groups: Sequence[Sequence], *, pad_id: int = 0, batch_size: int = 8, root=None):
        if self.mode == "online":
            model = self.teacher.model if hasattr(self.teacher, "fingerprint") else self.teacher
            return OnlineChannelTeacher(model, self.plan)
        self.caches = [compute_side_cache(self.teacher, list(g), self.plan, pad_id=pad_id, batch_size=batch_size,
                                          root=root) for g in groups if len(g)]
        return SideProvider(kd_provider, self.caches)

    def cache_meta(self) -> dict:
        """Bytes per position, attention top-k mass and feature reconstruction error of the caches built."""
        if not self.caches:
            return {}
        ms = [c.meta for c in self.caches]
        n = sum(m["n_positions"] for m in ms) or 1

        def avg(k):
            vals = [(m[k], m["n_positions"]) for m in ms if m.get(k) is not None]
            return sum(v * w for v, w in vals) / n if vals else None
        return {"bytes_per_position": ms[0]["bytes_per_position"], "attn_topk_mass": avg("attn_topk_mass"),
                "feature_recon_error": avg("feature_recon_error"), "positions": n}

    def attach(self, student) -> "ChannelSetup":
        if self.spec.channels.get("feature", 0) > 0:
            layers = decoder_layers(student)
            tw = self.plan.mean.shape[-1] if self.plan.mean is not None else None
            widths = [(int(getattr(student.config, "hidden_size")), int(tw or student.config.hidden_size))
                      for _ in layers]
            f = self.spec.feature
            self.adapters = FeatureAdapters(widths, f.gate_init, f.anneal, f.anneal_start, f.anneal_end)
            self.adapters.attach(student)
        return self

    def detach(self) -> None:
        if self.adapters is not None:
            self.adapters.detach()

    @contextlib.contextmanager
    def attached(self, student):
        self.attach(student)
        try:
            yield self
        finally:
            self.detach()

    def student_channels(self) -> StudentChannels:
        return StudentChannels(self.plan, self.spec, setup=self)

    def on_step(self, info) -> None:
        """Trainer callback: the gates' schedule position after ``info.step`` of ``info.total_steps``."""
        if self.adapters is not None:
            self.adapters.progress.fill_(info.step / max(1, info.total_steps))

    def record(self) -> dict:
        d = {"plan": self.plan.to_json(), "cache": self.cache_meta()}
        if self.adapters is not None:
            d["gates_final_sigmoid"] = [round(float(x), 6) for x in torch.sigmoid(self.adapters.gate_logit.detach())]
        return d


def side_channels_on(loss_spec) -> bool:
    return any(loss_spec.channels.get(n, 0) > 0 for n in SIDE_CHANNELS)


def check_side_channels(cfg, tconf=None) -> None:
    """Preflight: a side channel named with a positive weight must have its teacher data: cached mode needs
    ``loss.attention.cache_top_k`` / ``loss.feature.cache_rank`` > 0; the teacher must be Llama-style."""
    ch = cfg.loss.channels
    cached = cfg.targets.mode == "cached"
    if ch.get("attn", 0) > 0:
        if cached and cfg.loss.attention.cache_top_k == 0:
            raise ConfigError("loss.attention.cache_top_k", 0, "keys per query > 0 for loss.channels.attn with "
                                                               "targets.mode=cached (its teacher data), or "
                                                               "targets.mode=online")
        if tconf is not None and getattr(tconf, "model_type", None) not in ("llama", "mistral", "qwen2"):
            raise ConfigError("loss.channels.attn", ch["attn"], f"a Llama-style teacher (q/k/v_proj, rotary); "
                                                                f"got model_type {getattr(tconf, 'model_type', None)!r}")
    if ch.get("feature", 0) > 0 and cached and cfg.loss.feature.cache_rank == 0:
        raise ConfigError("loss.feature.cache_rank", 0, "a PCA rank > 0 for loss.channels.feature with "
                                                        "targets.mode=cached (its teacher data), or "
                                                        "targets.mode=online")
