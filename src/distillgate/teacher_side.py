"""Teacher-side data of the attn (S2.2) and feature (S2.3) channels, and the student side that consumes it.

One :class:`ChannelPlan` says what the channels align: the teacher's key heads (scored by attention rollout on
calibration text, :func:`find_key_heads`) mapped to the student's heads through the layer map (and a pruned
student's head keep sets), and for every student layer the teacher layer it came from, with the PCA basis
and scale of that layer's feature. The teacher side then comes from one of two places:

* **cached** (``targets.mode: cached``, the fast default): :class:`SideCache`, one teacher forward over the
  examples, rows per prediction position in the targets cache's order, keyed like it (teacher, tokenizer,
  data, plus the plan's digest). Attention: the top ``loss.attention.cache_top_k`` keys per query and head
  (uint16 position + fp16 log-prob, 4 bytes) and the head output's log-norm (fp16); features: PCA coefficients
  (fp16) of each student layer's teacher feature in a rank-``loss.feature.cache_rank`` basis fitted on
  calibration data. Bytes per position: ``heads * (4 k + 2) + layers * 2 r`` (3 heads, k 16: 198; 15 layers,
  r 32: 960), next to the targets' 320.
  *Why cache the top-k keys, not q/k:* recomputing the distribution needs the chosen heads' k at every position
  of the example (the prompt too) and q, v at the queries: 3 x (64 + 64 + 64) x 2 = 1,152 bytes per token at
  SmolLM2's head_dim, 5.8x the top-16 rows, for an exact instead of a top-16 + tail distribution; running
  the teacher's layers up to the deepest key head online costs up to a full teacher forward per step (the online
  path, 1.5x slower per step in fp32 in bench/distill_throughput.py). The cache records the mean attention mass
  its top-k keys keep (``attn_topk_mass``) and the PCA's reconstruction error (``feature_recon_error``).
* **online** (``targets.mode: online``): :class:`OnlineChannelTeacher`, the same teacher forward that gives the
  KD channel its hidden states also captures the key heads' q/k/v and the block features: dense attention, exact
  features.

The student side, the setup of one training call and the preflight check are in :mod:`distillgate.side_channels`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import CacheMismatchError, ConfigError, InputError
from .io import atomic_dir, distillgate_home, sha256_json, verify_manifest
from .losses.attention import gather_queries, head_attention, rollout_head_scores, topk_keys
from .models.adapters import BlockCapture, HeadCapture, check_attention_supported, decoder_layers
from .targets import TeacherHidden, TopKTargets, prediction_positions

log = logging.getLogger(__name__)

SIDE_CHANNELS = ("attn", "feature")
KIND = "teacher_side"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ data

@dataclass
class AttnTargets:
    """The teacher's key heads at N prediction positions: ``idx [N, h, k]`` key positions, ``logprobs
    [N, h, k]`` (dense when k is the sequence length), ``lognorm [N, h]`` log |head output|."""

    idx: torch.Tensor
    logprobs: torch.Tensor
    lognorm: torch.Tensor


@dataclass
class FeatureTargets:
    """The teacher's block features for every student layer at N prediction positions: ``feats [N, L, Ht]``."""

    feats: torch.Tensor


@dataclass
class ChannelTargets:
    """What a provider returns when side channels are on: the KD teacher and ``side`` (channel -> data)."""

    kd: TopKTargets | TeacherHidden
    side: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadPair:
    student_layer: int
    student_head: int
    teacher_layer: int
    teacher_head: int
    score: float


@dataclass
class ChannelPlan:
    """What the side channels align (JSON-able through :meth:`to_json`, tensors apart)."""

    heads: list[HeadPair]                    # attn: in this order everywhere ([N, h, ...] axes)
    feature_layers: list[int]                # feature: teacher layer of each student layer (empty: off)
    head_scores: list[list[float]] = field(default_factory=list)   # [Lt][H] rollout scores
    scale: torch.Tensor | None = None        # [L] teacher feature mean square per student layer (mse scale)
    mean: torch.Tensor | None = None         # [L, Ht] PCA mean
    basis: torch.Tensor | None = None        # [L, Ht, r] PCA components (None: no feature cache)
    recon_error: list[float] = field(default_factory=list)  # per layer: share of variance the basis loses
    top_k: int = 0                           # attention keys cached per query (0: dense / online)

    def teacher_attn_layers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for p in self.heads:
            out.setdefault(p.teacher_layer, []).append(p.teacher_head)
        return out

    def to_json(self) -> dict:
        return {"heads": [dataclasses.asdict(p) for p in self.heads], "feature_layers": list(self.feature_layers),
                "head_scores": self.head_scores, "recon_error": self.recon_error, "top_k": self.top_k,
                "basis_rank": 0 if self.basis is None else int(self.basis.shape[-1])}

    def digest(self) -> str:
        import hashlib

        d = self.to_json()
        d.pop("head_scores")
        if self.basis is not None:
            h = hashlib.sha256(self.basis.contiguous().numpy().tobytes())
            h.update(self.mean.contiguous().numpy().tobytes())
            d["basis"] = h.hexdigest()
        return sha256_json(d)


def _concat(parts: Sequence, cls):
    return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------------------------------------ the plan

def _batch(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def find_key_heads(model, calib_ids: torch.Tensor, last_positions: int) -> torch.Tensor:
    """``[L, H]`` mean rollout flow score of every teacher head over the rows of ``calib_ids [B, T]``
    (:func:`distillgate.losses.attention.rollout_head_scores`); q/k from hooks, the model's SDPA untouched."""
    check_attention_supported(model)
    layers = decoder_layers(model)
    n_heads = layers[0].self_attn.q_proj.out_features // layers[0].self_attn.head_dim
    total = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    for b in range(calib_ids.shape[0]):
        row = calib_ids[b:b + 1]
        with HeadCapture(model, range(len(layers))) as cap:
            model.base_model(**_batch(row), use_cache=False)
        probs = []
        for li in range(len(layers)):
            q, k, _, sc = cap.qkv(li, range(n_heads))
            logp, _ = head_attention(q, k, None, sc, None)
            probs.append(logp[0].exp())
        total += rollout_head_scores(probs, row.shape[1], last_positions)
    return total / max(1, calib_ids.shape[0])


def _student_heads(layer_map: dict, head_map: dict | None, student) -> dict[tuple[int, int], tuple[int, int]]:
    """teacher (layer, head) -> student (layer, head) for every student head."""
    out = {}
    layers = decoder_layers(student)
    for s, t in ((int(a), int(b)) for a, b in layer_map.items()):
        a = layers[s].self_attn
        n = a.q_proj.out_features // a.head_dim
        heads = list(head_map[s]) if head_map and s in head_map else list(range(n))
        if len(heads) != n:
            raise InputError(f"head map of student layer {s} lists {len(heads)} heads, the layer has {n}")
        for j, th in enumerate(heads):
            out[(t, int(th))] = (s, j)
    return out


@torch.no_grad()
def fit_feature_basis(model, calib_ids: torch.Tensor, teacher_layers: list[int], rank: int, max_positions: int):
    """``(scale [L], mean [L, Ht], basis [L, Ht, r] or None, recon_error [L])`` from the teacher's block outputs at
    up to ``max_positions`` calibration positions (token 0, the attention sink with its massive activations, left
    out). recon_error: share of the centred variance the rank-r basis loses."""
    uniq = sorted(set(teacher_layers))
    feats: dict[int, list] = {t: [] for t in uniq}
    n = 0
    for b in range(calib_ids.shape[0]):
        if n >= max_positions:
            break
        with BlockCapture(model, uniq) as cap:
            model.base_model(**_batch(calib_ids[b:b + 1]), use_cache=False)
        for t in uniq:
            feats[t].append(cap.out[t][0, 1:].float())
        n += calib_ids.shape[1] - 1
    scale, mean, basis, err = [], [], [], []
    for t in teacher_layers:
        x = torch.cat(feats[t])[:max_positions].double()
        scale.append(float(x.pow(2).mean()))
        mu = x.mean(0)
        mean.append(mu.float())
        if rank:
            xc = x - mu
            _, s, vh = torch.linalg.svd(xc, full_matrices=False)
            r = min(rank, vh.shape[0])
            u = vh[:r].T                                                         # [Ht, r]
            if r < rank:                                                         # fewer positions than rank
                u = torch.cat([u, torch.zeros(u.shape[0], rank - r, dtype=u.dtype)], 1)
            basis.append(u.float())
            var = float(s.pow(2).sum())
            err.append(float(s[r:].pow(2).sum()) / var if var > 0 else 0.0)
    return (torch.tensor(scale), torch.stack(mean), torch.stack(basis) if rank else None, err)


def feature_basis(teacher_model, calib_ids: torch.Tensor, teacher_layers: list[int], rank: int,
                  max_positions: int, fingerprint: str | None = None, root=None):
    """:func:`fit_feature_basis`, kept on disk under ``<root or $DISTILLGATE_HOME/teacher_side>/basis-<key>``
    (keyed by the teacher's fingerprint, the calibration tokens, the layers, rank and positions) when the teacher's
    fingerprint is known: a loop iteration or a resumed run reuses it instead of refitting."""
    if fingerprint is None:
        return fit_feature_basis(teacher_model, calib_ids, teacher_layers, rank, max_positions)
    from safetensors.torch import load_file, save_file

    key = sha256_json({"teacher": fingerprint, "calib": calib_ids.tolist(), "layers": list(teacher_layers),
                       "rank": rank, "positions": max_positions, "format_version": FORMAT_VERSION})
    folder = (Path(root) if root else distillgate_home() / "teacher_side") / f"basis-{key[:16]}"
    if folder.exists():
        try:
            m = verify_manifest(folder, kind="feature_basis")
            if m["meta"].get("key") == key:
                t = load_file(str(folder / "basis.safetensors"))
                return t["scale"], t["mean"], t.get("basis"), list(m["meta"]["recon_error"])
        except Exception as e:
            log.warning("%s: unusable feature basis (%s); refitting", folder, e)
    scale, mean, basis, err = fit_feature_basis(teacher_model, calib_ids, teacher_layers, rank, max_positions)
    with atomic_dir(folder, kind="feature_basis", format_version=FORMAT_VERSION,
                    meta={"key": key, "recon_error": err, "rank": rank}, exist_ok=True) as tmp:
        save_file({"scale": scale, "mean": mean.contiguous(), **({} if basis is None else {"basis": basis.contiguous()})},
                  str(tmp / "basis.safetensors"))
    return scale, mean, basis, err


def head_map_from_keep(keep: dict | None) -> dict[int, list[int]] | None:
    """A prune stage's ``keep_total`` (models.prune.Keep as a dict) -> student layer -> original head index per
    student head (the derived student's heads are the teacher's)."""
    if not keep:
        return None
    return {i: list(h) for i, h in enumerate(keep["heads"])}


def make_plan(loss_spec, teacher_model, student, layer_map: dict | None, calib_ids: torch.Tensor, *,
              mode: str, head_map: dict | None = None, known_heads: list | None = None,
              fingerprint: str | None = None) -> ChannelPlan:
    """The plan for the side channels with a positive weight in ``loss_spec.channels``.

    ``layer_map``: student layer -> teacher layer (a derived student's); None (a student that was not derived):
    student layer i -> teacher layer ``round((i + 1) * Lt / Ls) - 1``, heads by index. ``known_heads``: teacher [layer, head, score] found earlier (a resumed loop) -- the
    rollout is not run again. Raises ConfigError naming the field when a chosen head has no student head.
    """
    ch = loss_spec.channels
    att, feat = loss_spec.attention, loss_spec.feature
    s_layers = decoder_layers(student)
    if layer_map is None:        # no derivation (student.init config / model): spread evenly, as profile diffs do
        lt, ls = len(decoder_layers(teacher_model)), len(s_layers)
        layer_map = {i: round((i + 1) * lt / ls) - 1 for i in range(ls)}
    layer_map = {int(k): int(v) for k, v in layer_map.items()}
    heads: list[HeadPair] = []
    scores_json: list = []
    if ch.get("attn", 0) > 0:
        check_attention_supported(teacher_model)
        check_attention_supported(student)
        avail = _student_heads(layer_map, head_map, student)
        if att.heads is not None:
            chosen = [(int(a), int(b), float("nan")) for a, b in att.heads]
            missing = [c[:2] for c in chosen if c[:2] not in avail]
            if missing:
                raise ConfigError("loss.attention.heads", att.heads, f"teacher heads the student kept (missing: "
                                                                     f"{missing})")
        else:
            if known_heads is not None:
                # a head the student no longer has (pruned since) drops out; the others keep their places
                chosen = [tuple(x) for x in known_heads if (int(x[0]), int(x[1])) in avail]
            else:
                scores = find_key_heads(teacher_model, calib_ids, att.last_positions)
                scores_json = [[round(float(v), 6) for v in row] for row in scores]
                ranked = sorted(((float(scores[t, h]), t, h) for (t, h) in avail if h < scores.shape[1]), reverse=True)
                chosen = [(t, h, sc) for sc, t, h in ranked[:att.key_heads]]
        for t, h, sc in chosen:
            s, j = avail[(int(t), int(h))]
            heads.append(HeadPair(s, j, int(t), int(h), float(sc)))
    plan = ChannelPlan(heads=heads, feature_layers=[], head_scores=scores_json,
                       top_k=att.cache_top_k if mode == "cached" else 0)
    if ch.get("feature", 0) > 0:
        plan.feature_layers = [layer_map[i] for i in range(len(s_layers))]
        rank = feat.cache_rank if mode == "cached" else 0
        plan.scale, plan.mean, plan.basis, plan.recon_error = feature_basis(
            teacher_model, calib_ids, plan.feature_layers, rank, feat.calib_tokens, fingerprint)
    return plan


# ------------------------------------------------------------------------------------------------ teacher rows

@torch.no_grad()
def teacher_side_rows(model, batch: dict, plan: ChannelPlan, *, top_k: int, want_hidden: bool = False):
    """One teacher forward over ``batch``: ``(final hidden [N, H] or None, {"attn": AttnTargets, "feature":
    FeatureTargets})`` at the prediction positions; attention top-``top_k`` keys (0: dense)."""
    b_idx, t_idx = prediction_positions(batch)
    by_layer = plan.teacher_attn_layers()
    with HeadCapture(model, by_layer) as hc, BlockCapture(model, plan.feature_layers) as bc:
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    side: dict[str, Any] = {}
    if plan.heads:
        lps, norms = [], []
        for p in plan.heads:
            q, k, v, sc = hc.qkv(p.teacher_layer, [p.teacher_head])
            logp, ln = head_attention(q, k, v, sc, batch["attention_mask"])
            lps.append(gather_queries(logp, b_idx, t_idx))                       # [N, 1, T]
            norms.append(gather_queries(ln, b_idx, t_idx))                       # [N, 1]
        logp, ln = torch.cat(lps, 1), torch.cat(norms, 1)
        if top_k:
            idx, lp = topk_keys(logp, top_k)
        else:
            idx = torch.arange(logp.shape[-1]).expand_as(logp)
            lp = logp
        side["attn"] = AttnTargets(idx, lp, ln)
    if plan.feature_layers:
        side["feature"] = FeatureTargets(torch.stack([bc.out[t][b_idx, t_idx].float() for t in plan.feature_layers], 1))
    hidden = out.last_hidden_state[b_idx, t_idx] if want_hidden else None
    return hidden, side


class OnlineChannelTeacher:
    """Online provider: ``provider(batch) -> ChannelTargets(TeacherHidden, side)`` from one teacher forward."""

    def __init__(self, teacher_model, plan: ChannelPlan):
        from .targets import _check_plain_head

        self.model, self.plan = teacher_model, plan
        self.weight = _check_plain_head(teacher_model).detach()
        self.model.eval()

    def __call__(self, batch: dict) -> ChannelTargets:
        hidden, side = teacher_side_rows(self.model, batch, self.plan, top_k=0, want_hidden=True)
        return ChannelTargets(TeacherHidden(hidden=hidden, weight=self.weight), side)


# ------------------------------------------------------------------------------------------------ cache

def _key(teacher, examples, plan: ChannelPlan) -> str:
    from .targets import targets_key

    tk = targets_key(teacher, examples, 1, 0)
    return sha256_json({"teacher": tk.teacher, "tokenizer": tk.tokenizer, "data": tk.data, "plan": plan.digest(),
                        "format_version": FORMAT_VERSION})


class SideCache:
    """Committed teacher-side rows of some examples (see the module docstring for the layout)."""

    def __init__(self, path: Path, meta: dict, tensors: dict, where: dict, plan: ChannelPlan):
        self.path, self.meta, self.t, self.where, self.plan = path, meta, tensors, where, plan

    @classmethod
    def open(cls, path, key: str, plan: ChannelPlan) -> "SideCache":
        from safetensors.torch import load_file

        path = Path(path)
        m = verify_manifest(path, kind=KIND)
        if m["meta"].get("key") != key:
            raise CacheMismatchError(f"{path}: teacher-side cache of another teacher, data or channel plan")
        t = load_file(str(path / "rows.safetensors"))
        ids = json.loads((path / "index.json").read_text())["examples"]
        off = t["offsets"].tolist()
        return cls(path, m["meta"], t, {e: (off[i], off[i + 1]) for i, e in enumerate(ids)}, plan)

    def __contains__(self, example_id) -> bool:
        return example_id in self.where

    def rows(self, example_id: str) -> dict:
        a, b = self.where[example_id]
        out = {}
        if "attn_idx" in self.t:
            idx = self.t["attn_idx"][a:b]
            idx = (idx.to(torch.int32) & 0xFFFF).long() if idx.dtype == torch.int16 else idx.long()
            out["attn"] = AttnTargets(idx, self.t["attn_lp"][a:b].float(), self.t["attn_lognorm"][a:b].float())
        if "feat_coef" in self.t:
            c = self.t["feat_coef"][a:b].float()                                  # [n, L, r]
            out["feature"] = FeatureTargets(self.plan.mean.unsqueeze(0) + torch.einsum("nlr,lhr->nlh", c, self.plan.basis))
        return out


def compute_side_cache(teacher, examples: Sequence, plan: ChannelPlan, *, pad_id: int, batch_size: int,
                       root=None) -> SideCache:
    """The cache for ``examples`` under ``<root or $DISTILLGATE_HOME/teacher_side>/<key[:16]>`` (reused when it
    exists and verifies; built atomically otherwise)."""
    from safetensors.torch import save_file

    from .data.dataset import collate

    model = teacher.model if hasattr(teacher, "fingerprint") else teacher
    key = _key(teacher, examples, plan)
    folder = (Path(root) if root else distillgate_home() / "teacher_side") / key[:16]
    if folder.exists():
        try:
            return SideCache.open(folder, key, plan)
        except CacheMismatchError:
            raise
        except Exception as e:
            log.warning("%s: unusable teacher-side cache (%s); recomputing", folder, e)
    rows: dict[int, dict] = {}
    mass, err_num, err_den = [], 0.0, 0.0
    for s in range(0, len(examples), batch_size):
        part = list(examples[s:s + batch_size])
        batch = collate(part, pad_id)
        _, side = teacher_side_rows(model, batch, plan, top_k=plan.top_k)
        counts = (batch["loss_mask"][:, 1:] != 0).sum(1).tolist()
        start = 0
        for i, c in enumerate(counts):
            sl = slice(start, start + c)
            r: dict = {}
            if "attn" in side:
                a = side["attn"]
                r["attn_idx"] = torch.where(a.idx[sl] >= 32768, a.idx[sl] - 65536, a.idx[sl]).to(torch.int16)
                r["attn_lp"] = a.logprobs[sl].clamp_min(-6e4).half()
                r["attn_lognorm"] = a.lognorm[sl].half()
                mass.append(a.logprobs[sl].exp().sum(-1).flatten())
            if "feature" in side:
                f = side["feature"].feats[sl]                                        # [c, L, Ht]
                fc = f - plan.mean.unsqueeze(0)
                coef = torch.einsum("nlh,lhr->nlr", fc, plan.basis)
                rec = torch.einsum("nlr,lhr->nlh", coef, plan.basis)
                err_num += float((fc - rec).pow(2).sum())
                err_den += float(fc.pow(2).sum())
                r["feat_coef"] = coef.half()
            rows[s + i] = r
            start += c
    names = sorted(rows[0]) if rows else []
    tensors = {n: torch.cat([rows[i][n] for i in range(len(examples))]).contiguous() for n in names}
    counts = [0] + [next(iter(rows[i].values())).shape[0] for i in range(len(examples))]
    tensors["offsets"] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    n_pos = int(tensors["offsets"][-1])
    h, L = len(plan.heads), len(plan.feature_layers)
    r_ = 0 if plan.basis is None else int(plan.basis.shape[-1])
    meta = {"key": key, "plan": plan.to_json(), "n_positions": n_pos,
            "bytes_per_position": h * (4 * plan.top_k + 2) + L * 2 * r_,
            "attn_topk_mass": float(torch.cat(mass).mean()) if mass else None,
            "feature_recon_error": err_num / err_den if err_den else None}
    with atomic_dir(folder, kind=KIND, format_version=FORMAT_VERSION, meta=meta, exist_ok=True) as tmp:
        save_file(tensors, str(tmp / "rows.safetensors"))
        (tmp / "index.json").write_text(json.dumps({"examples": [e.id for e in examples]}))
    return SideCache.open(folder, key, plan)


class SideProvider:
    """Cached path: ``provider(batch) -> ChannelTargets(kd_provider(batch), side rows in the same order)``."""

    def __init__(self, kd_provider, caches: list[SideCache]):
        self.kd, self.caches = kd_provider, list(caches)

    def _rows(self, ex_id):
        for c in self.caches:
            if ex_id in c:
                return c.rows(ex_id)
        raise InputError(f"no teacher-side (attn/feature) rows for example {ex_id!r}")

    def __call__(self, batch: dict) -> ChannelTargets:
        counts = (batch["loss_mask"][:, 1:] != 0).sum(1).tolist()
        parts = []
        for ex_id, c in zip(batch["example_ids"], counts):
            r = self._rows(ex_id)
            n = next(iter(r.values()))
            n = n.idx.shape[0] if isinstance(n, AttnTargets) else n.feats.shape[0]
            if n != c:
                raise CacheMismatchError(f"teacher-side cache: example {ex_id!r} has {c} target tokens in the "
                                         f"batch but {n} cached")
            parts.append(r)
        side = {}
        for name, cls in (("attn", AttnTargets), ("feature", FeatureTargets)):
            if parts and name in parts[0]:
                side[name] = _concat([p[name] for p in parts], cls)
        return ChannelTargets(self.kd(batch), side)
