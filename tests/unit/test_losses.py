"""Divergences, top-k + tail, fused chunked loss, temperature policies and the objective.

Every divergence is checked against an independent float64 numpy reference written here."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from distillgate.config import LossSpec, TemperatureSpec
from distillgate.errors import ConfigError
from distillgate.losses import (DistillObjective, cross_entropy, divergence, forward_kl, fused_distill_loss, gjsd,
                                reverse_kl, total_variation, unfused_distill_loss)
from distillgate.losses.stats import teacher_token_stats
from distillgate.losses.temperature import temperatures
from distillgate.targets import TeacherHidden, TopKTargets

KINDS = ["forward_kl", "reverse_kl", "gjsd", "tv"]


# ------------------------------------------------------------------------------ float64 references

def _softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl64(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0.0).sum(-1)


def _div64(kind, p, q, beta=0.5):
    if kind == "forward_kl":
        return _kl64(p, q)
    if kind == "reverse_kl":
        return _kl64(q, p)
    if kind == "tv":
        return 0.5 * np.abs(p - q).sum(-1)
    if beta == 0:
        return _kl64(p, q)
    if beta == 1:
        return _kl64(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)


def _dense_ref(kind, s, t, temp, beta=0.5, t2=True):
    T = np.asarray(temp, np.float64)[:, None]
    p, q = _softmax64(t.double().numpy() / T), _softmax64(s.double().numpy() / T)
    return _div64(kind, p, q, beta) * (T[:, 0] ** 2 if t2 else 1.0)


def _temper64(top, tail, m, T):
    """T=1 buckets [top..., tail] -> tempered, the tail's mass spread uniformly over m tokens."""
    w = np.concatenate([top ** (1 / T), [m * (tail / m) ** (1 / T)]])
    return w / w.sum()


def _bucket_ref(kind, s, t, k, temp, beta=0.5):
    """Hand-computed (k+1)-bucket divergence: buckets at T=1, both sides tempered with a uniform tail."""
    s64, t64 = s.double().numpy(), t.double().numpy()
    n, v = s64.shape
    out = np.zeros(n)
    for i in range(n):
        pt, qs = _softmax64(t64[i]), _softmax64(s64[i])
        idx = np.argsort(-pt)[:k]
        T = float(temp[i])
        pb = _temper64(pt[idx], 1.0 - pt[idx].sum(), v - k, T)
        qb = _temper64(qs[idx], qs[np.setdiff1d(np.arange(v), idx)].sum(), v - k, T)
        out[i] = _div64(kind, pb[None], qb[None], beta)[0] * T * T
    return out


def _topk(t, k):
    lp = torch.log_softmax(t.float(), -1)
    v, i = lp.topk(k, -1)
    return TopKTargets(indices=i, logprobs=v)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(1)
    n, v = 12, 40
    return torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3


# ------------------------------------------------------------------------------------ divergences

@pytest.mark.parametrize("kind", KINDS)
def test_dense_divergence_matches_float64(kind, logits):
    s, t = logits
    temp = torch.linspace(0.5, 3.0, s.shape[0])
    got = divergence(kind, s, t, beta=0.3, temperature=temp)
    ref = _dense_ref(kind, s, t, temp.numpy(), beta=0.3)
    assert got.dtype == torch.float32 and got.shape == (s.shape[0],)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-5, atol=1e-6)


def test_named_functions_and_pinned_values(logits):
    s, t = logits
    assert torch.equal(forward_kl(s, t), divergence("forward_kl", s, t))
    assert torch.equal(reverse_kl(s, t), divergence("reverse_kl", s, t))
    assert torch.equal(gjsd(s, t, 0.5), divergence("gjsd", s, t, beta=0.5))
    assert torch.equal(total_variation(s, t), divergence("tv", s, t))
    # pinned (float64 reference agrees; see test above)
    assert float(forward_kl(s, t).sum()) == pytest.approx(float(_dense_ref("forward_kl", s, t, np.ones(12)).sum()),
                                                          rel=1e-6)
    assert float(forward_kl(s, t).sum()) == pytest.approx(66.10098, rel=1e-5)
    assert float(gjsd(s, t, 0.5).sum()) == pytest.approx(6.954049, rel=1e-5)


def test_gjsd_endpoints_are_forward_and_reverse_kl(logits):
    s, t = logits
    temp = torch.full((s.shape[0],), 1.7)
    assert torch.allclose(gjsd(s, t, 0.0, temp), forward_kl(s, t, temp))
    assert torch.allclose(gjsd(s, t, 1.0, temp), reverse_kl(s, t, temp))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_gjsd_matches_trl_generalized_jsd_loss(beta):
    import os
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 30, generator=g) * 2, torch.randn(2, 5, 30, generator=g) * 2
    ref = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=2.0, reduction="none").sum(-1)
    got = gjsd(s.reshape(10, 30), t.reshape(10, 30), beta, torch.full((10,), 2.0), t2_scale=False)
    torch.testing.assert_close(got, ref.reshape(10), rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_float64(logits):
    s, _ = logits
    tgt = torch.randint(0, s.shape[1], (s.shape[0],))
    ref = -np.log(_softmax64(s.double().numpy())[np.arange(s.shape[0]), tgt.numpy()])
    np.testing.assert_allclose(cross_entropy(s.bfloat16(), tgt).numpy(),
                               -np.log(_softmax64(s.bfloat16().double().numpy())[np.arange(12), tgt.numpy()]),
                               rtol=1e-5)
    np.testing.assert_allclose(cross_entropy(s, tgt).numpy(), ref, rtol=1e-5)


def test_t2_flag_and_unit_temperature(logits):
    s, t = logits
    temp = torch.linspace(0.5, 2.0, s.shape[0])
    for kind in KINDS:
        a = divergence(kind, s, t, temperature=temp, t2_scale=True)
        b = divergence(kind, s, t, temperature=temp, t2_scale=False)
        torch.testing.assert_close(a, b * temp ** 2)
        torch.testing.assert_close(divergence(kind, s, t, temperature=torch.ones(12)), divergence(kind, s, t))


# -------------------------------------------------------------------------------------- top-k + tail

@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_v_equals_dense(kind, logits):
    s, t = logits
    temp = torch.linspace(0.6, 2.5, s.shape[0])
    dense = divergence(kind, s, t, beta=0.4, temperature=temp)
    topk = divergence(kind, s, _topk(t, s.shape[1]), beta=0.4, temperature=temp)
    torch.testing.assert_close(topk, dense, rtol=1e-6, atol=1e-6)   # float32 ulp at ~10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 5])
def test_topk_small_k_matches_bucket_formula(kind, k, logits):
    s, t = logits
    for temp in (torch.ones(12), torch.linspace(0.5, 3.0, 12)):
        got = divergence(kind, s, _topk(t, k), beta=0.3, temperature=temp)
        ref = _bucket_ref(kind, s, t, k, temp.numpy(), beta=0.3)
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_topk_kl_is_a_lower_bound_of_dense(logits):
    s, t = logits
    dense = forward_kl(s, t)
    for k in (1, 4, 16):
        assert bool((forward_kl(s, _topk(t, k)) <= dense + 1e-6).all())


def test_student_tail_is_exact_when_top_k_holds_almost_all_mass():
    # student puts ~1 - 1e-12 of its mass on the teacher's top-2 tokens: 1 - sum(q) would cancel in float32
    v = 30
    s = torch.full((1, v), -30.0)
    s[0, :2] = torch.tensor([0.0, -0.5])
    t = torch.randn(1, v)
    t[0, :2] += 20
    got = forward_kl(s, _topk(t, 2))
    ref = _bucket_ref("forward_kl", s, t, 2, [1.0])
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4)


def test_exact_teacher_log_tail_is_used_when_targets_carry_it():
    from dataclasses import dataclass

    @dataclass
    class TopKWithTail(TopKTargets):
        log_tail: torch.Tensor = None

    v, k = 30, 3
    t = torch.randn(4, v, dtype=torch.float64)
    t[:, :k] += 25.0                                           # teacher tail ~1e-10: 1 - sum(p) is all rounding
    s = torch.randn(4, v) * 2
    lp = torch.log_softmax(t, -1)
    log_tail = torch.logsumexp(lp[:, k:], -1).float()
    exact = TopKWithTail(torch.arange(k).expand(4, k).clone(), lp[:, :k].float(), log_tail=log_tail)
    temp = torch.full((4,), 2.0)
    ref = _bucket_ref("forward_kl", s, t, k, temp.numpy())
    got = forward_kl(s, exact, temp)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4)
    approx = forward_kl(s, TopKTargets(exact.indices, exact.logprobs), temp).numpy()          # r from 1 - sum p
    assert not np.allclose(approx, ref, rtol=1e-3)
    hs = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(v, 8)
    a, _ = fused_distill_loss(hs, w, exact, torch.zeros(4, dtype=torch.long), None, temp, {"kd": 1.0},
                              "forward_kl", 0.5, 3)
    b, _ = unfused_distill_loss(hs, w, exact, torch.zeros(4, dtype=torch.long), None, temp, {"kd": 1.0},
                                "forward_kl", 0.5)
    torch.testing.assert_close(a, b)


def test_ruled_out_teacher_tokens_give_finite_losses_and_gradients(logits):
    s, t = logits
    t = t.clone()
    t[:, :10] = float("-inf")                                       # teacher forbids 10 tokens
    s = s.clone().requires_grad_(True)
    for kind in KINDS:
        for teacher in (t, _topk(t, 35), _topk(t, 40)):
            loss = divergence(kind, s, teacher, beta=0.5, temperature=torch.full((12,), 1.5)).sum()
            (g,) = torch.autograd.grad(loss, s)
            assert torch.isfinite(loss) and bool(torch.isfinite(g).all()), (kind, type(teacher))


def test_unknown_divergence_and_bad_beta_fail_loudly(logits):
    s, t = logits
    with pytest.raises(ConfigError, match="loss.divergence.*forward_kl"):
        divergence("kl", s, t)
    with pytest.raises(ConfigError, match="loss.beta"):
        gjsd(s, t, 1.5)


# ---------------------------------------------------------------------------------- fused chunked loss

def _fused_inputs(n=37, h=16, v=50, k=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw_ = torch.randn(n, 12, generator=g), torch.randn(v, 12, generator=g)
    teachers = {"dense": th @ tw_.T, "topk": _topk(th @ tw_.T, k), "hidden": TeacherHidden(th, tw_)}
    return hs, w, teachers, torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g), \
        torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize("teacher_kind", ["dense", "topk", "hidden"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_loss_and_gradients(teacher_kind, kind):
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    ch = {"kd": 1.0, "ce": 0.3}
    ref, ref_pt = unfused_distill_loss(hs, w, teachers[teacher_kind], tgt, tw, temp, ch, kind, 0.3)
    gh, gw = torch.autograd.grad(ref, [hs, w])
    for chunk in (1, 7, 16, 37, 100):
        tot, pt = fused_distill_loss(hs, w, teachers[teacher_kind], tgt, tw, temp, ch, kind, 0.3, chunk)
        fh, fw = torch.autograd.grad(tot, [hs, w])
        torch.testing.assert_close(tot, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fh, gh, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fw, gw, rtol=1e-4, atol=1e-5)
        for c in ch:
            torch.testing.assert_close(pt[c], ref_pt[c], rtol=1e-5, atol=1e-6)


def _autograd_chunk(hs, w, teacher, tgt, tw, temp, ch, kind, beta=0.3):
    """The generic path the closed-form top-k gradient replaces: full-vocabulary autograd (its divergences
    are checked against float64 numpy above); logits formed in float64."""
    from distillgate.losses.fused import channel_losses
    from distillgate.weighting import combine_sum

    z = (hs.detach().double() @ w.detach().double().T).requires_grad_(True)
    t64 = dataclasses.replace(teacher, logprobs=teacher.logprobs.double())
    per = channel_losses(z, t64, tgt, None if temp is None else temp.double(), tuple(ch), kind, beta, True)
    tot = combine_sum({k: v.double() for k, v in per.items()}, ch, None if tw is None else tw.double())
    (g,) = torch.autograd.grad(tot, z)
    g = g.double()
    return tot.detach().double(), {k: v.detach().double() for k, v in per.items()}, g @ w.detach().double(), \
        g.T @ hs.detach().double()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,with_temp", [(8, True), (8, False), (50, True), (1, False)])
def test_closed_form_topk_gradient_matches_float64_autograd(kind, k, with_temp):
    """The top-k fast path (one exp pass, gradient in closed form) against float64 autograd: k < V, k = V
    (no tail bucket), k = 1, with and without temperature, 'ce' on targets inside and outside the top-k."""
    hs, w, teachers, tgt, tw, temp = _fused_inputs(k=k)
    temp = temp if with_temp else None
    teacher = teachers["topk"] if k == 8 else _topk(hs.detach() @ w.detach().T * 0.7, k)
    ch = {"kd": 1.0, "ce": 0.3}
    ref, ref_pt, gh_ref, gw_ref = _autograd_chunk(hs, w, teacher, tgt, tw, temp, ch, kind)
    tot, pt = fused_distill_loss(hs, w, teacher, tgt, tw, temp, ch, kind, 0.3, 16)
    gh, gw = torch.autograd.grad(tot, [hs, w])
    torch.testing.assert_close(tot.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-5)
    for c in ch:
        torch.testing.assert_close(pt[c].double(), ref_pt[c].double(), rtol=1e-5, atol=1e-6)


def test_closed_form_path_falls_back_to_exact_tail_when_student_tail_underflows():
    """Rows whose student tail is below float32 range next to its top-k (logit gap > 100 nats) take the exact
    masked-logsumexp path; values and gradients stay finite and equal to float64 autograd."""
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    teacher = teachers["topk"]
    with torch.no_grad():
        w2 = w.detach().clone()
        hs2 = hs.detach().clone()
        hs2[:3] = 0.0
        hs2[:3, 0] = 1.0
        w2[:, 0] = -60.0
        w2[teacher.indices[0], 0] = 60.0                                  # row 0: tail 120 nats below its top-k
    hs2.requires_grad_(True)
    w2.requires_grad_(True)
    ch = {"kd": 1.0, "ce": 0.3}
    ref, ref_pt, gh_ref, gw_ref = _autograd_chunk(hs2, w2, teacher, tgt, tw, None, ch, "forward_kl")
    tot, pt = fused_distill_loss(hs2, w2, teacher, tgt, tw, None, ch, "forward_kl", 0.3, 16)
    gh, gw = torch.autograd.grad(tot, [hs2, w2])
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(tot.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pt["kd"].double(), ref_pt["kd"].double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-4)


def test_fused_without_grad_returns_the_same_values():
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    ch = {"kd": 1.0, "ce": 0.3}
    a, pa = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "gjsd", 0.3, 8)
    with torch.no_grad():
        b, pb = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "gjsd", 0.3, 8)
    assert not b.requires_grad
    torch.testing.assert_close(a.detach(), b)
    torch.testing.assert_close(pa["kd"], pb["kd"])


def test_teacher_hidden_equals_dense_teacher_logits():
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    a, pa = fused_distill_loss(hs, w, teachers["hidden"], tgt, tw, temp, {"kd": 1.0}, "forward_kl", 0.5, 10)
    b, pb = fused_distill_loss(hs, w, teachers["dense"], tgt, tw, temp, {"kd": 1.0}, "forward_kl", 0.5, 10)
    torch.testing.assert_close(pa["kd"], pb["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, b)


def test_fused_total_is_weighted_sum_and_zero_weight_tokens_get_no_gradient():
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    tw = tw.clone()
    tw[:5] = 0.0
    tot, pt = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, {"kd": 2.0, "ce": 0.5}, "tv", 0.5, 8)
    torch.testing.assert_close(tot.detach(), (tw * (2.0 * pt["kd"] + 0.5 * pt["ce"])).sum())
    (gh,) = torch.autograd.grad(tot, hs)
    assert float(gh[:5].abs().max()) == 0.0 and float(gh[5:].abs().max()) > 0


def test_fused_all_masked_gives_zero_and_finite_gradients():
    _, w, _, _, _, _ = _fused_inputs()
    hs = torch.zeros(0, 16, requires_grad=True)
    empty = TopKTargets(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8))
    tot, pt = fused_distill_loss(hs, w, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.ones(0),
                                 {"kd": 1.0, "ce": 1.0}, "gjsd", 0.5, 16)
    tot.backward()
    assert float(tot.detach()) == 0.0 and pt["kd"].shape == (0,)
    assert w.grad is not None and float(w.grad.abs().max()) == 0.0


def test_fused_under_bf16_autocast_matches_unfused_autocast(monkeypatch):
    import distillgate.losses.fused as fused_mod

    monkeypatch.setattr(fused_mod, "native_bf16", lambda dev="cpu": True)      # as on hardware with native bf16
    hs, w, teachers, tgt, tw, temp = _fused_inputs(n=40, h=32, v=64)
    ch = {"kd": 1.0, "ce": 0.1}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = unfused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "forward_kl", 0.5)
        tot, pt = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "forward_kl", 0.5, 16)
    gh_r, gw_r = torch.autograd.grad(ref, [hs, w])
    gh, gw = torch.autograd.grad(tot, [hs, w])
    assert pt["kd"].dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(tot, ref.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh, gh_r, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gw_r, rtol=2e-2, atol=2e-2)
    fp32, _ = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "forward_kl", 0.5, 16)
    assert float(tot.detach()) == pytest.approx(float(fp32.detach()), rel=3e-2)       # bf16 matmul, fp32 softmax


def test_fused_head_runs_in_fp32_under_bf16_autocast_without_native_bf16(monkeypatch):
    """Without native bf16 (emulated, 3.5x slower than fp32 here) the lm-head keeps float32 under autocast."""
    import distillgate.losses.fused as fused_mod

    monkeypatch.setattr(fused_mod, "native_bf16", lambda dev="cpu": False)
    hs, w, teachers, tgt, tw, temp = _fused_inputs(n=40, h=32, v=64)
    ch = {"kd": 1.0, "ce": 0.1}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tot, _ = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "forward_kl", 0.5, 16)
    fp32, _ = fused_distill_loss(hs, w, teachers["topk"], tgt, tw, temp, ch, "forward_kl", 0.5, 16)
    torch.testing.assert_close(tot, fp32)
    torch.testing.assert_close(torch.autograd.grad(tot, hs)[0], torch.autograd.grad(fp32, hs)[0])


def test_fused_rejects_channels_it_does_not_compute():
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    with pytest.raises(ConfigError, match=r"loss\.channels.*attn.*'ce'.*'kd'"):
        fused_distill_loss(hs, w, teachers["dense"], tgt, tw, temp, {"kd": 1.0, "attn": 1.0}, "tv", 0.5, 8)


# ---------------------------------------------------------------------------- temperature and stats

def test_temperature_policies():
    b_idx = torch.tensor([0, 0, 1, 1, 1, 2])
    fixed = temperatures(TemperatureSpec(policy="fixed", value=1.5), b_idx, 3)
    assert fixed.tolist() == [1.5] * 6
    spec = TemperatureSpec(policy="complexity", min=0.5, max=2.5)
    t = temperatures(spec, b_idx, 3, complexity=torch.tensor([0.0, 1.0, 0.25]))
    assert t.tolist() == [2.5, 2.5, 0.5, 0.5, 0.5, 2.0]           # simple -> hotter, complex -> cooler
    ent = torch.tensor([0.9, 0.7, 0.1, 0.1, 0.1, 0.5])
    t = temperatures(TemperatureSpec(policy="entropy", min=0.5, max=2.5), b_idx, 3, teacher_norm_entropy=ent)
    torch.testing.assert_close(t, torch.tensor([0.9, 0.9, 2.3, 2.3, 2.3, 1.5]))   # unsure teacher -> low T
    with pytest.raises(ConfigError, match="complexity"):
        temperatures(spec, b_idx, 3)


def test_teacher_stats_topk_full_equals_dense_and_hidden_is_chunked():
    g = torch.Generator().manual_seed(4)
    th, tw = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g) * 2
    logits = th @ tw.T
    dense = teacher_token_stats(logits, 20)
    full = teacher_token_stats(_topk(logits, 20), 20)
    hid = teacher_token_stats(TeacherHidden(th, tw), 20, chunk_size=4)
    p = _softmax64(logits.double().numpy())
    ref_h = -(p * np.log(p)).sum(-1) / math.log(20)
    for st in (dense, full, hid):
        np.testing.assert_allclose(st.norm_entropy.numpy(), ref_h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st.top1.numpy(), p.max(-1), rtol=1e-5)
    small = teacher_token_stats(_topk(logits, 3), 20)
    assert bool(((small.norm_entropy >= 0) & (small.norm_entropy <= 1)).all())


# -------------------------------------------------------------------------------------- objective

def _batch(tok_ids, loss_mask, complexity=None, domains=None, sample_weight=None):
    ids = torch.tensor(tok_ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.tensor(loss_mask),
            "example_ids": [f"e{i}" for i in range(len(tok_ids))],
            "domains": domains or ["legal"] * len(tok_ids),
            "complexity": torch.tensor(complexity or [0.5] * len(tok_ids)),
            "sample_weight": torch.tensor(sample_weight or [1.0] * len(tok_ids))}


class _TopKFromModel:
    """A TeacherProvider from a tiny teacher: exact top-k of its logits at the prediction positions."""

    def __init__(self, model, k):
        self.model, self.k = model, k

    @torch.no_grad()
    def __call__(self, batch):
        from distillgate.targets import prediction_positions
        b, t = prediction_positions(batch)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return _topk(logits[b, t], self.k)


def _temper_t(top, tail, m, T):
    w = torch.cat([top ** (1 / T), (m * (tail / m) ** (1 / T)).reshape(1)])
    return w / w.sum()


def _reference_objective(student, teacher, batch, spec, k):
    """Straightforward float64 reference: full logits from the HF forward, loops over positions."""
    ids, lm = batch["input_ids"], batch["loss_mask"]
    s_logits = student(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double()
    total = s_logits.new_zeros(())
    v = s_logits.shape[-1]
    c = batch["complexity"].double()
    for b in range(ids.shape[0]):
        T = spec.temperature.max - c[b] * (spec.temperature.max - spec.temperature.min)
        w_b = batch["sample_weight"][b].double() * spec.domain_weights.get(batch["domains"][b], 1.0)
        for t in range(1, ids.shape[1]):
            if not lm[b, t]:
                continue
            pt = torch.softmax(t_logits[b, t - 1], -1)
            qs = torch.softmax(s_logits[b, t - 1], -1)
            idx = pt.topk(k).indices
            rest = torch.ones(v, dtype=torch.bool)
            rest[idx] = False
            pb = _temper_t(pt[idx], 1 - pt[idx].sum(), v - k, T)
            qb = _temper_t(qs[idx], qs[rest].sum(), v - k, T)
            kd = (pb * (pb.log() - qb.log())).sum() * T * T
            ce = -torch.log_softmax(s_logits[b, t - 1], -1)[ids[b, t]]
            total = total + w_b * (spec.channels["kd"] * kd + spec.channels["ce"] * ce)
    return total


PINNED_TINY_OBJECTIVE = 106.4878   # tiny 2-layer student/teacher, seeds 1/0, k=16


def test_objective_matches_reference_on_tiny_models(tiny_model_factory):
    student = tiny_model_factory(num_layers=2, seed=1).train()
    teacher = tiny_model_factory(num_layers=2, seed=0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, student.config.vocab_size, (3, 10), generator=g).tolist()
    lm = [[0] * 4 + [1] * 6, [0] * 6 + [1] * 3 + [0], [0] * 2 + [1] * 8]
    batch = _batch(ids, lm, complexity=[0.0, 1.0, 0.4], domains=["legal", "medical", "travel"],
                   sample_weight=[1.0, 3.0, 1.0])
    spec = LossSpec(divergence="forward_kl", channels={"kd": 1.0, "ce": 0.25}, chunk_size=16,
                    temperature={"policy": "complexity", "min": 0.7, "max": 2.0}, domain_weights={"medical": 2.0})
    out = DistillObjective(spec, _TopKFromModel(teacher, 16))(student, batch)
    assert out.n_tokens == 6 + 3 + 8 and set(out.terms) == {"kd", "ce"}
    params = [p for p in student.parameters()]
    grads = torch.autograd.grad(out.total_sum, params, allow_unused=True)
    assert torch.isfinite(out.total_sum) and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    ref = _reference_objective(student, teacher, batch, spec, 16)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert float(out.total_sum.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert float(out.total_sum.detach()) == pytest.approx(PINNED_TINY_OBJECTIVE, rel=1e-4)
    for a, b in zip(grads, ref_grads):
        if b is not None:                       # float32 vs float64 softmax: compare at the gradient's scale
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    torch.testing.assert_close(out.aux["temperature"][:6], torch.full((6,), 2.0))
    assert out.aux["token_weight"][6:9].tolist() == [6.0] * 3                 # medical 2x, hard pool 3x


def test_objective_online_teacher_hidden_and_difficulty_weighting(tiny_model_factory):
    student = tiny_model_factory(num_layers=2, seed=1)
    teacher = tiny_model_factory(num_layers=2, seed=0)
    ids = torch.randint(4, student.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(6)).tolist()
    batch = _batch(ids, [[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]])

    def online(b):
        from distillgate.targets import prediction_positions
        bi, ti = prediction_positions(b)
        with torch.no_grad():
            h = teacher.model(input_ids=b["input_ids"]).last_hidden_state[bi, ti]
        return TeacherHidden(h, teacher.lm_head.weight.detach())

    full = lambda b: _TopKFromModel(teacher, student.config.vocab_size)(b)      # k = V: same distribution
    spec = LossSpec(divergence="gjsd", beta=0.3, difficulty_weighting=True, difficulty_floor=0.2, chunk_size=16,
                    temperature={"policy": "entropy"})
    a = DistillObjective(spec, online)(student, batch)
    b = DistillObjective(spec, full)(student, batch)
    assert a.n_tokens == b.n_tokens == 11
    torch.testing.assert_close(a.total_sum, b.total_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.aux["token_weight"], b.aux["token_weight"], rtol=1e-5, atol=1e-6)
    assert 0.2 <= float(a.aux["token_weight"].min()) and float(a.aux["token_weight"].max()) <= 1.0


def test_objective_all_masked_batch_gives_zero_not_nan(tiny_model_factory):
    student = tiny_model_factory(num_layers=2, seed=1)
    teacher = tiny_model_factory(num_layers=2, seed=0)
    batch = _batch([[5, 6, 7, 8], [9, 10, 11, 12]], [[1, 0, 0, 0], [0, 0, 0, 0]])   # t=0 is never a target
    out = DistillObjective(LossSpec(channels={"kd": 1.0, "ce": 1.0}), _TopKFromModel(teacher, 8))(student, batch)
    assert out.n_tokens == 0 and float(out.total_sum.detach()) == 0.0 and out.terms == {"kd": 0.0, "ce": 0.0}
    out.total_sum.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in student.parameters() if p.grad is not None)


def test_objective_rejects_unknown_channel_and_mismatched_teacher(tiny_model_factory):
    with pytest.raises(ConfigError, match=r"loss\.channels.*attn.*'ce'.*'kd'"):
        DistillObjective(LossSpec(channels={"kd": 1.0, "attn": 0.5}), lambda b: None)
    student = tiny_model_factory(num_layers=2, seed=1)
    batch = _batch([[5, 6, 7, 8]], [[0, 1, 1, 1]])
    bad = lambda b: TopKTargets(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -2.0))
    from distillgate.errors import InputError
    with pytest.raises(InputError, match="2 positions.*3 prediction positions"):
        DistillObjective(LossSpec(), bad)(student, batch)


# ------------------------------------------------------------------------------------------ tail samples

def _with_samples(teacher_logits, k, m, seed=0):
    from distillgate.targets import topk_from_hidden

    v = teacher_logits.shape[1]
    return topk_from_hidden(teacher_logits, torch.eye(v), k, tail_samples=m,
                            generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tempered", [False, True])
def test_sampled_tail_fast_path_equals_autograd_and_only_applies_to_forward_kl(tempered):
    hs, w, teachers, tgt, tw, temp = _fused_inputs()
    temp = temp if tempered else None
    g = torch.Generator().manual_seed(5)
    t_logits = torch.randn(37, 50, generator=g) * 2
    sampled = _with_samples(t_logits, 8, 5)
    ch = {"kd": 1.0, "ce": 0.3}
    for kind, beta in (("forward_kl", 0.3), ("gjsd", 0.0)):
        ref, ref_pt, gh_ref, gw_ref = _autograd_chunk(hs, w, sampled, tgt, tw, temp, ch, kind, beta)
        tot, pt = fused_distill_loss(hs, w, sampled, tgt, tw, temp, ch, kind, beta, 16)
        gh, gw = torch.autograd.grad(tot, [hs, w])
        torch.testing.assert_close(tot.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-5)
        for c in ch:
            torch.testing.assert_close(pt[c].double(), ref_pt[c], rtol=1e-5, atol=1e-5)
    bucket = TopKTargets(sampled.indices, sampled.logprobs)
    for kind in ("reverse_kl", "tv"):                                        # samples are ignored there
        a, _ = fused_distill_loss(hs, w, sampled, tgt, tw, temp, ch, kind, 0.3, 16)
        b, _ = fused_distill_loss(hs, w, bucket, tgt, tw, temp, ch, kind, 0.3, 16)
        torch.testing.assert_close(a, b)
    a, _ = fused_distill_loss(hs, w, sampled, tgt, tw, temp, ch, "forward_kl", 0.3, 16)
    b, _ = fused_distill_loss(hs, w, bucket, tgt, tw, temp, ch, "forward_kl", 0.3, 16)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("t", [None, 1.5])
def test_sampled_tail_kl_is_unbiased_for_dense_forward_kl(t):
    """Averaged over draws, the sampled-tail loss and its gradient equal the dense forward KL's (at T = 1.5,
    the importance-weighted estimate converges to the dense tempered KL); the one-bucket tail's gradient does
    not match (it only fixes the tail's total mass)."""
    g = torch.Generator().manual_seed(2)
    t_logits = torch.randn(6, 40, generator=g) * 1.5
    s_logits = (torch.randn(6, 40, generator=g) * 1.5).requires_grad_(True)
    temp = None if t is None else torch.full((6,), t)
    dense = forward_kl(s_logits, t_logits, temp).sum()
    (g_dense,) = torch.autograd.grad(dense, s_logits)
    m = 20000
    tk = _with_samples(t_logits, 4, m)
    hs = s_logits.detach().clone().requires_grad_(True)                        # logits = hs @ I
    est, _ = fused_distill_loss(hs, torch.eye(40), tk, torch.zeros(6, dtype=torch.long), None, temp,
                                {"kd": 1.0}, "forward_kl", 0.5, 8)
    (g_est,) = torch.autograd.grad(est, hs)
    assert float(est.detach()) == pytest.approx(float(dense.detach()), rel=0.01)
    assert float((g_est - g_dense).abs().max()) < 0.01
    bucket, _ = fused_distill_loss(hs, torch.eye(40), TopKTargets(tk.indices, tk.logprobs),
                                   torch.zeros(6, dtype=torch.long), None, temp, {"kd": 1.0}, "forward_kl", 0.5, 8)
    (g_b,) = torch.autograd.grad(bucket, hs)
    assert float((g_b - g_dense).abs().max()) > 0.03
