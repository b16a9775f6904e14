"""Forward FLOPs per token of a Llama-style model (SPEC S3.3): analytic per component, and counted by
``torch.utils.flop_counter.FlopCounterMode`` to cross-check the analytic figure."""

from __future__ import annotations

import torch

from .prune import dims


def flops_per_token(model, context_len: int = 256) -> dict:
    """Analytic forward FLOPs per token (2 per multiply-add) at ``context_len`` tokens, per component:
    attention projections (q, k, v, o), attention scores (QK^T and AV, full T x T as SDPA computes them),
    MLP (gate, up, down), LM head. Embedding lookups, norms and rotary are not matmuls and are not counted."""
    D = dims(model)
    H, nh, nkv, d, I, V, L = D["hidden"], D["heads"], D["kv_heads"], D["head_dim"], D["mlp"], D["vocab"], D["layers"]
    T = context_len
    comp = {"attention_projections": L * 2 * H * (nh * d + 2 * nkv * d + nh * d),
            "attention_scores": L * 4 * nh * d * T,
            "mlp": L * 2 * 3 * H * I,
            "lm_head": 2 * H * V}
    comp["total"] = sum(comp.values())
    return comp


def counted_flops_per_token(model, context_len: int = 256) -> float:
    """FLOPs per token of one forward over ``context_len`` tokens, counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    ids = torch.zeros(1, context_len, dtype=torch.long, device=dev)
    counter = FlopCounterMode(display=False)
    # the math backend runs attention as matmuls the counter sees (the fused CPU kernel is not counted)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops() / context_len


def flops_report(before, after, context_len: int = 256) -> dict:
    """FLOPs/token before and after per component, the saving in %, parameters, and the counter cross-check."""
    from .info import param_counts

    fb, fa = flops_per_token(before, context_len), flops_per_token(after, context_len)
    cb, ca = counted_flops_per_token(before, context_len), counted_flops_per_token(after, context_len)
    pb, pa = param_counts(before)["total"], param_counts(after)["total"]
    return {"context_len": context_len,
            "components": {k: {"before": fb[k], "after": fa[k],
                               "saved_pct": 100.0 * (1 - fa[k] / fb[k]) if fb[k] else 0.0} for k in fb},
            "counted": {"before": cb, "after": ca,
                        "analytic_vs_counted_pct": [100.0 * (fb["total"] / cb - 1), 100.0 * (fa["total"] / ca - 1)]},
            "params": {"before": pb, "after": pa, "saved_pct": 100.0 * (1 - pa / pb)},
            "flops_saved_pct": 100.0 * (1 - fa["total"] / fb["total"])}

