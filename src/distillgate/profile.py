"""The teacher's baseline profile (SPEC S1): layer-wise activation statistics on real text plus benchmark
scores, stored as a versioned artifact, and a per-layer diff of a student against it.

Statistics (per layer unless noted; 26 in all, see ``STAT_INFO``) come from one batched forward pass with
eager attention (attention probabilities are needed) and forward hooks, and from the weights themselves:

weights   q/k/v/o/down singular-value energy in the top 10% of values and effective rank (Roy & Vetterli);
residual  per-channel variance entropy (normalised), mean L2 norm, norm growth, kurtosis, max |x|, share of
          "massive" channels (> 6 std), token anisotropy (mean pairwise cosine), cosine(in, out) of the block;
attention entropy per head (mean over queries, normalised by log of visible keys), sink share (mass on the
          first token), mean attention distance, attention-output / residual norm ratio;
mlp       saturation share of the SiLU gate input (|x| > 3: the flat negative tail or the linear region),
          near-zero activation share, output / residual norm ratio;
lens      logit-lens KL(final || layer) and top-1 agreement with the final layer.

Artifact layout (``FORMAT_VERSION`` 1): ``profile.json`` (meta, per-layer stats, benchmark scores) and
``arrays.safetensors`` (per-head attention stats and singular-value spectra), with a sha256 manifest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ArtifactError, InputError
from .io import atomic_dir, verify_manifest

FORMAT_VERSION = 1
KIND = "profile"
SAT_THRESHOLD = 3.0
MASSIVE_STD = 6.0
LENS_TOKENS = 256

STAT_INFO = {
    "sv_top10_energy_q": "share of squared singular values in the top 10% (q_proj)",
    "sv_top10_energy_k": "same, k_proj", "sv_top10_energy_v": "same, v_proj", "sv_top10_energy_o": "same, o_proj",
    "eff_rank_q": "effective rank exp(H(sigma/sum sigma)) of q_proj", "eff_rank_k": "same, k_proj",
    "eff_rank_v": "same, v_proj", "eff_rank_o": "same, o_proj", "eff_rank_down": "same, mlp down_proj",
    "resid_var_entropy": "entropy of per-channel variance of the block output, / log(hidden)",
    "resid_norm": "mean L2 norm of the block output per token",
    "norm_growth": "resid_norm / previous layer's (embedding for layer 0)",
    "resid_kurtosis": "mean excess kurtosis over channels of the block output",
    "resid_max_abs": "max |activation| of the block output",
    "massive_share": f"share of channels whose mean |x| exceeds {MASSIVE_STD} std of channel means",
    "anisotropy": "mean pairwise cosine between token states (sampled)",
    "block_cos": "cosine(block input, block output), mean over tokens (1 - block influence)",
    "attn_entropy": "attention entropy / log(visible keys), mean over heads and queries",
    "attn_sink": "attention mass on the first token, mean over heads and queries",
    "attn_distance": "mean |query - key| distance weighted by attention",
    "attn_out_ratio": "||attention output|| / ||block input||",
    "mlp_saturation": f"share of SiLU gate inputs with |x| > {SAT_THRESHOLD}",
    "mlp_near_zero": "share of MLP activations act(gate)*up with |x| < 1e-2 * their std",
    "mlp_out_ratio": "||MLP output|| / ||block input||",
    "lens_kl": "logit-lens KL(final || this layer), nats per token",
    "lens_top1": "logit-lens top-1 agreement with the final layer",
}


def _svd_stats(w: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    s = torch.linalg.svdvals(w.detach().float()).double()
    e = s.square()
    k = max(1, math.ceil(0.1 * len(s)))
    top = float(e[:k].sum() / e.sum())
    p = s / s.sum()
    eff = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
    return top, eff, s.float()


def _layers(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0], "mlp"):
        raise InputError(f"profile supports Llama-style decoders (layers[i].self_attn/.mlp); got "
                         f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})")
    return body, layers


@dataclass
class Profile:
    meta: dict
    layers: dict[str, list[float]]  # stat -> per-layer values
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.layers.values())))

    def summary(self) -> dict[str, float]:
        """Mean over layers of every statistic (a flat dict for scorecards)."""
        return {f"profile/{k}": float(sum(v) / len(v)) for k, v in self.layers.items() if v}


@torch.inference_mode()
def build_profile(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  batch_size: int = 4, meta: dict | None = None, scores: dict | None = None) -> Profile:
    """Profile ``model`` on ``input_ids`` [B,T] (real text). Restores the model's attention implementation."""
    t0 = time.time()
    body, layers = _layers(model)
    L = len(layers)
    H = model.config.hidden_size
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    stats: dict[str, list[float]] = {k: [0.0] * L for k in STAT_INFO}
    arrays: dict[str, torch.Tensor] = {}

    for i, layer in enumerate(layers):
        a = layer.self_attn
        for short, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj)):
            top, eff, s = _svd_stats(lin.weight)
            stats[f"sv_top10_energy_{short}"][i], stats[f"eff_rank_{short}"][i] = top, eff
            arrays[f"sv_{short}.{i}"] = s
        stats["eff_rank_down"][i] = _svd_stats(layer.mlp.down_proj.weight)[1]

    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, inp, out, i=i: captured.setdefault(f"attn{i}", []).append(out[0].float())))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, inp, out, i=i: captured.setdefault(f"mlp{i}", []).append(out.float())))
        hooks.append(layer.mlp.gate_proj.register_forward_hook(
            lambda m, inp, out, i=i: captured.setdefault(f"gate{i}", []).append(out.float())))
        hooks.append(layer.mlp.up_proj.register_forward_hook(
            lambda m, inp, out, i=i: captured.setdefault(f"up{i}", []).append(out.float())))
    prev_impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    acc = {k: torch.zeros(L, dtype=torch.float64) for k in
           ("ent", "sink", "dist", "attn_ratio", "mlp_ratio", "sat", "nz", "lens_kl", "lens_top1", "cos", "norm")}
    head_ent = None
    n_tok, n_q, n_lens = 0, 0, 0
    hid_all: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    head_fn = model.get_output_embeddings()
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            ids, am = input_ids[s:s + batch_size], attention_mask[s:s + batch_size]
            captured.clear()
            out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
            valid = am.bool()
            nv = int(valid.sum())
            hs = [h.float() for h in out.hidden_states]  # L+1: embeddings, after each block (last is normed)
            # hidden_states[-1] has the final norm applied; recompute the raw last block output for stats
            # The logit lens costs a full vocabulary projection per layer: use an evenly spaced subsample of
            # at most LENS_TOKENS tokens per batch (256 tokens give the lens KL to ~1% here).
            lens_idx = torch.linspace(0, nv - 1, min(LENS_TOKENS, nv)).long()
            final_logp = F.log_softmax(out.logits.float()[valid][lens_idx], -1)
            final_top1 = final_logp.argmax(-1)
            n_lens += len(lens_idx)
            for i in range(L):
                x_in, x_out = hs[i], hs[i + 1]
                if i == L - 1:
                    x_out = x_in + captured[f"attn{i}"][0] + captured[f"mlp{i}"][0]
                hid_all[i + 1].append(x_out[valid])
                if i == 0:
                    hid_all[0].append(x_in[valid])
                cin = x_in[valid]
                acc["cos"][i] += F.cosine_similarity(cin, x_out[valid], dim=-1).sum()
                acc["norm"][i] += x_out[valid].norm(dim=-1).sum()
                acc["attn_ratio"][i] += (captured[f"attn{i}"][0][valid].norm(dim=-1) / cin.norm(dim=-1).clamp_min(1e-6)).sum()
                acc["mlp_ratio"][i] += (captured[f"mlp{i}"][0][valid].norm(dim=-1) / cin.norm(dim=-1).clamp_min(1e-6)).sum()
                g = captured[f"gate{i}"][0][valid]
                act = F.silu(g) * captured[f"up{i}"][0][valid]
                acc["sat"][i] += (g.abs() > SAT_THRESHOLD).float().mean(-1).sum()
                acc["nz"][i] += (act.abs() < 1e-2 * act.std().clamp_min(1e-12)).float().mean(-1).sum()
                normed = body.norm(x_out) if i < L - 1 else out.hidden_states[-1]
                lp = F.log_softmax(head_fn(normed[valid][lens_idx]).float(), -1)
                acc["lens_kl"][i] += (final_logp.exp() * (final_logp - lp)).sum(-1).sum()
                acc["lens_top1"][i] += (lp.argmax(-1) == final_top1).float().sum()
                att = out.attentions[i].float()  # [B, heads, T, T]
                T = att.shape[-1]
                keymask = am[:, None, None, :].bool()
                qmask = am[:, None, :, None].bool().expand(-1, att.shape[1], -1, 1).squeeze(-1)
                visible = (torch.tril(torch.ones(T, T, dtype=torch.bool)) & keymask).sum(-1).clamp_min(1)
                ent = -(att * torch.log(att.clamp_min(1e-12))).sum(-1) / torch.log(visible.float().clamp_min(2))
                first = am.float().argmax(-1)  # first real token (left padding safe)
                sink = att.gather(-1, first[:, None, None, None].expand(-1, att.shape[1], T, 1)).squeeze(-1)
                pos = torch.arange(T, dtype=torch.float32)
                dist = (att * (pos[:, None] - pos[None, :]).abs()).sum(-1)
                qm = qmask.float()
                acc["ent"][i] += (ent * qm).sum() / att.shape[1]
                acc["sink"][i] += (sink * qm).sum() / att.shape[1]
                acc["dist"][i] += (dist * qm).sum() / att.shape[1]
                per_head = (ent * qm).sum((0, 2))
                if head_ent is None:
                    head_ent = torch.zeros(L, att.shape[1], dtype=torch.float64)
                head_ent[i] += per_head.double()
            n_tok += nv
            n_q += nv
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(prev_impl)

    for i in range(L):
        stats["block_cos"][i] = float(acc["cos"][i] / n_tok)
        stats["resid_norm"][i] = float(acc["norm"][i] / n_tok)
        stats["attn_out_ratio"][i] = float(acc["attn_ratio"][i] / n_tok)
        stats["mlp_out_ratio"][i] = float(acc["mlp_ratio"][i] / n_tok)
        stats["mlp_saturation"][i] = float(acc["sat"][i] / n_tok)
        stats["mlp_near_zero"][i] = float(acc["nz"][i] / n_tok)
        stats["lens_kl"][i] = float(acc["lens_kl"][i] / n_lens)
        stats["lens_top1"][i] = float(acc["lens_top1"][i] / n_lens)
        stats["attn_entropy"][i] = float(acc["ent"][i] / n_q)
        stats["attn_sink"][i] = float(acc["sink"][i] / n_q)
        stats["attn_distance"][i] = float(acc["dist"][i] / n_q)
    arrays["attn_entropy_per_head"] = (head_ent / n_q).float()
    prev_norm = float(torch.cat(hid_all[0]).norm(dim=-1).mean())
    for i in range(L):
        x = torch.cat(hid_all[i + 1]).double()
        var = x.var(0)
        p = var / var.sum()
        stats["resid_var_entropy"][i] = float(-(p * torch.log(p.clamp_min(1e-30))).sum() / math.log(H))
        stats["norm_growth"][i] = stats["resid_norm"][i] / max(prev_norm, 1e-12)
        prev_norm = stats["resid_norm"][i]
        c = x - x.mean(0)
        std = c.std(0).clamp_min(1e-12)
        stats["resid_kurtosis"][i] = float(((c / std) ** 4).mean(0).sub(3).mean())
        stats["resid_max_abs"][i] = float(x.abs().max())
        ch = x.abs().mean(0)
        stats["massive_share"][i] = float(((ch - ch.mean()) > MASSIVE_STD * ch.std()).double().mean())
        sample = F.normalize(x[torch.linspace(0, len(x) - 1, min(256, len(x))).long()], dim=-1)
        cs = sample @ sample.T
        m = len(sample)
        stats["anisotropy"][i] = float((cs.sum() - m) / max(m * (m - 1), 1))
    meta = {**(meta or {}), "num_layers": L, "hidden_size": H, "tokens": n_tok, "seconds": round(time.time() - t0, 2),
            "stats": len(STAT_INFO)}
    return Profile(meta=meta, layers=stats, arrays=arrays, scores=dict(scores or {}))


def save_profile(profile: Profile, out_dir: str | Path, overwrite: bool = False, exist_ok: bool = True) -> Path:
    """Commit ``profile`` to ``out_dir``. Profiles are cached by a key of their inputs, so by default
    (``exist_ok``) a committed profile already there -- e.g. from a concurrent run -- is kept and ours dropped;
    ``exist_ok=False`` refuses an existing folder, ``overwrite=True`` replaces it."""
    import json

    from safetensors.torch import save_file

    for k, v in profile.layers.items():
        if not all(math.isfinite(x) for x in v):
            raise ArtifactError(f"profile stat {k} holds a non-finite value; refusing to commit")
    with atomic_dir(out_dir, kind=KIND, format_version=FORMAT_VERSION, meta=profile.meta, overwrite=overwrite,
                    exist_ok=exist_ok and not overwrite) as tmp:
        (tmp / "profile.json").write_text(json.dumps(
            {"meta": profile.meta, "layers": profile.layers, "scores": profile.scores, "stat_info": STAT_INFO},
            indent=1, sort_keys=True))
        save_file({k: v.contiguous() for k, v in profile.arrays.items()}, str(tmp / "arrays.safetensors"))
    return Path(out_dir)


def load_profile(path: str | Path) -> Profile:
    import json

    from safetensors.torch import load_file

    verify_manifest(path, kind=KIND, format_version=FORMAT_VERSION)
    d = json.loads((Path(path) / "profile.json").read_text())
    return Profile(meta=d["meta"], layers=d["layers"], arrays=load_file(str(Path(path) / "arrays.safetensors")),
                   scores=d.get("scores", {}))


def diff_profiles(student: Profile, teacher: Profile, layer_map: list[int] | None = None) -> dict:
    """Per-layer student - teacher differences through ``layer_map`` (student layer i -> teacher layer).

    Without a map, student layers are matched to teacher layers by relative depth. Returns
    ``{"layer_map", "stats": {stat: {"student": [...], "teacher": [...], "delta": [...]}}, "summary": {stat:
    mean |delta|}}`` — the table and the data for a plot.
    """
    Ls, Lt = student.num_layers, teacher.num_layers
    if layer_map is None:
        layer_map = [round((i + 1) * Lt / Ls) - 1 for i in range(Ls)]
    if len(layer_map) != Ls or any(not 0 <= j < Lt for j in layer_map):
        raise InputError(f"layer_map {layer_map} does not map {Ls} student layers into {Lt} teacher layers")
    out = {"layer_map": layer_map, "stats": {}, "summary": {}}
    for k in STAT_INFO:
        if k not in student.layers or k not in teacher.layers:
            continue
        s = student.layers[k]
        t = [teacher.layers[k][j] for j in layer_map]
        d = [a - b for a, b in zip(s, t)]
        out["stats"][k] = {"student": s, "teacher": t, "delta": d}
        out["summary"][k] = sum(abs(x) for x in d) / len(d)
    for name in sorted(set(student.scores) & set(teacher.scores)):
        out["summary"][f"score/{name}"] = student.scores[name] - teacher.scores[name]
    return out
