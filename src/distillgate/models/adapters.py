"""Hooks that give the S2.2 and S2.3 channels what they need from a model, without changing its forward path.

* :class:`HeadCapture` -- a forward pre-hook on chosen layers' ``self_attn`` keeps the layer's input and its
  rotary ``(cos, sin)``; :meth:`HeadCapture.qkv` then forms q, k, v for the chosen heads only, from row slices of
  ``q_proj`` / ``k_proj`` / ``v_proj`` (rotary applied, the GQA key/value head picked), so the gradient reaches
  exactly those rows and the model keeps running SDPA (never eager attention).
* :class:`BlockCapture` -- forward hooks keeping chosen decoder blocks' outputs (the residual stream before the
  next block's input LayerNorm: the "pre-LayerNorm residual feature").
* :class:`FeatureAdapters` -- S2.3's gated adapters: at the end of every student block ``i`` the output becomes
  ``h + g_i * P_i(f_i)`` at the prediction positions, with ``f_i`` the teacher's matching block feature
  (detached), ``P_i`` identity when the widths match (a learnable linear map where they differ) and the gate
  ``g_i = sigmoid(a_i) * m(progress)``: ``a_i`` learnable, initialised near closed, ``m`` the anneal schedule
  (1 -> 0 within each training call). The adapters live as a submodule of the student only while it trains
  (so AdamW and the checkpoints carry them and resume stays bitwise); :meth:`FeatureAdapters.detach` removes
  them and the model is a plain Hugging Face model again.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

ADAPTER_ATTR = "distill_adapters"


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise InputError(f"{type(model).__name__}: no decoder layers at model.model.layers (Llama-style models)")
    return layers


def check_attention_supported(model) -> None:
    """InputError unless every layer's attention is Llama-style (q/k/v/o_proj, rotary, no q/k norm)."""
    for i, layer in enumerate(decoder_layers(model)):
        a = getattr(layer, "self_attn", None)
        if a is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise InputError(f"{type(model).__name__} layer {i}: the attention channel needs Llama-style "
                             f"self_attn.q_proj/k_proj/v_proj/o_proj")
        if hasattr(a, "q_norm") or hasattr(a, "k_norm"):
            raise InputError(f"{type(model).__name__} layer {i}: q/k norms are not supported by the attention channel")
        if getattr(a, "sliding_window", None):
            raise InputError(f"{type(model).__name__} layer {i}: sliding-window attention is not supported")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rows(linear: torch.nn.Linear, x: torch.Tensor, head: int, d: int) -> torch.Tensor:
    w = linear.weight[head * d:(head + 1) * d]
    b = None if linear.bias is None else linear.bias[head * d:(head + 1) * d]
    return torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


class HeadCapture:
    """``with HeadCapture(model, layers) as cap: model(...)``; then ``cap.qkv(layer, heads)``."""

    def __init__(self, model, layers):
        self.model, self.layers = model, sorted(set(int(x) for x in layers))
        self.inputs: dict[int, tuple] = {}
        self._handles = []

    def __enter__(self):
        mods = decoder_layers(self.model)
        for li in self.layers:
            def pre(m, args, kwargs, li=li):
                h = kwargs.get("hidden_states", args[0] if args else None)
                self.inputs[li] = (h, kwargs.get("position_embeddings"))
            self._handles.append(mods[li].self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def qkv(self, layer: int, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(q, k, v, scaling)``: ``[B, h, T, d]`` each for query heads ``heads`` of ``layer``, float32, rotary
        applied to q and k, k/v from each head's GQA group."""
        attn = decoder_layers(self.model)[layer].self_attn
        x, pe = self.inputs[layer]
        if pe is None:
            raise InputError(f"layer {layer}: no rotary position embeddings were passed to self_attn")
        cos, sin = (t.float().unsqueeze(1) for t in pe)                     # [B, 1, T, d]
        d = attn.head_dim
        n_q = attn.q_proj.out_features // d
        group = n_q // max(1, attn.k_proj.out_features // d)
        x = x.float()
        qs, ks, vs = [], [], []
        for h in heads:
            q = _rows(attn.q_proj, x, h, d).float()
            k = _rows(attn.k_proj, x, h // group, d).float()
            v = _rows(attn.v_proj, x, h // group, attn.v_proj.out_features // (n_q // group)).float()
            qs.append(q), ks.append(k), vs.append(v)
        q, k, v = (torch.stack(t, dim=1) for t in (qs, ks, vs))              # [B, h, T, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v, float(getattr(attn, "scaling", d ** -0.5))


class BlockCapture:
    """``with BlockCapture(model, layers) as cap: model(...)``; ``cap.out[i]`` = block i's output ``[B, T, H]``."""

    def __init__(self, model, layers):
        self.model, self.layers = model, sorted(set(int(x) for x in layers))
        self.out: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        mods = decoder_layers(self.model)
        for li in self.layers:
            def post(m, args, out, li=li):
                self.out[li] = out[0] if isinstance(out, tuple) else out
            self._handles.append(mods[li].register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def anneal(progress: float, schedule: str, start: float, end: float) -> float:
    """Gate multiplier in [0, 1] at ``progress`` (share of this training call's steps done): 1 before
    ``start``, 0 from ``end`` on, in between linear or cosine; ``constant``: 1 until ``end``, then 0."""
    if progress >= end:
        return 0.0
    if progress <= start or schedule == "constant":
        return 1.0
    x = (progress - start) / max(end - start, 1e-12)
    return 1.0 - x if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))


class FeatureAdapters(torch.nn.Module):
    """Gated teacher-feature injection at the end of each student block (see the module docstring).

    ``widths``: per student layer (s_width, t_width). ``gate_init``: initial sigmoid(a) (near closed, e.g. 0.02).
    """

    def __init__(self, widths: list[tuple[int, int]], gate_init: float, schedule: str, start: float, end: float):
        super().__init__()
        self.n = len(widths)
        g = min(max(gate_init, 1e-6), 1 - 1e-6)
        self.gate_logit = torch.nn.Parameter(torch.full((self.n,), math.log(g / (1 - g))))
        self.proj = torch.nn.ModuleList()
        for sw, tw in widths:
            if sw == tw:
                self.proj.append(torch.nn.Identity())
            else:
                lin = torch.nn.Linear(tw, sw, bias=False)
                torch.nn.init.normal_(lin.weight, std=1.0 / math.sqrt(tw))
                self.proj.append(lin)
        self.register_buffer("progress", torch.zeros(()), persistent=True)
        self.schedule, self.start, self.end = schedule, start, end
        self.closed = False           # True: gates forced shut (evaluation of the plain student)
        self._feats = None
        self._pos = None
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = []
        self._model = None

    def multiplier(self) -> float:
        return 0.0 if self.closed else anneal(float(self.progress), self.schedule, self.start, self.end)

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit) * self.multiplier()

    def project(self, i: int, f: torch.Tensor) -> torch.Tensor:
        p = self.proj[i]
        return f if isinstance(p, torch.nn.Identity) else p(f.to(p.weight.dtype))

    # ---------------------------------------------------------------------------- lifecycle
    def attach(self, model) -> "FeatureAdapters":
        """Become ``model.distill_adapters`` and hook every decoder block."""
        if hasattr(model, ADAPTER_ATTR):
            raise InputError(f"{type(model).__name__} already carries {ADAPTER_ATTR}")
        layers = decoder_layers(model)
        if len(layers) != self.n:
            raise InputError(f"adapters for {self.n} layers, model has {len(layers)}")
        p = next(model.parameters())
        self.to(p.device)
        model.add_module(ADAPTER_ATTR, self)
        object.__setattr__(self, "_model", model)       # a plain reference, not a submodule (no cycle)
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(lambda m, a, out, i=i: self._hook(i, out)))
        return self

    def detach(self) -> None:
        """Remove the hooks and the submodule: the model is the plain student again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._model is not None and hasattr(self._model, ADAPTER_ATTR):
            delattr(self._model, ADAPTER_ATTR)
        self._model = None

    def set_teacher(self, feats: torch.Tensor | None, b_idx: torch.Tensor, t_idx: torch.Tensor) -> None:
        """Teacher features ``[N, L, Ht]`` at the prediction positions (b_idx, t_idx) for the next forward;
        None: capture only (no injection)."""
        self._feats = None if feats is None else feats.detach()
        self._pos = (b_idx, t_idx)
        self.captured = {}

    def clear(self) -> None:
        self._feats, self._pos, self.captured = None, None, {}

    def _hook(self, i: int, out):
        if self._pos is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        b, t = self._pos
        self.captured[i] = h[b, t]                                           # before the injection
        if self._feats is None:
            return None
        g = self.gates()[i]
        if float(g.detach()) == 0.0:
            return None                       # closed: the block output is untouched (bitwise the plain model)
        add = self.project(i, self._feats[:, i].to(h.device)).to(h.dtype) * g.to(h.dtype)
        delta = torch.zeros_like(h).index_put((b, t), add)
        new = h + delta
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
