"""S2.4 response cloning: diversity mask, coherence weights, the clone loss (float64 reference, masking,
chunking, conciseness), missing teacher data, accumulation invariance and bitwise resume with every channel
on."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from distillgate.config import CloneSpec, LossSpec
from distillgate.data.generate import Example
from distillgate.data.samples import (agreement, build_clone_rows, coherence_matrix, coherence_scores,
                                      coherence_weights, diversity_mask)
from distillgate.errors import ConfigError, InputError
from distillgate.losses import DistillObjective
from distillgate.losses.clone import CloneProvider, concise_penalty, expected_length
from distillgate.targets import TopKTargets, prediction_positions

EOT = 2


def fake_encode(texts):
    """Character-trigram counts hashed into 64 dims: similar texts get similar vectors (a stand-in for
    MiniLM in unit tests)."""
    out = np.zeros((len(texts), 64))
    for i, t in enumerate(texts):
        for j in range(max(1, len(t) - 2)):
            out[i, int(hashlib.md5(t[j:j + 3].encode()).hexdigest(), 16) % 64] += 1.0
    return out


# ------------------------------------------------------------------------------------ teacher-side data

def test_agreement_marks_the_spans_samples_share():
    a = agreement([[5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 8]])
    np.testing.assert_allclose(a[0], [1.0, 1.0, 0.5, 1.0])       # 7 agrees with sample 2, not with sample 1
    np.testing.assert_allclose(a[1], [1.0, 1.0, 0.0, 1.0])       # 9 is its own style choice
    m = diversity_mask([[5, 6, 7, 8], [5, 6, 9, 8]], 0.25)
    np.testing.assert_allclose(m[1], [1.0, 1.0, 0.25, 1.0])
    assert agreement([[1, 2, 3]])[0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="diversity_floor"):
        diversity_mask([[1]], 1.5)


def test_coherence_drops_the_incoherent_sample_and_weights_the_rest_to_mean_one():
    ans = np.array([[1.0, 0.0, 0.1], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    c, p = coherence_matrix(ans, np.array([1.0, 0.05, 0.0]))
    assert c.shape == (3, 3) and np.allclose(np.diag(c), 1.0)
    s = coherence_scores(c, p, 0.5)
    w = coherence_weights(s, 0.4)
    assert w[2] == 0.0 and w[0] > 0 and w[1] > 0 and w[:2].mean() == pytest.approx(1.0)


def _examples(prompts=3, samples=3, seed=0):
    rng = np.random.default_rng(seed)
    exs = []
    texts = ["Revenue grew by twelve percent this quarter.", "Revenue grew twelve percent in the quarter.",
             "Zebra xylophone quantum banana.", "Costs stayed flat all year.", "Costs were flat this year."]
    for p in range(prompts):
        shared = rng.integers(5, 300, 4).tolist()
        for s in range(samples):
            own = rng.integers(5, 300, 2 + 4 * s).tolist()
            resp = shared[:2] + own + shared[2:] + [EOT]
            prompt = [1, 10 + p, 11]
            exs.append(Example(id=f"p{p}/s{s}", prompt_id=f"p{p}", sample_idx=s, domain=["legal", "medical"][p % 2],
                               complexity=0.5, input_ids=prompt + resp, loss_mask=[0] * len(prompt) + [1] * len(resp),
                               response=texts[(p + s) % len(texts)]))
    return exs


def test_clone_rows_per_prompt_group_and_memo():
    exs = _examples()
    rows = build_clone_rows(exs, CloneSpec(coherence_min=-1.0), fake_encode)
    assert set(rows) == {e.id for e in exs}
    for e in exs:
        r = rows[e.id]
        assert len(r.mask) == e.n_targets and r.mask[0] == 1.0 and r.mask[-1] == 1.0    # shared start and EOT
        assert min(r.mask) < 1.0                                                      # its own tokens weigh less
    for p in range(3):
        ws = [rows[f"p{p}/s{s}"].weight for s in range(3)]
        assert np.mean(ws) == pytest.approx(1.0)
        assert rows[f"p{p}/s0"].ref_len == float(np.median([e.n_targets for e in exs if e.prompt_id == f"p{p}"]))
    calls = []
    again = build_clone_rows(exs, CloneSpec(coherence_min=-1.0), lambda t: calls.append(t) or fake_encode(t))
    assert again == rows and not calls                                     # memoised per prompt group
    strict = build_clone_rows(exs, CloneSpec(coherence_min=0.99), fake_encode)
    assert any(r.weight == 0.0 for r in strict.values())                   # incoherent samples dropped


# ------------------------------------------------------------------------------------------ conciseness

def _expected_length64(log_h):
    s, e = 1.0, 0.0
    for lh in log_h.tolist():
        e += s
        s *= 1.0 - np.exp(lh)
    return e


def test_concise_penalty_matches_a_float64_reference_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 8, generator=g, dtype=torch.float64)
    w[EOT] += 1.5                                                             # a hazard that is not tiny
    counts, ref = torch.tensor([6, 2, 5]), torch.tensor([2.0, 2.0, 4.0])
    pen = concise_penalty(h, w, EOT, counts, ref, 1.5, chunk_size=4)
    lh = torch.log_softmax(h.detach() @ w.T, -1)[:, EOT]
    want = []
    for s, n, L in ((0, 6, 2.0), (6, 2, 2.0), (8, 5, 4.0)):
        e = _expected_length64(lh[s:s + n]) if n > 1.5 * L else 0.0
        want.append(max(0.0, e - 1.5 * L) / L)
    np.testing.assert_allclose(pen.detach().numpy(), want, rtol=1e-10)
    assert want[0] > 0 and want[1] == 0.0 and want[2] == 0.0               # sample 2 short, sample 3 under 1.5 L
    (gh,) = torch.autograd.grad(pen.sum(), h)
    eps, num = 1e-6, torch.zeros_like(h)
    for i in range(0, 6, 2):
        for j in range(0, 8, 2):
            hp, hm = h.detach().clone(), h.detach().clone()
            hp[i, j] += eps
            hm[i, j] -= eps
            num[i, j] = (concise_penalty(hp, w, EOT, counts, ref, 1.5).sum() -
                         concise_penalty(hm, w, EOT, counts, ref, 1.5).sum()) / (2 * eps)
    torch.testing.assert_close(gh[0:6:2, 0:8:2], num[0:6:2, 0:8:2], rtol=1e-5, atol=1e-8)
    assert float(gh[6:].abs().sum()) == 0.0
    assert float(expected_length(torch.full((3,), -1e-9))) == pytest.approx(1.0, abs=1e-5)   # stops at once


# --------------------------------------------------------------------------------------------- the loss

class _FullTopK:
    """The teacher's whole distribution as top-k targets (k = V: no tail, exact)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, b):
        bi, ti = prediction_positions(b)
        with torch.no_grad():
            lp = torch.log_softmax(self.teacher(input_ids=b["input_ids"]).logits[bi, ti].float(), -1)
        v, i = lp.topk(lp.shape[-1], -1)
        return TopKTargets(indices=i, logprobs=v)


def _batch(exs, pad=0):
    from distillgate.data.dataset import collate

    return collate(exs, pad)


def _objective(spec, teacher, exs, encode=fake_encode):
    rows = build_clone_rows(exs, spec.clone, encode)
    return DistillObjective(spec, _FullTopK(teacher), clone=CloneProvider(rows, EOT)), rows


def _reference(student, teacher, batch, spec, rows):
    """float64: kd (k = V, T = 1) + ce + clone (masked, coherence-weighted NLL) + conciseness."""
    bi, ti = prediction_positions(batch)
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"]).logits[bi, ti].double()
    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[bi, ti].double()
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    tgt = batch["input_ids"][bi, ti + 1]
    kd = (lp.exp() * (lp - lq)).sum(-1)
    nll = -lq.gather(1, tgt.unsqueeze(1)).squeeze(1)
    counts = (batch["loss_mask"][:, 1:] != 0).sum(1).tolist()
    mask = torch.cat([torch.tensor(rows[e].mask[:c], dtype=torch.float64) * rows[e].weight
                      for e, c in zip(batch["example_ids"], counts)])
    ch = spec.channels
    total = (ch.get("kd", 0) * kd + ch.get("ce", 0) * nll + ch.get("clone", 0) * mask * nll).sum()
    start = 0
    for e, c in zip(batch["example_ids"], counts):
        L = rows[e].ref_len
        if c > spec.clone.concise_ratio * L:
            lh = lq[start:start + c, EOT]
            log_go = torch.log1p(-lh.exp())
            e_len = torch.cat([lh.new_zeros(1), torch.cumsum(log_go, 0)[:-1]]).exp().sum()
            total = total + ch["clone"] * spec.clone.concise_weight * torch.relu(e_len - spec.clone.concise_ratio * L) / L
        start += c
    return total


def test_clone_objective_matches_float64_reference_and_chunking(tiny_model_factory):
    student = tiny_model_factory(num_layers=2, seed=1).train()
    teacher = tiny_model_factory(num_layers=2, seed=0).eval()
    exs = _examples()
    batch = _batch(exs[:5])
    base = dict(channels={"kd": 1.0, "ce": 0.2, "clone": 0.7}, clone={"concise_ratio": 1.2, "coherence_min": -1.0})
    outs = []
    for chunk in (16, 4096):
        spec = LossSpec(chunk_size=chunk, **base)
        obj, rows = _objective(spec, teacher, exs)
        out = obj(student, batch)
        params = list(student.parameters())
        grads = torch.autograd.grad(out.total_sum, params, allow_unused=True)
        ref = _reference(student, teacher, batch, spec, rows)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        assert float(out.total_sum.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        for a, b in zip(grads, ref_grads):
            if b is not None:
                torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-4 * float(b.abs().max()))
        assert float(out.per_token["clone_concise"].sum()) > 0                    # the conciseness term is on
        outs.append(out)
    torch.testing.assert_close(outs[0].total_sum, outs[1].total_sum, rtol=1e-6, atol=1e-6)
    assert set(outs[0].terms) == {"kd", "ce", "clone", "clone_concise"}


def test_clone_fully_masked_batch_gives_zero(tiny_model_factory):
    student = tiny_model_factory(num_layers=2, seed=1)
    teacher = tiny_model_factory(num_layers=2, seed=0)
    exs = _examples()
    spec = LossSpec(channels={"clone": 1.0}, chunk_size=16, clone={"coherence_min": 2.0 - 1.0 + 0.0})
    rows = {e.id: r.__class__(r.mask, 0.0, r.coherence, r.ref_len)
            for e, r in zip(exs, build_clone_rows(exs, spec.clone, fake_encode).values())}
    rows = {k: v for k, v in rows.items()}
    out = DistillObjective(LossSpec(channels={"clone": 1.0}, chunk_size=16, clone={"concise_weight": 0.0}),
                           _FullTopK(teacher), clone=CloneProvider(rows, EOT))(student, _batch(exs[:4]))
    grads = torch.autograd.grad(out.total_sum, [p for p in student.parameters()], allow_unused=True)
    assert float(out.total_sum.detach()) == 0.0
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)


def test_clone_without_its_teacher_data_fails_naming_the_field(tiny_model_factory):
    with pytest.raises(ConfigError, match=r"loss\.channels\.clone"):
        DistillObjective(LossSpec(channels={"kd": 1.0, "clone": 0.5}), lambda b: None)
    teacher = tiny_model_factory(num_layers=2, seed=0)
    exs = _examples()
    obj, _ = _objective(LossSpec(channels={"kd": 1.0, "clone": 0.5}, chunk_size=16), teacher, exs[:3])
    with pytest.raises(InputError, match="no teacher-sample data for example 'p1/s0'"):
        obj(tiny_model_factory(num_layers=2, seed=1), _batch(exs[2:5]))


def test_preflight_refuses_clone_without_several_samples(tiny_teacher_dir, tmp_path):
    from distillgate.config import DistillConfig
    from distillgate.pipeline import preflight

    base = {"teacher": {"path": str(tiny_teacher_dir)}, "output_dir": str(tmp_path / "o"),
            "loss": {"channels": {"kd": 1.0, "clone": 0.5}}, "data": {"num_prompts": 4}}
    with pytest.raises(ConfigError, match=r"data\.samples_per_prompt"):
        preflight(DistillConfig.model_validate(base))
    base["data"].update({"samples_per_prompt": 3})
    with pytest.raises(ConfigError, match=r"data\.gen_temperature"):
        preflight(DistillConfig.model_validate(base))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ accumulation and resume

def _train_all_channels(tmp, teacher, exs, *, batch_size, grad_accum, steps, stop_at=None, resume=False,
                        student=None, factory=None):
    from distillgate.config import TrainSpec
    from distillgate.train import StopTraining, train

    spec = LossSpec(channels={"kd": 1.0, "ce": 0.2, "clone": 0.5}, chunk_size=16,
                    clone={"concise_ratio": 1.2, "coherence_min": -1.0},
                    domain_channel_shares={"legal": {"clone": 2.0, "kd": 0.5}, "medical": {"ce": 0.0}})
    obj, _ = _objective(spec, teacher, exs)
    window = [_batch(exs[i:i + batch_size]) for i in range(0, 8, batch_size)]
    ts = TrainSpec(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, warmup_steps=0,
                   max_grad_norm=1e9, precision="fp32", checkpoint_every=0)

    def stop(info):
        if stop_at is not None and info.step == stop_at:
            raise StopTraining

    train(student, obj, lambda epoch: window, ts, tmp, progress=False, tensorboard=False,
          callbacks=[stop], resume_from=tmp if resume else None)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_every_channel_on_keeps_accumulation_invariance_and_bitwise_resume(tiny_model_factory, tmp_path):
    teacher = tiny_model_factory(num_layers=2, seed=0).eval()
    exs = _examples(prompts=3, samples=3)[:8]
    a = _train_all_channels(tmp_path / "a", teacher, exs, batch_size=8, grad_accum=1, steps=2,
                            student=tiny_model_factory(num_layers=2, seed=1))
    b = _train_all_channels(tmp_path / "b", teacher, exs, batch_size=2, grad_accum=4, steps=2,
                            student=tiny_model_factory(num_layers=2, seed=1))
    init = tiny_model_factory(num_layers=2, seed=1).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4
    # fp32: a batch of 8 and 4 micro-batches of 2 reduce in different orders, and with 2 intra-op threads that
    # moved one weight of 2048 by 3.0e-6 after 2 AdamW steps (1 thread: < 1e-6); 1e-5 is still 10x under the
    # update asserted above (a micro-batch weighted wrongly, e.g. by its own token count, changes the direction)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    straight = _train_all_channels(tmp_path / "s", teacher, exs, batch_size=4, grad_accum=1, steps=4,
                                   student=tiny_model_factory(num_layers=2, seed=1))
    _train_all_channels(tmp_path / "r", teacher, exs, batch_size=4, grad_accum=1, steps=4, stop_at=2,
                        student=tiny_model_factory(num_layers=2, seed=1))
    resumed = _train_all_channels(tmp_path / "r", teacher, exs, batch_size=4, grad_accum=1, steps=4, resume=True,
                                  student=tiny_model_factory(num_layers=2, seed=7))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_style_scores_compare_length_similarity_markers_and_refusals():
    from distillgate.evaluate.style import markers, style_scores

    assert markers("I'm sorry, but I can't help with that.")["refusal"]
    assert markers("It may depend; would you like more detail?")["hedging"]
    assert markers("Thank you! Would you like more?")["follow_up"] and markers("Thanks, please wait")["politeness"]
    teacher = [["Revenue grew by twelve percent.", "Revenue grew twelve percent."],
               ["Costs stayed flat, thank you.", "Costs were flat."]]
    student = ["Revenue grew by twelve percent.", "I'm sorry, but I can't help with that."]
    out = style_scores(teacher, [[6, 5], [6, 4]], student, [6, 11], fake_encode)
    assert out["length_ratio"] == pytest.approx(8.5 / 5.25)
    assert out["refusal/student"] == 0.5 and out["refusal/teacher"] == 0.0
    assert out["politeness/teacher"] == 0.25 and out["politeness/student"] == 0.5    # "sorry" is a courtesy marker
    same = style_scores(teacher, [[6, 5], [6, 4]], [teacher[0][0], teacher[1][0]], [6, 6], fake_encode)
    assert same["similarity"] > out["similarity"] and 0 < same["teacher_self_similarity"] <= 1
