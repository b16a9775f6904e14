"""The online teacher's closed-form chunk gradient (losses.fused._dense_chunk) against float64 autograd and
against the per-chunk autograd path it replaces."""

from __future__ import annotations

import pytest
import torch

from distillgate.losses import fused
from distillgate.losses.divergence import DIVERGENCES, LOGP_FLOOR
from distillgate.losses.fused import fused_distill_loss
from distillgate.targets import TeacherHidden

KINDS = [("forward_kl", 0.3), ("reverse_kl", 0.3), ("gjsd", 0.3), ("gjsd", 0.0), ("gjsd", 1.0), ("tv", 0.3)]


def _inputs(n=29, h=12, v=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw_ = torch.randn(n, 10, generator=g), torch.randn(v, 10, generator=g)
    return hs, w, TeacherHidden(th, tw_), torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g), \
        torch.rand(n, generator=g) + 0.5


def _float64_reference(hs, w, teacher, tgt, tw, temp, ch, kind, beta):
    """Everything in float64: logits, both softmaxes, the divergence on log-probs, CE, weights, autograd."""
    z = (hs.detach().double() @ w.detach().double().T).requires_grad_(True)
    tl = teacher.hidden.double() @ teacher.weight.double().T
    inv = 1.0 if temp is None else (1.0 / temp.double()).unsqueeze(1)
    lq = torch.log_softmax(z * inv, -1)
    lp = torch.log_softmax(tl * inv, -1).clamp_min(LOGP_FLOOR)
    kd = DIVERGENCES[kind](lp, lq, beta)
    if temp is not None:
        kd = kd * temp.double() ** 2
    ce = torch.logsumexp(z, -1) - z.gather(1, tgt.unsqueeze(1)).squeeze(1)
    per = {"kd": kd, "ce": ce}
    tot = ((ch["kd"] * kd + ch["ce"] * ce) * tw.double()).sum()
    (g,) = torch.autograd.grad(tot, z)
    return tot.detach(), {k: v.detach() for k, v in per.items()}, g @ w.detach().double(), g.T @ hs.detach().double()


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("with_temp", [True, False])
def test_online_closed_form_matches_float64_autograd(kind, beta, with_temp):
    hs, w, teacher, tgt, tw, temp = _inputs()
    temp = temp if with_temp else None
    ch = {"kd": 1.0, "ce": 0.4}
    ref, ref_pt, gh_ref, gw_ref = _float64_reference(hs, w, teacher, tgt, tw, temp, ch, kind, beta)
    for chunk in (1, 8, 29, 64):                                      # chunked == unchunked
        tot, pt = fused_distill_loss(hs, w, teacher, tgt, tw, temp, ch, kind, beta, chunk)
        gh, gw = torch.autograd.grad(tot, [hs, w])
        torch.testing.assert_close(tot.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-5)
        for c in ch:
            torch.testing.assert_close(pt[c].double(), ref_pt[c], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_online_closed_form_equals_the_autograd_path(monkeypatch, kind, beta):
    """Parity with the per-chunk autograd path (``CLOSED_FORM = False``), dense logits and hidden states,
    masked tokens (weight 0) and a zero-weight channel included."""
    hs, w, teacher, tgt, tw, temp = _inputs(seed=11)
    tw = tw.clone()
    tw[::3] = 0.0
    for ch in ({"kd": 1.0, "ce": 0.0}, {"kd": 0.7, "ce": 1.3}, {"kd": 0.5, "ce": 0.3, "clone": 0.9}):
        for t in (teacher, teacher.hidden @ teacher.weight.T):
            tot, pt = fused_distill_loss(hs, w, t, tgt, tw, temp, ch, kind, beta, 8)
            gh, gw = torch.autograd.grad(tot, [hs, w])
            monkeypatch.setattr(fused, "CLOSED_FORM", False)
            ref, ref_pt = fused_distill_loss(hs, w, t, tgt, tw, temp, ch, kind, beta, 8)
            rh, rw = torch.autograd.grad(ref, [hs, w])
            monkeypatch.setattr(fused, "CLOSED_FORM", True)
            torch.testing.assert_close(tot, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
            for c in ch:
                torch.testing.assert_close(pt[c], ref_pt[c], rtol=1e-5, atol=1e-6)


def test_online_all_masked_batch_gives_zero_loss_and_gradient():
    hs, w, teacher, tgt, _, temp = _inputs()
    tot, _ = fused_distill_loss(hs, w, teacher, tgt, torch.zeros(hs.shape[0]), temp, {"kd": 1.0, "ce": 1.0},
                                "forward_kl", 0.0, 7)
    gh, gw = torch.autograd.grad(tot, [hs, w])
    assert float(tot.detach()) == 0.0 and float(gh.abs().sum()) == 0.0 and float(gw.abs().sum()) == 0.0
    empty, _ = fused_distill_loss(hs[:0], w, TeacherHidden(teacher.hidden[:0], teacher.weight), tgt[:0], None, None,
                                  {"kd": 1.0}, "forward_kl", 0.0, 7)
    assert float(empty.detach()) == 0.0


def test_online_forward_kl_single_pass_edge_cases():
    """The in-place forward-KL path: dense teacher logits passed by the caller are not overwritten; a teacher
    with -inf logits (a masked vocabulary entry) stays finite and matches float64 (floored log-probs); T = 1 as a
    tensor is the same computation as no temperature."""
    hs, w, teacher, tgt, tw, _ = _inputs(seed=3)
    ch = {"kd": 1.0, "ce": 0.4}
    dense = teacher.hidden @ teacher.weight.T
    dense[:, 7] = float("-inf")
    kept = dense.clone()
    tot, pt = fused_distill_loss(hs, w, dense, tgt, tw, None, ch, "forward_kl", 0.0, 8)
    assert torch.equal(dense, kept) and torch.isfinite(tot)
    gh, gw = torch.autograd.grad(tot, [hs, w])
    z = (hs.detach().double() @ w.detach().double().T).requires_grad_(True)
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(dense.double(), -1).clamp_min(LOGP_FLOOR)
    kd = (lp.exp() * (lp - lq)).sum(-1)
    ce = torch.logsumexp(z, -1) - z.gather(1, tgt.unsqueeze(1)).squeeze(1)
    ref = ((kd + 0.4 * ce) * tw.double()).sum()
    (g,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(tot.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), g @ w.detach().double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pt["kd"].double(), kd.detach(), rtol=1e-5, atol=1e-6)
    one, _ = fused_distill_loss(hs, w, teacher, tgt, tw, torch.ones(hs.shape[0]), ch, "forward_kl", 0.0, 8)
    none, _ = fused_distill_loss(hs, w, teacher, tgt, tw, None, ch, "forward_kl", 0.0, 8)
    assert torch.equal(one.detach(), none.detach())
