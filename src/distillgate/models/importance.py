"""Importance of every prunable unit (SPEC S3.2), the scores :func:`distillgate.models.prune.select` cuts by.

``gradient``: the accumulated ``|dL/dg|`` of a gate on each unit's output, per calibration row; ``fisher``: the
sum over rows of ``(dL/dg)^2``; ``taylor``: ``sum_t |a . dL/da|``; ``obd``: Optimal Brain Damage on the model's
own output, the gate's diagonal softmax Fisher ``sum_rows (dz/dg . c)^2`` with Gaussian probes
``c ~ N(0, diag(p) - p p^T)`` at every position (an unbiased estimate of the second derivative of
KL(model || model without the unit); its first-order term is zero, so it needs no teacher and does not mix in what
an unconverged student still gets wrong); ``taylor2``: the second-order Taylor estimate of the loss change when
the unit is removed (its gate 1 -> 0), ``sum_rows (-dL/dg + 1/2 d2L/dg2)``, signed, with the Gauss-Newton
second derivative from obd's probes (for L = KL(teacher || student) it is the exact Hessian in the student's logits,
``diag(p) - p p^T``): OBD with its first-order term kept, since an unconverged student is not at a minimum;
``learned``: learned gates (weights frozen), see :func:`_learned`; ``activation`` (Minitron): mean activation
magnitude; ``magnitude``: weight norms; ``random``. L is the distillation loss (forward KL to the teacher's
logits on the same tokens), or a model's own next-token NLL when it scores itself (the teacher)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..losses.divergence import kl_logprobs
from .prune import Gates, _rows, dims

METHODS = ("gradient", "fisher", "taylor", "obd", "taylor2", "learned", "activation", "magnitude", "random")
_GATE_KEY = {"heads": "heads", "mlp": "mlp", "layers": "layers", "hidden": "hidden", "rotary": "v_dims"}


def kl_sum(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over every position, in float32 or the logits' wider dtype."""
    dt = torch.promote_types(s_logits.dtype, torch.float32)
    return kl_logprobs(torch.log_softmax(t_logits.to(dt), -1), torch.log_softmax(s_logits.to(dt), -1)).sum()


@torch.no_grad()
def _magnitude(model, kinds) -> dict:
    layers = model.model.layers
    D = dims(model)
    d = D["head_dim"]
    out: dict = {}
    if "heads" in kinds:
        out["heads"] = torch.stack([
            b.self_attn.q_proj.weight.double().view(D["heads"], -1).norm(dim=1)
            * b.self_attn.o_proj.weight.double().view(D["hidden"], D["heads"], d).norm(dim=(0, 2)) for b in layers])
    if "mlp" in kinds:
        out["mlp"] = torch.stack([b.mlp.gate_proj.weight.double().norm(dim=1) * b.mlp.up_proj.weight.double().norm(dim=1)
                                  * b.mlp.down_proj.weight.double().norm(dim=0) for b in layers])
    if "layers" in kinds:
        out["layers"] = torch.stack([b.self_attn.o_proj.weight.double().norm() + b.mlp.down_proj.weight.double().norm()
                                     for b in layers])
    if "hidden" in kinds:
        out["hidden"] = model.get_input_embeddings().weight.double().norm(dim=0)
    if "rotary" in kinds:
        out["v_dims"] = torch.stack([
            b.self_attn.v_proj.weight.double().view(D["kv_heads"], d, -1).norm(dim=(0, 2))
            * b.self_attn.o_proj.weight.double().view(D["hidden"], D["heads"], d).norm(dim=(0, 1)) for b in layers])
    return out


def importance(model, calib_ids: torch.Tensor, *, kinds=("heads", "mlp"), method: str = "gradient",
               teacher=None, attention_mask: torch.Tensor | None = None, seed: int = 0,
               learned_epochs: int = 4) -> dict:
    """Scores (float64, higher = more important) per kind: ``heads``/``mlp`` ``[layers, units]``, ``layers``
    ``[layers]``, ``hidden`` ``[hidden]``, ``rotary`` -> ``v_dims`` ``[layers, head_dim]``.

    ``gradient``/``taylor`` need a loss: forward KL from ``teacher``'s logits on the same tokens (the
    distillation loss), or, with ``teacher=None``, the model's own next-token NLL (scoring the teacher itself).
    One forward + backward per calibration row; the model's weights get no gradient and are not changed."""
    if method not in METHODS:
        raise ConfigError("prune.importance.method", method, f"one of {list(METHODS)}")
    kinds = tuple(kinds)
    D = dims(model)
    if method == "magnitude":
        return _magnitude(model, kinds)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        shapes = {"heads": (D["layers"], D["heads"]), "mlp": (D["layers"], D["mlp"]), "layers": (D["layers"],),
                  "hidden": (D["hidden"],), "rotary": (D["layers"], D["head_dim"])}
        return {("v_dims" if k == "rotary" else k): torch.rand(shapes[k], generator=gen, dtype=torch.float64)
                for k in kinds}
    dev = next(model.parameters()).device
    if method == "learned":
        return _learned(model, calib_ids, kinds, teacher, attention_mask, epochs=learned_epochs)
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    acc: dict = {}
    act: dict = {}
    handles = []
    try:
        if method == "activation":
            layers = model.model.layers
            for i, b in enumerate(layers):
                def o_pre(m, a, i=i):
                    x = a[0].double()
                    B, T = x.shape[:2]
                    xs = x.view(B, T, D["heads"], D["head_dim"])
                    act.setdefault(("heads", i), []).append(xs.norm(dim=-1).sum((0, 1)))
                    act.setdefault(("v_dims", i), []).append(xs.abs().sum((0, 1, 2)))
                def down_pre(m, a, i=i):
                    act.setdefault(("mlp", i), []).append(a[0].double().abs().sum((0, 1)))
                def ln_post(m, a, o):
                    act.setdefault(("hidden", 0), []).append(o.double().abs().sum((0, 1)))
                def blk_pre(m, a, kw, i=i):
                    act.setdefault(("_in", i), []).append(a[0] if a else kw["hidden_states"])
                def blk_post(m, a, o, i=i):
                    h = act[("_in", i)].pop()
                    o = o[0] if isinstance(o, tuple) else o
                    bi = 1.0 - torch.nn.functional.cosine_similarity(h.double(), o.double(), dim=-1).sum()
                    act.setdefault(("layers", i), []).append(bi)
                handles += [b.self_attn.o_proj.register_forward_pre_hook(o_pre),
                            b.mlp.down_proj.register_forward_pre_hook(down_pre),
                            b.input_layernorm.register_forward_hook(ln_post),
                            b.post_attention_layernorm.register_forward_hook(ln_post),
                            b.register_forward_pre_hook(blk_pre, with_kwargs=True), b.register_forward_hook(blk_post)]
            with torch.no_grad():
                for ids, m in _rows(calib_ids.to(dev), attention_mask):
                    model(input_ids=ids, attention_mask=m, use_cache=False)
            n_tok = calib_ids.numel()
            out = {}
            for kind in kinds:
                key = "v_dims" if kind == "rotary" else kind
                if key in ("hidden",):
                    out[key] = torch.stack(act[(key, 0)]).sum(0) / n_tok
                elif key == "layers":
                    out[key] = torch.stack([torch.stack(act[(key, i)]).sum() for i in range(D["layers"])]) / n_tok
                else:
                    out[key] = torch.stack([torch.stack(act[(key, i)]).sum(0) for i in range(D["layers"])]) / n_tok
            return out
        gen = torch.Generator(device=dev).manual_seed(seed)
        with Gates(model, kinds, per_token=True) as gates, torch.enable_grad():
            for ids, m in _rows(calib_ids.to(dev), attention_mask):
                gates.records.clear()
                logits = model(input_ids=ids, attention_mask=m, use_cache=False).logits[:, :-1]
                second = None
                if method in ("obd", "taylor2"):
                    # a Gaussian probe c ~ N(0, diag(p) - p p^T) per position: E[(dz/dg . c)^2] is the softmax
                    # Fisher J^T (diag(p) - p p^T) J of the gate, with lighter tails than a sampled label's score
                    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
                    with torch.no_grad():
                        p = torch.softmax(z, -1)
                        e, r = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype), p.sqrt()
                        c = r * e - p * (r * e).sum(-1, keepdim=True)  # covariance diag(p) - p p^T
                        if m is not None:  # padded positions count nothing
                            c = c * m[:, 1:, None].to(c.dtype)
                    second = (z * c).sum()
                if method == "obd":
                    loss = second
                elif teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=ids, attention_mask=m, use_cache=False).logits[:, :-1]
                    loss = kl_sum(logits, t_logits) / max(1, logits.shape[1])
                else:
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                             ids[:, 1:].reshape(-1))
                keys = list(gates.records)
                leaves = [g for k in keys for g in gates.records[k]]
                grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=method == "taylor2")
                if method == "taylor2":  # the probe's gate derivatives: E[(.)^2] = the Gauss-Newton diagonal
                    it2 = iter(torch.autograd.grad(second, leaves, allow_unused=True))
                it = iter(grads)
                for k in keys:
                    for gt in gates.records[k]:
                        gr = next(it)
                        if gr is None:
                            gr = torch.zeros_like(gt)
                        gr = gr.double()  # [B, T, U]
                        if method == "taylor2":
                            g2 = next(it2)
                            g2 = torch.zeros_like(gr) if g2 is None else g2.double()
                            # removing the unit is dg = -1: dL ~ -dL/dg + 1/2 d2L/dg2, where d2L/dg2 of the mean
                            # over the row's T positions is J^T (diag(p) - p p^T) J / T, exactly the softmax
                            # Hessian of KL(teacher || student) (and of the NLL) in the student's logits
                            val = -gr.sum(1).sum(0) + 0.5 * g2.sum(1).pow(2).sum(0) / max(1, logits.shape[1])
                        elif method == "taylor":
                            val = gr.abs().sum((0, 1))
                        elif method in ("fisher", "obd"):
                            val = gr.sum(1).pow(2).sum(0)
                        else:
                            val = gr.sum(1).abs().sum(0)
                        acc[k] = acc.get(k, 0) + val
        return _gathered(acc, kinds, D)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _gathered(acc: dict, kinds, D: dict) -> dict:
    """Per-gate accumulators ``{(key, layer): [units]}`` -> the :func:`importance` layout."""
    out = {}
    for kind in kinds:
        key = "v_dims" if kind == "rotary" else kind
        if key == "hidden":
            out[key] = acc[("hidden", 0)]
        elif key == "layers":
            out[key] = torch.stack([acc[("layers", i)].sum() for i in range(D["layers"])])
        else:
            out[key] = torch.stack([acc[(key, i)] for i in range(D["layers"])])
    return out


class TaylorTrace:
    """First-order Taylor importance accumulated along training (Molchanov et al. 2017, "Pruning convolutional
    neural networks for resource efficient inference": the criterion averaged over the fine-tuning minibatches):
    while active, every forward of ``model`` multiplies each unit by a per-token gate of ones, and every backward
    that runs (the trainer's, on its own loss and data) leaves ``dL/dg_t = a_t . dL/da_t`` on it. Call
    :meth:`collect` after each step (a training callback); :meth:`scores` is ``sum_steps sum_t |a . dL/da|`` in
    :func:`importance`'s layout. With L the re-distillation objective on the re-distillation batches, this is the
    ``taylor`` score averaged over the first steps of the trajectory rather than taken at one point."""

    def __init__(self, model, kinds=("heads", "mlp")):
        self.model, self.kinds = model, tuple(kinds)
        self.D = dims(model)
        self.gates = Gates(model, self.kinds, per_token=True)
        self.acc: dict = {}
        self.steps = 0

    def __enter__(self):
        self.gates.__enter__()
        return self

    def __exit__(self, *exc):
        self.gates.__exit__(*exc)

    def collect(self, *_args) -> None:
        for k, gs in self.gates.records.items():
            for g in gs:
                if g.grad is not None:
                    self.acc[k] = self.acc.get(k, 0) + g.grad.double().abs().sum((0, 1))
        self.gates.records.clear()
        self.steps += 1

    def scores(self) -> dict:
        if not self.acc:
            raise RuntimeError("TaylorTrace: no backward pass ran while it was active")
        D = self.D
        acc = dict(self.acc)
        for kind in self.kinds:  # a gate no backward reached scores 0
            key = _GATE_KEY[kind]
            n = {"heads": D["heads"], "mlp": D["mlp"], "v_dims": D["head_dim"], "hidden": D["hidden"],
                 "layers": 1}[key]
            dev = next(self.model.parameters()).device
            for i in range(1 if key == "hidden" else D["layers"]):
                acc.setdefault((key, i), torch.zeros(n, dtype=torch.float64, device=dev))
        return _gathered(acc, self.kinds, D)


def _loss(model, ids, m, t_logits):
    logits = model(input_ids=ids, attention_mask=m, use_cache=False).logits[:, :-1]
    if t_logits is not None:
        return kl_sum(logits, t_logits) / max(1, logits.shape[1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _learned(model, calib_ids, kinds, teacher, attention_mask, *, epochs: int) -> dict:
    """Learned gates (weights frozen): one gate per unit, ``g`` in [0, 1] from 1, trained by projected gradient
    descent on ``L + sum_kind c_kind * sum(g_kind)``, one calibration row per step, ``epochs`` passes. ``c_kind`` is
    the median ``|dL/dg|`` of the kind at the start, so a unit the loss does not need (``|dL/dg| < c``) drifts to 0
    while one it needs is held up, and as gates fall the others' gradients see the units already gone (the
    joint effect a one-shot score misses). The step makes a unit with no gradient reach 0 in half the steps.
    Score: the gate's mean value along the path (a unit that falls early scores lowest)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    keys = [_GATE_KEY[k] for k in kinds]
    rows = list(_rows(calib_ids.to(dev), attention_mask))
    try:
        with torch.no_grad():
            t_logits = [None if teacher is None else
                        teacher(input_ids=ids, attention_mask=m, use_cache=False).logits[:, :-1] for ids, m in rows]
        with Gates(model, kinds) as gates, torch.enable_grad():
            g = {k: torch.ones_like(gates.values[k], dtype=torch.float64) for k in keys}
            path = {k: torch.zeros_like(v) for k, v in g.items()}
            c, lr = {}, {}
            steps = max(1, epochs * len(rows))
            for step in range(steps):
                ids, m = rows[step % len(rows)]
                leaves = {k: v.clone().float().requires_grad_(True) for k, v in g.items()}
                gates.values.update(leaves)
                loss = _loss(model, ids, m, t_logits[step % len(rows)])
                grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
                with torch.no_grad():
                    for k, gr in zip(keys, grads):
                        gr = torch.zeros_like(g[k]) if gr is None else gr.double()
                        if k not in c:
                            c[k] = gr.abs().median().clamp_min(1e-12)
                            lr[k] = 2.0 / (float(c[k]) * steps)
                        g[k] = (g[k] - lr[k] * (gr + c[k])).clamp(0.0, 1.0)
                        path[k] += g[k]
        return {k: path[k] / steps for k in keys}
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
