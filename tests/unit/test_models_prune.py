"""Structure-aware pruning (SPEC S3): surgery exactness, gates, importance, fold-in, FLOPs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from distillgate.errors import ConfigError, InputError
from distillgate.models import flops as F
from distillgate.models import importance as I
from distillgate.models import prune as P


def _model(model_type: str, vocab: int, heads=4, kv=2, layers=3, hidden=32, inter=64, seed=0, tie=True):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": hidden // heads} if model_type == "qwen3" else {}
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                               max_position_embeddings=256, tie_word_embeddings=tie, **extra)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(20.0)
    return m.eval()


@pytest.fixture
def ids(tiny_tokenizer):
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, len(tiny_tokenizer), (3, 24), generator=g)


def _gated_kl(m, t, row, head_gates):
    """Per-position KL(teacher || student) of ``row`` with the student's head gates set to ``head_gates``."""
    g = P.Gates(m, ("heads",))
    g.values["heads"] = head_gates
    with torch.no_grad(), g:
        lg = m(row).logits[:, :-1]
        tl = t(row).logits[:, :-1]
    return float(I.kl_sum(lg.double(), tl.double())) / lg.shape[1]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_keeping_everything_reproduces_logits_exactly(model_type, tiny_tokenizer, ids):
    m = _model(model_type, len(tiny_tokenizer))
    new = P.apply_keep(m, P.full_keep(m))
    assert type(new) is type(m)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, new(ids).logits)


@pytest.mark.parametrize("kinds", [("heads",), ("mlp",), ("layers",), ("rotary",), ("heads", "mlp", "layers")])
def test_gated_to_zero_equals_surgery(kinds, tiny_tokenizer, ids):
    """A model whose dropped units are gated to 0 computes what the pruned model computes."""
    m = _model("llama", len(tiny_tokenizer))
    scores = I.importance(m, ids, kinds=kinds, method="magnitude")
    D = P.dims(m)
    t = P.Targets(heads=2 if "heads" in kinds else D["heads"], mlp=40 if "mlp" in kinds else D["mlp"],
                  layers=2 if "layers" in kinds else D["layers"], hidden=D["hidden"],
                  rotary_pairs=2 if "rotary" in kinds else D["head_dim"] // 2)
    keep = P.select(m, scores, t)
    small = P.apply_keep(m, keep)
    g = P.Gates(m, kinds)
    g.values.update(P.gate_values(m, keep, 0.0))
    with torch.no_grad(), g:
        ref = m(ids).logits
    with torch.no_grad():
        got = small(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if "heads" in kinds:
        assert small.config.num_attention_heads == 2 and small.config.num_key_value_heads == 2
    if "rotary" in kinds:
        assert small.config.head_dim == 4
        assert math.isclose(small.config.rope_parameters["rope_theta"], D["rope_theta"] ** 0.5)


def test_gqa_whole_groups_drops_kv_heads(tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer), heads=4, kv=2)
    s = I.importance(m, ids, kinds=("heads",), method="magnitude")
    keep = P.select(m, s, P.Targets(2, 64, 3, 32, 4), gqa="whole_groups")
    assert all(len(k) == 1 for k in keep.kv_heads) and all(len(h) == 2 for h in keep.heads)
    small = P.apply_keep(m, keep)
    assert small.config.num_key_value_heads == 1
    small(ids)


def test_per_group_keeps_heads_in_every_group(tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer), heads=4, kv=2)
    s = I.importance(m, ids, kinds=("heads",), method="magnitude")
    keep = P.select(m, s, P.Targets(2, 64, 3, 32, 4))
    for hs in keep.heads:  # one query head from each KV group of 2
        assert sorted(h // 2 for h in hs) == [0, 1]


def test_check_keep_refuses_uneven_and_rotary_with_qk_norm(tiny_tokenizer):
    m = _model("llama", len(tiny_tokenizer))
    k = P.full_keep(m)
    k.mlp[0] = k.mlp[0][:10]
    with pytest.raises(InputError, match="same count in every layer"):
        P.check_keep(m, k)
    q3 = _model("qwen3", len(tiny_tokenizer))
    k = P.full_keep(q3)
    k.rotary_pairs, k.v_dims = 2, [list(range(4))] * 3
    with pytest.raises(ConfigError, match="q/k norms"):
        P.check_keep(q3, k)


@pytest.mark.parametrize("method", I.METHODS)
def test_importance_shapes_and_determinism(method, tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer))
    t = _model("llama", len(tiny_tokenizer), seed=1)
    kinds = ("heads", "mlp", "layers", "hidden", "rotary")
    a = I.importance(m, ids, kinds=kinds, method=method, teacher=t)
    b = I.importance(m, ids, kinds=kinds, method=method, teacher=t)
    assert a["heads"].shape == (3, 4) and a["mlp"].shape == (3, 64) and a["layers"].shape == (3,)
    assert a["hidden"].shape == (32,) and a["v_dims"].shape == (3, 8)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all()
    assert all(p.grad is None for p in m.parameters())


def test_gradient_importance_is_the_gate_derivative(tiny_tokenizer, ids):
    """|dL/dg| of a head gate, checked against a finite difference of the loss in that gate."""
    m = _model("llama", len(tiny_tokenizer)).double()
    t = _model("llama", len(tiny_tokenizer), seed=1).double()
    row = ids[:1]
    s = I.importance(m, row, kinds=("heads",), method="gradient", teacher=t)["heads"]

    def loss(gv):
        return _gated_kl(m, t, row, gv)

    eps = 1e-2  # HF norms compute in float32 even in a float64 model: the loss is exact to ~1e-8 only
    for li, h in ((0, 1), (2, 3)):
        up = torch.ones(3, 4, dtype=torch.float64)
        dn = up.clone()
        up[li, h] += eps
        dn[li, h] -= eps
        fd = (loss(up) - loss(dn)) / (2 * eps)
        assert abs(abs(fd) - float(s[li, h])) < 0.05 * abs(fd) + 1e-6, (li, h, fd, float(s[li, h]))


def test_obd_importance_is_the_gate_fisher(tiny_tokenizer, ids):
    """obd: the mean of many sampled scores matches d^2/dg^2 KL(p || p_g) at g = 1 (the gate's Fisher), by a
    finite difference, and it needs no teacher."""
    m = _model("llama", len(tiny_tokenizer)).double()
    row = ids[:1]
    n = 256  # each row's estimate is a Gaussian square, relative std sqrt(2): 9% over n rows
    s = I.importance(m, row.repeat(n, 1), kinds=("heads", "mlp"), method="obd", seed=3)
    with torch.no_grad():
        p_full = torch.log_softmax(m(row).logits[:, :-1].double(), -1)

    def kl(kind, gv):
        g = P.Gates(m, (kind,))
        g.values[kind] = gv
        with torch.no_grad(), g:
            lg = torch.log_softmax(m(row).logits[:, :-1].double(), -1)
        return float((p_full.exp() * (p_full - lg)).sum())

    eps = 2e-2
    for kind, li, u, shape in (("heads", 0, 1, (3, 4)), ("heads", 2, 3, (3, 4)), ("mlp", 1, 5, (3, 64))):
        up = torch.ones(shape, dtype=torch.float64)
        dn = up.clone()
        up[li, u] += eps
        dn[li, u] -= eps
        fd = (kl(kind, up) + kl(kind, dn)) / eps ** 2   # KL(p || p) = 0 at the centre
        est = float(s[kind][li, u]) / n
        assert abs(est - fd) < 0.35 * fd + 1e-12, (kind, li, u, fd, est)
    other = I.importance(m, row.repeat(n, 1), kinds=("heads",), method="obd", seed=4)["heads"]
    assert not torch.equal(other, s["heads"])  # sampled: the seed matters, and it is the only randomness


def test_teacher_identical_student_has_zero_gradient_scores(tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer)).double()
    s = I.importance(m, ids, kinds=("heads", "mlp"), method="gradient", teacher=m)
    assert float(s["heads"].abs().max()) < 1e-9 and float(s["mlp"].abs().max()) < 1e-9


def test_frozen_units_keep_their_weights_and_get_no_gradient(tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer)).train()
    keep = P.select(m, I.importance(m, ids, kinds=("heads", "mlp"), method="magnitude"), P.Targets(2, 32, 3, 32, 4))
    masks = P.frozen_masks(m, keep)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    with P.frozen(m, keep) as restore:
        for _ in range(2):
            m(ids, labels=ids).loss.backward()
            for k, p in m.named_parameters():
                if k in masks:
                    assert float((p.grad * (1 - masks[k])).abs().max()) == 0.0
            opt.step()
            opt.zero_grad()
            restore()
    for k, p in m.named_parameters():
        if k in masks:
            dropped = (1 - masks[k]).bool()
            assert torch.equal(p.detach()[dropped], before[k][dropped])
            assert not torch.equal(p.detach()[~dropped], before[k][~dropped])


def test_fold_in_refit_reproduces_full_output_better(tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer))
    keep = P.select(m, I.importance(m, ids, kinds=("heads", "mlp"), method="magnitude"), P.Targets(2, 32, 3, 32, 4))
    new_w = P.fold_in(m, keep, ids, ridge=1e-4)
    assert new_w and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in new_w)
    name = "model.layers.1.self_attn.o_proj.weight"
    blk = m.model.layers[1].self_attn
    captured = {}
    h = blk.o_proj.register_forward_hook(lambda mod, a, o: captured.update(x=a[0].detach(), y=o.detach()))
    with torch.no_grad():
        m(ids)
    h.remove()
    d = 8
    cols = [hh * d + j for hh in keep.heads[1] for j in range(d)]
    x = captured["x"].reshape(-1, 32)
    y = captured["y"].reshape(-1, 32)
    old = x[:, cols] @ blk.o_proj.weight.detach()[:, cols].T
    new = x[:, cols] @ new_w[name][:, cols].T
    assert float((new - y).pow(2).mean()) < float((old - y).pow(2).mean())


def test_flops_analytic_matches_counter_within_2pct(tiny_tokenizer):
    m = _model("llama", len(tiny_tokenizer))
    for T in (16, 64):
        a = F.flops_per_token(m, T)["total"]
        c = F.counted_flops_per_token(m, T)
        assert abs(a / c - 1) < 0.02, (T, a, c)
    small = P.apply_keep(m, P.select(m, I.importance(m, torch.ones(1, 8, dtype=torch.long) * 5,
                                                     kinds=("heads", "mlp"), method="magnitude"),
                                     P.Targets(2, 32, 3, 32, 4)))
    rep = F.flops_report(m, small, 32)
    assert 0 < rep["flops_saved_pct"] < 100 and all(abs(x) < 2 for x in rep["counted"]["analytic_vs_counted_pct"])
    assert rep["components"]["lm_head"]["saved_pct"] == 0.0 and rep["components"]["mlp"]["saved_pct"] == 50.0


def test_compose_maps_back_to_the_original_indexing(tiny_tokenizer, ids):
    m = _model("llama", len(tiny_tokenizer), layers=3)
    k1 = P.select(m, I.importance(m, ids, kinds=("mlp", "layers"), method="magnitude"), P.Targets(4, 48, 2, 32, 4))
    s1 = P.apply_keep(m, k1)
    k2 = P.select(s1, I.importance(s1, ids, kinds=("mlp",), method="magnitude"), P.Targets(4, 32, 2, 32, 4))
    both = P.compose(k1, k2)
    assert all(u in k1.mlp[j] for j, units in enumerate(both.mlp) for u in units)
    with torch.no_grad():
        torch.testing.assert_close(P.apply_keep(m, both)(ids).logits, P.apply_keep(s1, k2)(ids).logits)


def test_pruned_student_reloads_and_generates_in_a_fresh_process(tiny_tokenizer, ids, tmp_path):
    from distillgate.models import save_model

    m = _model("llama", len(tiny_tokenizer))
    keep = P.select(m, I.importance(m, ids, kinds=("heads", "mlp", "rotary"), method="magnitude"),
                    P.Targets(2, 32, 3, 32, 2))
    small = P.apply_keep(m, keep)
    small.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    out = save_model(small, tiny_tokenizer, tmp_path / "s")
    with torch.no_grad():
        ref = small.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)[0].tolist()
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"ids = torch.tensor([{ids[0, :5].tolist()}])\n"
            "print(m.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist())\n"
            "assert 'distillgate' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(ref)


def test_learned_gates_drop_a_zero_output_unit_on_the_no_gradient_path(tiny_tokenizer, ids):
    """learned: a unit with zero output has dL/dg = 0 all along, so its gate falls by the penalty alone (to 0 in
    half the steps) and its score is that path's mean, exactly."""
    m = _model("llama", len(tiny_tokenizer))
    t = _model("llama", len(tiny_tokenizer), seed=1)
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight[:, 8:16] = 0.0   # head 1 of layer 1 (head_dim 8)
        m.model.layers[2].mlp.down_proj.weight[:, 5] = 0.0         # MLP unit 5 of layer 2
    epochs = 4
    s = I.importance(m, ids, kinds=("heads", "mlp"), method="learned", teacher=t, learned_epochs=epochs)
    steps = epochs * ids.shape[0]
    path = sum(max(0.0, 1.0 - 2.0 * k / steps) for k in range(1, steps + 1)) / steps
    assert float(s["heads"][1, 1]) == pytest.approx(path, abs=1e-9)
    assert float(s["mlp"][2, 5]) == pytest.approx(path, abs=1e-9)
    for kind in ("heads", "mlp"):  # gates stay in [0, 1]; some are held at 1 all along, some fall faster
        assert 0.0 <= float(s[kind].min()) < path < float(s[kind].max()) <= 1.0


def test_taylor_trace_accumulates_the_taylor_term_of_every_backward(tiny_tokenizer, ids):
    """TaylorTrace (the taylor score accumulated along training steps) gives, for the same backward passes,
    exactly ``importance(method="taylor")``; a unit whose activation is zero scores 0; params keep their grads."""
    m = _model("llama", len(tiny_tokenizer)).double()
    t = _model("llama", len(tiny_tokenizer), seed=1).double()
    with torch.no_grad():  # MLP unit 5 of layer 1 outputs nothing: a = silu(gate) * up = 0
        m.model.layers[1].mlp.up_proj.weight[5].zero_()
    ref = I.importance(m, ids, kinds=("heads", "mlp"), method="taylor", teacher=t)
    with I.TaylorTrace(m, ("heads", "mlp")) as trace:
        for r in range(ids.shape[0]):  # one "training step" per row, on the same loss importance() uses
            row = ids[r:r + 1]
            lg = m(input_ids=row, use_cache=False).logits[:, :-1]
            with torch.no_grad():
                tl = t(input_ids=row, use_cache=False).logits[:, :-1]
            (I.kl_sum(lg, tl) / lg.shape[1]).backward()
            trace.collect()
    got = trace.scores()
    assert trace.steps == ids.shape[0]
    for k in ("heads", "mlp"):
        assert got[k].shape == ref[k].shape
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)
    assert float(got["mlp"][1, 5]) == 0.0 and float(got["mlp"][1].max()) > 0
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)  # the trainer's grads are untouched
    m.zero_grad(set_to_none=True)
    assert not m.model.layers[0].self_attn.o_proj._forward_pre_hooks  # the gates are gone on exit
    with pytest.raises(RuntimeError):
        I.TaylorTrace(m).scores()


def test_taylor2_is_minus_the_signed_gate_derivative_plus_half_the_obd_curvature(tiny_tokenizer, ids):
    """taylor2 = sum_rows (-dL/dg + 1/2 GN/T): its curvature part is obd's probe estimate (same probes) over the T
    positions, its first-order part the signed gate derivative (a finite difference of the distillation loss);
    a student scored against itself is at the loss's minimum, so there only the curvature remains."""
    m = _model("llama", len(tiny_tokenizer)).double()
    t = _model("llama", len(tiny_tokenizer), seed=1).double()
    row = ids[:1]
    T = row.shape[1] - 1
    kinds = ("heads", "mlp")
    obd = I.importance(m, row, kinds=kinds, method="obd", seed=5)
    self_scored = I.importance(m, row, kinds=kinds, method="taylor2", teacher=m, seed=5)
    for k in kinds:
        torch.testing.assert_close(self_scored[k], 0.5 * obd[k] / T, rtol=1e-6, atol=1e-9)
    s = I.importance(m, row, kinds=kinds, method="taylor2", teacher=t, seed=5)
    first = s["heads"] - 0.5 * obd["heads"] / T  # = -dL/dg
    assert (first > 0).any() and (first < 0).any()  # signed: some heads' removal lowers the loss at first order

    def loss(gv):
        return _gated_kl(m, t, row, gv)

    eps = 1e-2
    for li, h in ((0, 1), (2, 3), (1, 0)):
        up = torch.ones(3, 4, dtype=torch.float64)
        dn = up.clone()
        up[li, h] += eps
        dn[li, h] -= eps
        fd = (loss(up) - loss(dn)) / (2 * eps)
        assert abs(-fd - float(first[li, h])) < 0.05 * abs(fd) + 1e-6, (li, h, fd, float(first[li, h]))
