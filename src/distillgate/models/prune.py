"""Structure-aware pruning of Llama-style causal LMs (SPEC S3): what is kept, how important each unit is, the
gates that fade a unit out, the surgery that removes it and the least-squares fold-in. Scores come from
:mod:`distillgate.models.importance`, FLOPs from :mod:`distillgate.models.flops`.

Five kinds of units, cut with uniform counts per layer so a stock HF config still describes the model:

* ``heads``: attention query heads, GQA-aware. ``per_group`` keeps the same number of query heads in every KV
  group; ``whole_groups`` drops whole KV groups (their key/value heads go too);
* ``mlp``: MLP units (rows of gate/up, columns of down);
* ``layers``: whole decoder blocks;
* ``hidden``: hidden (embedding) channels, everywhere the residual stream is read or written;
* ``rotary``: rotary pairs of the head dimension. HF computes the rotary frequencies from ``head_dim``
  (``theta^(-2j/d)``), so only a *prefix* of the pairs can be kept exactly: keeping pairs ``j < d'/2`` with
  ``rope_theta' = theta^(d'/d)`` reproduces their frequencies, and the queries are scaled by ``sqrt(d'/d)`` so
  the attention scale ``d'^-1/2`` gives the same scores. The lowest-frequency pairs go; the value dimensions
  (``head_dim`` is shared by q, k and v) are chosen by importance. ``head_dim`` is written explicitly.

A :class:`Keep` lists what a model keeps, in the model's own indexing; :func:`full_keep` keeps everything and
:func:`apply_keep` builds the smaller model (a plain HF model of the same class: keeping everything reproduces
the logits exactly). :class:`Gates` multiplies units by gate values through forward hooks (importance scoring,
fading); :func:`select` keeps the most important units at given counts; :func:`frozen` keeps the dropped units'
weights while the kept ones train; :func:`fold_in` refits the kept units' output projections.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError, InputError
from .derive import check_supported, load_sliced

KINDS = ("heads", "mlp", "layers", "hidden", "rotary")
GQA_MODES = ("per_group", "whole_groups")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------------ shapes
def dims(model) -> dict:
    """Sizes the surgery needs: layers, heads, kv heads, head_dim, mlp width, hidden, vocab, rope theta."""
    cfg = model.config
    nh = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {"layers": cfg.num_hidden_layers, "heads": nh, "kv_heads": getattr(cfg, "num_key_value_heads", nh) or nh,
            "head_dim": d, "mlp": cfg.intermediate_size, "hidden": cfg.hidden_size,
            "vocab": model.get_input_embeddings().weight.shape[0], "rope_type": rope.get("rope_type", "default"),
            "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
            "partial_rotary_factor": rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)),
            "qk_norm": hasattr(model.model.layers[0].self_attn, "q_norm")}


@dataclass
class Keep:
    """What a model keeps, in its own indexing (sorted lists). ``heads[i]``/``kv_heads[i]``/``mlp[i]`` are per
    *kept* block ``layers[i]``; ``rotary_pairs``: pairs kept (a prefix); ``v_dims[i]``: value dims kept."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    mlp: list[list[int]]
    hidden: list[int]
    rotary_pairs: int
    v_dims: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Keep":
        return cls(**{k: copy.deepcopy(d[k]) for k in cls.__dataclass_fields__})

    def counts(self) -> dict:
        return {"layers": len(self.layers), "heads": len(self.heads[0]) if self.heads else 0,
                "kv_heads": len(self.kv_heads[0]) if self.kv_heads else 0,
                "mlp": len(self.mlp[0]) if self.mlp else 0, "hidden": len(self.hidden),
                "head_dim": 2 * self.rotary_pairs}


def full_keep(model) -> Keep:
    D = dims(model)
    L = D["layers"]
    return Keep(list(range(L)), [list(range(D["heads"]))] * L, [list(range(D["kv_heads"]))] * L,
                [list(range(D["mlp"]))] * L, list(range(D["hidden"])), D["head_dim"] // 2,
                [list(range(D["head_dim"]))] * L)


def check_keep(model, keep: Keep) -> None:
    """InputError unless ``keep`` describes a uniform, GQA-consistent sub-structure of ``model``."""
    D = dims(model)
    L, nh, nkv, d = D["layers"], D["heads"], D["kv_heads"], D["head_dim"]
    g = nh // nkv

    def ok(xs, n):
        return xs == sorted(set(xs)) and all(0 <= x < n for x in xs) and len(xs) > 0

    if not ok(keep.layers, L):
        raise InputError(f"prune: layers {keep.layers} must be distinct, sorted block indices in [0, {L})")
    n = len(keep.layers)
    for name, lists, size in (("heads", keep.heads, nh), ("kv_heads", keep.kv_heads, nkv), ("mlp", keep.mlp, D["mlp"]),
                              ("v_dims", keep.v_dims, d)):
        if len(lists) != n or not all(ok(x, size) for x in lists):
            raise InputError(f"prune: {name} needs one sorted, non-empty index list in [0, {size}) per kept layer")
        if len({len(x) for x in lists}) != 1:
            raise InputError(f"prune: {name} must keep the same count in every layer (a stock config holds one "
                             f"value); got {sorted({len(x) for x in lists})}")
    for i, (hs, kvs) in enumerate(zip(keep.heads, keep.kv_heads)):
        per = [sum(1 for h in hs if h // g == kv) for kv in kvs]
        if any(h // g not in kvs for h in hs) or len(set(per)) != 1:
            raise InputError(f"prune: layer {keep.layers[i]} keeps heads {hs} over KV heads {kvs}: every kept KV "
                             f"group must keep the same number of query heads ({g} per group in the model)")
    if not ok(keep.hidden, D["hidden"]):
        raise InputError(f"prune: hidden must be sorted channel indices in [0, {D['hidden']})")
    if not 1 <= keep.rotary_pairs <= d // 2 or len(keep.v_dims[0]) != 2 * keep.rotary_pairs:
        raise InputError(f"prune: rotary_pairs {keep.rotary_pairs} must lie in [1, {d // 2}] with 2*pairs value dims")
    if keep.rotary_pairs != d // 2:
        if D["qk_norm"]:
            raise ConfigError("prune.kinds.rotary", True, "off for models with q/k norms over head_dim "
                              f"({model.config.model_type}): the norm over fewer dims is not the same function")
        if D["rope_type"] != "default" or (D["partial_rotary_factor"] or 1.0) != 1.0:
            raise ConfigError("prune.kinds.rotary", True, f"off for rope_type={D['rope_type']!r} / partial rotary "
                              "(only default rotary frequencies can be kept exactly on a smaller head_dim)")


# ------------------------------------------------------------------------------------------------ surgery
def _qk_rows(heads: list[int], d: int, pairs: int) -> list[int]:
    half = d // 2
    dims_kept = list(range(pairs)) + [half + j for j in range(pairs)]
    return [h * d + j for h in heads for j in dims_kept]


def _v_rows(heads: list[int], d: int, vd: list[int]) -> list[int]:
    return [h * d + j for h in heads for j in vd]


@torch.no_grad()
def apply_keep(model, keep: Keep):
    """A new model of the same class keeping only ``keep`` (weights copied; the input is not modified)."""
    from transformers import AutoModelForCausalLM

    check_supported(model)
    check_keep(model, keep)
    D = dims(model)
    d = D["head_dim"]
    d_new = 2 * keep.rotary_pairs
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep.layers)
    cfg.num_attention_heads = len(keep.heads[0])
    cfg.num_key_value_heads = len(keep.kv_heads[0])
    cfg.intermediate_size = len(keep.mlp[0])
    cfg.hidden_size = len(keep.hidden)
    cfg.head_dim = d_new
    if d_new != d:
        cfg.rope_parameters = {**(cfg.rope_parameters or {}), "rope_theta": D["rope_theta"] ** (d_new / d)}
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep.layers]
    new = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    if type(new) is not type(model):
        raise InputError(f"rebuilding {type(model).__name__} from its pruned config gave {type(new).__name__}")
    dev = next(model.parameters()).device
    H = torch.tensor(keep.hidden, device=dev)
    q_scale = math.sqrt(d_new / d)
    pos = {t: s for s, t in enumerate(keep.layers)}
    sd = {}
    for k, v in model.state_dict().items():
        m = _LAYER_KEY.match(k)
        if not m:
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                v = v.index_select(1, H)
            elif k == "model.norm.weight":
                v = v.index_select(0, H)
            sd[k] = v
            continue
        t, rest = int(m.group(1)), m.group(2)
        if t not in pos:
            continue
        i = pos[t]
        heads, kvs = keep.heads[i], keep.kv_heads[i]
        units = torch.tensor(keep.mlp[i], device=dev)
        idx = lambda rows: torch.tensor(rows, device=dev, dtype=torch.long)  # noqa: E731
        if rest.endswith("layernorm.weight"):
            v = v.index_select(0, H)
        elif rest.startswith("self_attn.q_proj"):
            v = v.index_select(0, idx(_qk_rows(heads, d, keep.rotary_pairs)))
            v = (v.index_select(1, H) if v.dim() == 2 else v) * (q_scale if d_new != d else 1.0)
        elif rest.startswith("self_attn.k_proj"):
            v = v.index_select(0, idx(_qk_rows(kvs, d, keep.rotary_pairs)))
            v = v.index_select(1, H) if v.dim() == 2 else v
        elif rest.startswith("self_attn.v_proj"):
            v = v.index_select(0, idx(_v_rows(kvs, d, keep.v_dims[i])))
            v = v.index_select(1, H) if v.dim() == 2 else v
        elif rest == "self_attn.o_proj.weight":
            # a query head's output holds its KV head's value dims
            v = v.index_select(1, idx(_v_rows(heads, d, keep.v_dims[i]))).index_select(0, H)
        elif rest == "self_attn.o_proj.bias":
            v = v.index_select(0, H)
        elif rest.startswith(("self_attn.q_norm", "self_attn.k_norm")):
            pass  # head_dim unchanged (check_keep refuses rotary cuts with q/k norms)
        elif rest.startswith(("mlp.gate_proj", "mlp.up_proj")):
            v = v.index_select(0, units)
            v = v.index_select(1, H) if v.dim() == 2 else v
        elif rest == "mlp.down_proj.weight":
            v = v.index_select(1, units).index_select(0, H)
        elif rest == "mlp.down_proj.bias":
            v = v.index_select(0, H)
        else:
            raise InputError(f"prune: no surgery rule for parameter {k!r}")
        sd[f"model.layers.{i}.{rest}"] = v.contiguous()
    load_sliced(new, sd, model, "pruned")
    return new.to(dev).train(model.training)


def compose(outer: Keep, inner: Keep) -> Keep:
    """``inner`` (indices into the model ``outer`` produced) expressed in the original model's indexing."""
    L = [outer.layers[i] for i in inner.layers]
    heads, kvs, mlp, vd = [], [], [], []
    for j, i in enumerate(inner.layers):
        heads.append([outer.heads[i][h] for h in inner.heads[j]])
        kvs.append([outer.kv_heads[i][h] for h in inner.kv_heads[j]])
        mlp.append([outer.mlp[i][u] for u in inner.mlp[j]])
        # value dims: inner indexes the outer model's kept dims
        vd.append([outer.v_dims[i][x] for x in inner.v_dims[j]])
    return Keep(L, heads, kvs, mlp, [outer.hidden[c] for c in inner.hidden], inner.rotary_pairs, vd)


# ------------------------------------------------------------------------------------------------ gates
class Gates:
    """Multiply units by gates through forward hooks: ``values[kind]`` is ``[layers, units]`` (``hidden``:
    ``[units]``; ``layers``: ``[layers]``), 1 = untouched. With ``per_token=True`` every forward creates fresh
    ``[B, T, units]`` gates of ones that require grad (``self.records``), so one backward gives each unit's
    per-token ``dL/dg``."""

    def __init__(self, model, kinds=KINDS, per_token: bool = False):
        self.model, self.kinds, self.per_token = model, tuple(kinds), per_token
        D = dims(model)
        self.D = D
        L, dev = D["layers"], next(model.parameters()).device
        self.values = {"heads": torch.ones(L, D["heads"], device=dev), "mlp": torch.ones(L, D["mlp"], device=dev),
                       "layers": torch.ones(L, device=dev), "hidden": torch.ones(D["hidden"], device=dev),
                       "rotary": torch.ones(L, D["head_dim"] // 2, device=dev),
                       "v_dims": torch.ones(L, D["head_dim"], device=dev)}
        self.records: dict[tuple, list[torch.Tensor]] = {}
        self._handles = []
        self._hidden_gate = None

    def _gate(self, key, shape_bt, static: torch.Tensor) -> torch.Tensor:
        if not self.per_token:
            return static
        g = torch.ones(*shape_bt, static.shape[-1], device=static.device, requires_grad=True)
        self.records.setdefault(key, []).append(g)
        return g

    def __enter__(self):
        layers = self.model.model.layers
        d = self.D["head_dim"]
        ks = self.kinds
        for i, blk in enumerate(layers):
            at, mlp = blk.self_attn, blk.mlp
            if "heads" in ks or "rotary" in ks:
                def o_pre(m, args, i=i):
                    x = args[0]
                    B, T = x.shape[:2]
                    xs = x.view(B, T, -1, d)
                    if "heads" in ks:
                        xs = xs * self._gate(("heads", i), (B, T), self.values["heads"][i]).unsqueeze(-1)
                    if "rotary" in ks:  # value dims of every head
                        xs = xs * self._gate(("v_dims", i), (B, T), self.values["v_dims"][i]).unsqueeze(-2)
                    return (xs.reshape(B, T, -1),) + tuple(args[1:])
                self._handles.append(at.o_proj.register_forward_pre_hook(o_pre))
            if "rotary" in ks:
                def qk_post(m, args, out, i=i):
                    B, T = out.shape[:2]
                    g = self._gate(("rotary", i), (B, T), self.values["rotary"][i])
                    g = torch.cat([g, g], dim=-1)  # pair j gates dims j and j + d/2
                    return (out.view(B, T, -1, d) * g.unsqueeze(-2)).reshape(B, T, -1)
                self._handles.append(at.q_proj.register_forward_hook(qk_post))
                self._handles.append(at.k_proj.register_forward_hook(qk_post))
            if "mlp" in ks:
                def down_pre(m, args, i=i):
                    x = args[0]
                    return (x * self._gate(("mlp", i), x.shape[:2], self.values["mlp"][i]),) + tuple(args[1:])
                self._handles.append(mlp.down_proj.register_forward_pre_hook(down_pre))
            if "layers" in ks:
                saved = {}

                def blk_pre(m, args, kwargs, saved=saved):
                    saved["h"] = args[0] if args else kwargs["hidden_states"]

                def blk_post(m, args, out, i=i, saved=saved):
                    o = out[0] if isinstance(out, tuple) else out
                    h = saved.pop("h")
                    g = self._gate(("layers", i), h.shape[:2], self.values["layers"][i:i + 1])
                    o = h + g * (o - h)
                    return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
                self._handles.append(blk.register_forward_pre_hook(blk_pre, with_kwargs=True))
                self._handles.append(blk.register_forward_hook(blk_post))
            if "hidden" in ks:
                for mod in (at.o_proj, mlp.down_proj):
                    self._handles.append(mod.register_forward_hook(self._hidden_post))
        if "hidden" in ks:
            self._handles.append(self.model.get_input_embeddings().register_forward_hook(self._hidden_embed))
        return self

    def _hidden_embed(self, m, args, out):
        B, T = out.shape[:2]
        self._hidden_gate = self._gate(("hidden", 0), (B, T), self.values["hidden"])
        return out * self._hidden_gate

    def _hidden_post(self, m, args, out):
        g = self._hidden_gate if self._hidden_gate is not None else self.values["hidden"]
        return out * g

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hidden_gate = None


# ------------------------------------------------------------------------------------------------ calibration
def _rows(calib_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    for r in range(calib_ids.shape[0]):
        m = None if attention_mask is None else attention_mask[r:r + 1]
        yield calib_ids[r:r + 1], m


# ------------------------------------------------------------------------------------------------ selection
@dataclass
class Targets:
    """Counts to keep: query heads per layer, MLP units per layer, layers, hidden channels, rotary pairs."""

    heads: int
    mlp: int
    layers: int
    hidden: int
    rotary_pairs: int


def select(model, scores: dict, targets: Targets, *, gqa: str = "per_group") -> Keep:
    """The ``Keep`` with the most important units at ``targets`` counts (GQA-consistent, uniform per layer)."""
    if gqa not in GQA_MODES:
        raise ConfigError("prune.gqa", gqa, f"one of {list(GQA_MODES)}")
    keep = full_keep(model)
    D = dims(model)
    nh, nkv = D["heads"], D["kv_heads"]
    g = nh // nkv
    L = D["layers"]

    def top(score: torch.Tensor, n: int) -> list[int]:
        return sorted(torch.argsort(score.double(), descending=True, stable=True)[:n].tolist())

    if "layers" in scores and targets.layers < L:
        keep.layers = top(scores["layers"], targets.layers)
    n = len(keep.layers)
    heads, kvs = [], []
    for li in keep.layers:
        if "heads" in scores and targets.heads < nh:
            s = scores["heads"][li]
            if gqa == "whole_groups":
                n_groups = max(1, targets.heads // g)
                grp = top(s.view(nkv, g).sum(1), n_groups)
                heads.append([kv * g + j for kv in grp for j in range(g)])
                kvs.append(grp)
            else:
                per = max(1, targets.heads // nkv)
                heads.append(sorted(kv * g + j for kv in range(nkv) for j in top(s.view(nkv, g)[kv], per)))
                kvs.append(list(range(nkv)))
        else:
            heads.append(list(range(nh)))
            kvs.append(list(range(nkv)))
    keep.heads, keep.kv_heads = heads, kvs
    keep.mlp = [top(scores["mlp"][li], targets.mlp) if "mlp" in scores and targets.mlp < D["mlp"]
                else list(range(D["mlp"])) for li in keep.layers]
    if "hidden" in scores and targets.hidden < D["hidden"]:
        keep.hidden = top(scores["hidden"], targets.hidden)
    keep.rotary_pairs = min(targets.rotary_pairs, D["head_dim"] // 2)
    if "v_dims" in scores and keep.rotary_pairs < D["head_dim"] // 2:
        keep.v_dims = [top(scores["v_dims"][li], 2 * keep.rotary_pairs) for li in keep.layers]
    else:
        keep.v_dims = [list(range(D["head_dim"]))] * n
    check_keep(model, keep)
    return keep


def gate_values(model, keep: Keep, value: float) -> dict:
    """Gate tensors that leave ``keep`` at 1 and everything else at ``value`` (the fading schedule's point)."""
    D = dims(model)
    L, dev = D["layers"], next(model.parameters()).device
    v = {"heads": torch.full((L, D["heads"]), value, device=dev), "mlp": torch.full((L, D["mlp"]), value, device=dev),
         "layers": torch.full((L,), value, device=dev), "hidden": torch.full((D["hidden"],), value, device=dev),
         "rotary": torch.full((L, D["head_dim"] // 2), value, device=dev),
         "v_dims": torch.full((L, D["head_dim"]), value, device=dev)}
    v["hidden"][keep.hidden] = 1.0
    for j, li in enumerate(keep.layers):
        v["layers"][li] = 1.0
        v["heads"][li, keep.heads[j]] = 1.0
        v["mlp"][li, keep.mlp[j]] = 1.0
        v["rotary"][li, : keep.rotary_pairs] = 1.0
        v["v_dims"][li, keep.v_dims[j]] = 1.0
    return v


def frozen_masks(model, keep: Keep) -> dict[str, torch.Tensor]:
    """Parameter name -> 0/1 mask (1 = trainable) that freezes every unit ``keep`` drops (its rows/columns)."""
    D = dims(model)
    d = D["head_dim"]
    masks = {}
    pos = {t: j for j, t in enumerate(keep.layers)}
    for i, blk in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        if i not in pos:
            for n, p in blk.named_parameters():
                masks[pre + n] = torch.zeros_like(p)
            continue
        j = pos[i]
        at, mlp = blk.self_attn, blk.mlp
        qm = torch.zeros(D["heads"], device=at.q_proj.weight.device)
        qm[keep.heads[j]] = 1
        kvm = torch.zeros(D["kv_heads"], device=qm.device)
        kvm[keep.kv_heads[j]] = 1
        masks[pre + "self_attn.q_proj.weight"] = qm.repeat_interleave(d)[:, None].expand_as(at.q_proj.weight)
        masks[pre + "self_attn.o_proj.weight"] = qm.repeat_interleave(d)[None, :].expand_as(at.o_proj.weight)
        for nm in ("k_proj", "v_proj"):
            masks[pre + f"self_attn.{nm}.weight"] = kvm.repeat_interleave(d)[:, None].expand_as(
                getattr(at, nm).weight)
        um = torch.zeros(D["mlp"], device=qm.device)
        um[keep.mlp[j]] = 1
        masks[pre + "mlp.gate_proj.weight"] = um[:, None].expand_as(mlp.gate_proj.weight)
        masks[pre + "mlp.up_proj.weight"] = um[:, None].expand_as(mlp.up_proj.weight)
        masks[pre + "mlp.down_proj.weight"] = um[None, :].expand_as(mlp.down_proj.weight)
    return {k: m.contiguous() for k, m in masks.items()}


@contextlib.contextmanager
def frozen(model, keep: Keep):
    """Within the block, gradients of the units ``keep`` drops are zero and their weights stay as they were
    (``restore()`` after each optimizer step undoes weight decay on them)."""
    masks = frozen_masks(model, keep)
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in masks}
    handles = [params[k].register_hook(lambda gr, m=m: gr * m) for k, m in masks.items()]

    def restore():
        with torch.no_grad():
            for k, m in masks.items():
                p = params[k]
                p.copy_(torch.where(m.bool(), p, saved[k]))

    try:
        yield restore
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ fold-in
@torch.no_grad()
def fold_in(model, keep: Keep, calib_ids: torch.Tensor, *, ridge: float = 1e-2,
            attention_mask: torch.Tensor | None = None) -> dict:
    """Least-squares refit of each kept layer's ``o_proj`` (kept heads' columns) and ``down_proj`` (kept units'
    columns) so the kept units alone reproduce the full output of the model as it is now (every unit at gate 1)
    on the calibration tokens. Ridge-regularised toward the current weights (``ridge`` x mean diagonal of the
    Gram matrix). Returns ``{param name: new weight}`` in the unpruned model's indexing (not applied)."""
    D = dims(model)
    d = D["head_dim"]
    layers = model.model.layers
    stats: dict = {}
    handles = []
    pos = {t: j for j, t in enumerate(keep.layers)}

    def collect(name, i, cols):
        def hook(m, a, o):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            y = o.reshape(-1, o.shape[-1]).double()
            if m.bias is not None:
                y = y - m.bias.double()
            xk = x[:, cols]
            s = stats.setdefault((name, i), {"xx": 0, "xy": 0, "cols": cols})
            s["xx"] = s["xx"] + xk.T @ xk
            s["xy"] = s["xy"] + xk.T @ y
        return hook

    for i, blk in enumerate(layers):
        if i not in pos:
            continue
        j = pos[i]
        hc = [h * d + x for h in keep.heads[j] for x in range(d)]
        if len(keep.heads[j]) < D["heads"]:
            handles.append(blk.self_attn.o_proj.register_forward_hook(collect("self_attn.o_proj", i, hc)))
        if len(keep.mlp[j]) < D["mlp"]:
            handles.append(blk.mlp.down_proj.register_forward_hook(collect("mlp.down_proj", i, keep.mlp[j])))
    try:
        dev = next(model.parameters()).device
        for ids, m in _rows(calib_ids.to(dev), attention_mask):
            model(input_ids=ids, attention_mask=m, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for (name, i), s in stats.items():
        W = layers[i].get_submodule(name).weight
        cols = torch.tensor(s["cols"], device=W.device)
        w0 = W.double().index_select(1, cols)                  # [out, k]
        xx = s["xx"]
        lam = ridge * float(torch.diagonal(xx).mean()) + 1e-12
        A = xx + lam * torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)
        wk = torch.linalg.solve(A, s["xy"] + lam * w0.T).T     # [out, k]
        new = W.detach().clone()
        new[:, cols] = wk.to(W.dtype)
        out[f"model.layers.{i}.{name}.weight"] = new
    return out



@dataclass
class PruneReport:
    """One cut: what was kept (in the student's indexing before the cut), scores, fold-in, FLOPs."""

    method: str
    source: str
    kinds: list[str]
    before: dict
    after: dict
    keep: dict
    score_summary: dict = field(default_factory=dict)
    removed_share_by_layer: dict = field(default_factory=dict)
    fold_in: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
