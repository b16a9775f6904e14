"""S2.2 attention alignment and S2.3 gated adapters: float64 references, masking, chunking, zero loss for the
teacher itself, which parameters get gradients, cached == online, closed gates == the exported plain model,
preflight, accumulation invariance and bitwise resume with every channel on. Tiny models, CPU, one thread."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distillgate.config import DistillConfig, LossSpec
from distillgate.errors import ConfigError
from distillgate.losses.attention import attention_kl, attention_loss, head_attention, rollout_head_scores, topk_keys
from distillgate.losses.feature import feature_loss
from distillgate.losses.objective import DistillObjective
from distillgate.models.adapters import FeatureAdapters, anneal
from distillgate.side_channels import ChannelSetup, check_side_channels
from distillgate.teacher_side import SideProvider, compute_side_cache, make_plan
from distillgate.train import train
from distillgate.targets import OnlineTeacher

from test_train_support import VOCAB, collate, make_sequences, spec, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _sliced(teacher, keep):
    """A 'derived' student: the teacher's layers ``keep`` (layer map i -> keep[i])."""
    s = copy.deepcopy(teacher)
    s.model.layers = torch.nn.ModuleList([s.model.layers[i] for i in keep])
    s.config.num_hidden_layers = len(keep)
    if getattr(s.config, "layer_types", None):
        s.config.layer_types = [s.config.layer_types[i] for i in keep]
    for j, layer in enumerate(s.model.layers):
        layer.self_attn.layer_idx = j
    return s.train()


def _batch(n=4, seed=3):
    return collate(make_sequences(n, T=12, seed=seed))


# ------------------------------------------------------------------------------------------ pure losses

def _ref_logp64(q, k, scaling, am):
    B, h, T, _ = q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) * scaling
    mask = torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T) & (am != 0).view(B, 1, 1, T)
    return torch.log_softmax(s.masked_fill(~mask, float("-inf")), -1), mask


def test_head_attention_matches_float64_masks_and_chunks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 4, generator=g) for _ in range(3))
    am = torch.ones(3, 7, dtype=torch.long)
    am[1, 5:] = 0
    am[2, 3:] = 0
    logp, ln = head_attention(q, k, v, 0.5, am)
    ref, mask = _ref_logp64(q, k, 0.5, am)
    valid = mask.expand_as(ref) & mask.any(-1, keepdim=True).expand_as(ref)
    torch.testing.assert_close(logp.double()[valid], ref[valid], atol=1e-5, rtol=0)
    assert bool((logp.exp()[~mask.expand_as(logp)] == 0).all())          # causal + padding keys get nothing
    out64 = (ref.exp().nan_to_num(0.0) @ v.double())
    torch.testing.assert_close(ln.double()[:, :, :3], out64.norm(dim=-1).log()[:, :, :3], atol=1e-5, rtol=0)
    lc, nc = head_attention(q, k, v, 0.5, am, chunk_rows=1)               # chunked == unchunked
    assert torch.equal(lc, logp) and torch.equal(nc, ln)
    k2 = k.clone()
    k2[1, :, 5:] += 100.0                                                  # padded keys: no effect on the rest
    assert torch.equal(head_attention(q, k2, v, 0.5, am)[0][1, :, :5, :5], logp[1, :, :5, :5])


def test_attention_kl_dense_and_topk_against_float64():
    g = torch.Generator().manual_seed(1)
    N, h, T = 5, 2, 6
    lt = torch.log_softmax(torch.randn(N, h, T, generator=g, dtype=torch.float64) * 2, -1)
    ls = torch.log_softmax(torch.randn(N, h, T, generator=g, dtype=torch.float64) * 2, -1)
    dense_ref = (lt.exp() * (lt - ls)).sum(-1)
    idx, lp = topk_keys(lt.float(), T)
    torch.testing.assert_close(attention_kl(ls.float(), idx, lp).double(), dense_ref, atol=1e-5, rtol=0)
    # top-3 + one tail bucket, float64 by hand
    idx3, lp3 = topk_keys(lt.float(), 3)
    pt = lt.exp().gather(-1, idx3)
    r = 1 - pt.sum(-1)
    qs = ls.gather(-1, idx3)
    qtail = torch.log(1 - qs.exp().sum(-1))
    ref3 = (pt * (lt.gather(-1, idx3) - qs)).sum(-1) + r * (r.log() - qtail)
    torch.testing.assert_close(attention_kl(ls.float(), idx3, lp3).double(), ref3, atol=1e-5, rtol=0)
    # masked keys (teacher -inf) carry nothing, the student's values there are ignored when in the top-k pad
    lt_m = lt.clone()
    lt_m[..., 4:] = float("-inf")
    lt_m = torch.log_softmax(lt_m, -1)
    ls_m = torch.log_softmax(ls.clone().index_fill_(-1, torch.tensor([4, 5]), float("-inf")), -1)
    i_m, l_m = topk_keys(lt_m.float(), T)
    ref_m = (lt_m.exp() * (lt_m - ls_m)).nan_to_num(0.0).sum(-1)
    torch.testing.assert_close(attention_kl(ls_m.float(), i_m, l_m).double(), ref_m, atol=1e-5, rtol=0)
    # an empty batch gives an empty loss (the objective sums it to an exact 0)
    z = attention_loss(torch.zeros(0, h, T), torch.zeros(0, h), torch.zeros(0, h, 3, dtype=torch.long),
                       torch.zeros(0, h, 3), torch.zeros(0, h), 0.1)
    assert z.shape == (0,) and float(z.sum()) == 0.0


def test_rollout_prefers_a_head_that_gathers_from_other_tokens():
    T = 6
    self_head = torch.eye(T)
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    prev = torch.zeros(T, T)
    prev[0, 0] = 1.0
    for i in range(1, T):
        prev[i, i - 1] = 1.0
    s = rollout_head_scores([torch.stack([self_head, sink, prev])], T, 2)
    assert s[0, 0] == 0 and s[0, 1] == 0 and s[0, 2] == pytest.approx(1.0)


def test_feature_loss_float64_reference():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    scale = torch.tensor([1.0, 4.0, 0.5])
    ref = ((s.double() - t.double()) ** 2).mean(-1) / scale.double()
    torch.testing.assert_close(feature_loss(s, t, "mse", scale).double(), ref.mean(-1), atol=1e-6, rtol=0)
    cos = (s.double() * t.double()).sum(-1) / (s.double().norm(dim=-1) * t.double().norm(dim=-1))
    torch.testing.assert_close(feature_loss(s, t, "cosine").double(), (1 - cos).mean(-1), atol=1e-6, rtol=0)
    assert feature_loss(torch.zeros(0, 3, 8), torch.zeros(0, 3, 8)).shape == (0,)


# ------------------------------------------------------------------------------------------ through the objective

def _spec(channels, **kw):
    return LossSpec(channels=channels, attention={"key_heads": 2, "norm_weight": kw.pop("norm_weight", 0.0),
                                                  "cache_top_k": kw.pop("top_k", 16)},
                    feature={"cache_rank": kw.pop("rank", 8), **kw})


def _setup(spec, teacher, student, layer_map, mode="online"):
    calib = torch.cat([s["input_ids"] for s in make_sequences(6, T=12, seed=9)])
    plan = make_plan(spec, teacher, student, layer_map, calib, mode=mode)
    return ChannelSetup(spec, plan, teacher, mode)


def test_attn_is_zero_for_the_teacher_and_trains_only_the_chosen_heads():
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher).train()
    spec = _spec({"kd": 0.0, "attn": 1.0})
    setup = _setup(spec, teacher, student, {0: 0, 1: 1})
    obj = DistillObjective(spec, setup.provider(None, []), VOCAB, side=setup.student_channels())
    batch = _batch()
    out = obj(student, batch)
    out.total_sum.backward()
    assert abs(out.terms["attn"]) < 1e-6
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5
    # a different student: gradients reach the chosen heads' q rows and their KV group's k rows only
    student.zero_grad()
    with torch.no_grad():
        for layer in student.model.layers:
            layer.self_attn.q_proj.weight.add_(0.3 * torch.randn_like(layer.self_attn.q_proj.weight))
    out = obj(student, batch)
    out.total_sum.backward()
    assert out.terms["attn"] > 1e-4
    d = student.model.layers[0].self_attn.head_dim
    chosen = {}
    for p in setup.plan.heads:
        chosen.setdefault(p.student_layer, set()).add(p.student_head)
    # in the chosen heads' layers (earlier layers get gradients through the residual stream, as they should)
    for li, heads in chosen.items():
        a = student.model.layers[li].self_attn
        group = (a.q_proj.out_features // d) // (a.k_proj.out_features // d)
        for hh in range(a.q_proj.out_features // d):
            gq = a.q_proj.weight.grad[hh * d:(hh + 1) * d].abs().max()
            assert (float(gq) > 0) == (hh in heads), (li, hh)
        for kv in range(a.k_proj.out_features // d):
            gk = a.k_proj.weight.grad[kv * d:(kv + 1) * d].abs().max()
            assert (float(gk) > 0) == any(hh // group == kv for hh in heads), (li, kv)
        assert a.v_proj.weight.grad is None or float(a.v_proj.weight.grad.abs().max()) == 0
        assert a.o_proj.weight.grad is None or float(a.o_proj.weight.grad.abs().max()) == 0


def test_cached_side_equals_online_when_lossless(tmp_path):
    from distillgate.data.generate import Example

    teacher = tiny_model(seed=0, layers=3)
    student = _sliced(tiny_model(seed=4, layers=3), [0, 2])
    seqs = make_sequences(4, T=12, seed=5)
    exs = []
    for i, s in enumerate(seqs):
        n = int(s["attention_mask"].sum())
        exs.append(Example(f"e{i}", f"p{i}", 0, "legal", 0.5, s["input_ids"][0, :n].tolist(),
                           s["loss_mask"][0, :n].tolist(), ""))
    from distillgate.data.dataset import collate as dcollate

    batch = dcollate(exs, pad_id=3)
    lmap = {0: 0, 1: 2}
    spec = _spec({"kd": 1.0, "attn": 1.0, "feature": 1.0}, norm_weight=0.1, top_k=64, rank=32, inject=False)
    on = _setup(spec, teacher, student, lmap, "online")
    ca = _setup(spec, teacher, student, lmap, "cached")
    assert [(p.teacher_layer, p.teacher_head) for p in on.plan.heads] == \
        [(p.teacher_layer, p.teacher_head) for p in ca.plan.heads]
    assert all(p.teacher_layer in (0, 2) for p in on.plan.heads)            # only heads the student kept
    on.attach(student)
    o_on = DistillObjective(spec, on.provider(None, []), VOCAB, side=on.student_channels())(student, batch)
    on.detach()
    ca.attach(student)
    prov = ca.provider(OnlineTeacher(teacher), [exs[:2], exs[2:]], pad_id=3, batch_size=2, root=tmp_path)
    assert isinstance(prov, SideProvider) and len(ca.caches) == 2
    meta = ca.cache_meta()
    assert meta["bytes_per_position"] == 2 * (4 * 64 + 2) + 2 * 2 * 32
    assert meta["feature_recon_error"] < 1e-6 and meta["attn_topk_mass"] == pytest.approx(1.0, abs=1e-3)
    o_ca = DistillObjective(spec, prov, VOCAB, side=ca.student_channels())(student, batch)
    ca.detach()
    for name in ("attn", "feature"):
        assert o_ca.terms[name] == pytest.approx(o_on.terms[name], rel=2e-3), name
    # the cache is reused (same key), a changed plan is another cache
    again = compute_side_cache(teacher, exs[:2], ca.plan, pad_id=3, batch_size=2, root=tmp_path)
    assert again.path == ca.caches[0].path
    # the PCA basis is kept on disk by teacher fingerprint and calibration tokens, and read back exactly
    from distillgate.teacher_side import feature_basis

    calib = torch.cat([s["input_ids"] for s in make_sequences(6, T=12, seed=9)])
    first = feature_basis(teacher, calib, [0, 2], 8, 64, fingerprint="fp", root=tmp_path)
    second = feature_basis(teacher, calib, [0, 2], 8, 64, fingerprint="fp", root=tmp_path)
    assert len(list(tmp_path.glob("basis-*"))) == 1
    for x, y in zip(first[:3], second[:3]):
        assert torch.equal(x, y)
    assert first[3] == second[3]


def test_closed_gates_export_is_the_trained_student_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from distillgate.models import save_model
    from distillgate.testing import make_tiny_tokenizer

    teacher = tiny_model(seed=0, layers=3)
    student = _sliced(tiny_model(seed=4, layers=3), [0, 2])
    spec = _spec({"kd": 1.0, "feature": 1.0}, gate_init=0.3, anneal_end=0.5)
    setup = _setup(spec, teacher, student, {0: 0, 1: 2})
    obj = DistillObjective(spec, setup.provider(None, []), VOCAB, side=setup.student_channels())
    batches = [_batch(2, seed=s) for s in range(3)]
    seen = []

    def watch(info):
        seen.append(setup.adapters.multiplier())
    with setup.attached(student):
        before = {k: v.clone() for k, v in student.state_dict().items()}
        train(student, obj, lambda e: batches, spec_(steps=4), tmp_path / "t", callbacks=[setup.on_step, watch],
              progress=False, tensorboard=False)
        assert any(k.startswith("distill_adapters.") for k in student.state_dict())
        assert torch.sigmoid(setup.adapters.gate_logit).sub(0.3).abs().max() > 1e-5   # the gates trained
        setup.adapters.closed = True
        ids = batches[0]["input_ids"]
        b, t = torch.nonzero(batches[0]["loss_mask"][:, 1:], as_tuple=True)
        setup.adapters.set_teacher(torch.randn(b.shape[0], 2, 32), b, t)
        closed = student(input_ids=ids).logits.detach()
        setup.adapters.clear()
    assert seen == [0.5, 0.0, 0.0, 0.0]                        # linear 1 -> 0 by half of the steps, then shut
    assert not any(k.startswith("distill_adapters") for k in student.state_dict())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    plain = student(input_ids=ids).logits.detach()
    assert torch.equal(plain, closed)
    tok = make_tiny_tokenizer()
    out = save_model(student.eval(), tok, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits, atol=1e-6,
                               rtol=0)


def spec_(**kw):
    return spec(**{"grad_accum": 1, "batch_size": 2, "warmup_steps": 0, **kw})


def test_gate_anneal_schedules():
    assert [anneal(p, "linear", 0.0, 0.5) for p in (0, 0.25, 0.5, 1)] == [1.0, 0.5, 0.0, 0.0]
    assert anneal(0.25, "cosine", 0.0, 0.5) == pytest.approx(0.5)
    assert anneal(0.4, "constant", 0.0, 0.5) == 1.0 and anneal(0.5, "constant", 0.0, 0.5) == 0.0
    a = FeatureAdapters([(4, 4), (4, 6)], 0.02, "linear", 0.0, 1.0)
    assert torch.sigmoid(a.gate_logit).tolist() == pytest.approx([0.02, 0.02])
    assert isinstance(a.proj[0], torch.nn.Identity) and a.proj[1].weight.shape == (4, 6)


# ------------------------------------------------------------------------------------------ preflight

def test_a_channel_without_its_teacher_data_fails_naming_the_field():
    c = DistillConfig(loss={"channels": {"kd": 1.0, "attn": 0.5}, "attention": {"cache_top_k": 0}})
    with pytest.raises(ConfigError, match=r"loss\.attention\.cache_top_k"):
        check_side_channels(c)
    c = DistillConfig(loss={"channels": {"kd": 1.0, "feature": 0.5}, "feature": {"cache_rank": 0}})
    with pytest.raises(ConfigError, match=r"loss\.feature\.cache_rank"):
        check_side_channels(c)
    check_side_channels(c.model_copy(update={"targets": c.targets.model_copy(update={"mode": "online"})}))
    # at run time: a provider that gives no side data -> the channel is named
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher).train()
    sp = _spec({"kd": 1.0, "attn": 1.0})
    setup = _setup(sp, teacher, student, {0: 0, 1: 1})
    obj = DistillObjective(sp, OnlineTeacher(teacher), VOCAB, side=setup.student_channels())
    with pytest.raises(ConfigError, match=r"loss\.channels\.attn"):
        obj(student, _batch())
    with pytest.raises(ConfigError, match="loss.channels"):
        DistillObjective(sp, OnlineTeacher(teacher), VOCAB)         # attn without its student side


# ------------------------------------------------------------------------------------------ trainer invariants

# accumulation invariance and bitwise resume with every channel on (kd, ce, attn, feature, clone, domain shares):
# tests/unit/test_channels_all.py (the same models and side-channel setup plus clone and shares; it replaces
# the kd + ce + attn + feature version that was here)


# ------------------------------------------------------------------------------------------ distill and run

_CHANNELS = "loss.channels={kd: 1.0, attn: 0.5, feature: 0.5}"


def test_distill_trains_every_channel_from_a_config(tiny_teacher_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from distillgate.cli import main

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {{path: {tiny_teacher_dir}}}\nstudent: {{num_layers: 1, layer_selection: block_influence,"
                   f" calib_tokens: 256}}\ndata: {{num_prompts: 16, max_new_tokens: 24}}\n"
                   f"train: {{steps: 3, batch_size: 2, warmup_steps: 0, precision: fp32}}\n"
                   f"loss: {{channels: {{kd: 1.0, attn: 0.5, feature: 0.5}}, attention: {{key_heads: 2}}, "
                   f"feature: {{cache_rank: 8}}}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["distill", "--config", str(cfg), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    ch = summary["channels"]
    assert len(ch["plan"]["heads"]) == 2 and len(ch["plan"]["feature_layers"]) == 1
    assert ch["cache"]["bytes_per_position"] == 2 * (4 * 16 + 2) + 1 * 2 * 8
    assert 0 <= ch["cache"]["feature_recon_error"] < 1 and 0 < ch["cache"]["attn_topk_mass"] <= 1.0 + 1e-3
    assert {"attn", "feature", "kd"} <= set(summary["train"]["final_terms"])
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "student"))
    assert not any("adapter" in k for k in m.state_dict())


def test_run_trains_every_channel_in_the_joint_stage(tiny_teacher_dir, tmp_path, monkeypatch):
    from distillgate import loop as loop_mod
    from distillgate.config import RunConfig, load_config
    from distillgate.store import RunStore

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    over = [f"teacher.path={tiny_teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=12", "data.gen_batch_size=8", "train.steps=2", "train.batch_size=2",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
            "loop.heldout_prompts=4", "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 2}]",
            "loop.perf_lengths=[16]", "loop.perf_repeats=1", f"store_root={tmp_path / 'runs'}", _CHANNELS,
            "loss.attention.key_heads=2", "loss.feature.cache_rank=8"]
    summary = loop_mod.run(load_config(RunConfig, None, over), progress=False)
    with RunStore.open(tmp_path / "runs", summary["run_id"]) as s:
        heads = []
        for row in s.versions()[1:]:
            v = s.get_version(row["version_id"])
            rec = json.loads(v.path_of(next(n for n in v.files if n.startswith("channels"))).read_text())
            heads.append([(h["teacher_layer"], h["teacher_head"]) for h in rec["plan"]["heads"]])
            assert rec["cache"]["bytes_per_position"] > 0 and rec["head_scores"]
            metrics = v.load_json("metrics.json")["student"]
            assert metrics["loss/attn"] >= 0 and metrics["loss/feature"] >= 0
        assert len(heads) == 2 and heads[0] == heads[1] and len(heads[0]) == 2   # found once, kept


def test_an_all_masked_batch_gives_an_exact_zero_with_every_channel():
    teacher = tiny_model(seed=0, layers=3)
    student = _sliced(tiny_model(seed=4, layers=3), [0, 2])
    sp = _spec({"kd": 1.0, "attn": 1.0, "feature": 1.0}, norm_weight=0.1)
    setup = _setup(sp, teacher, student, {0: 0, 1: 2})
    obj = DistillObjective(sp, setup.provider(None, []), VOCAB, side=setup.student_channels())
    batch = _batch()
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    with setup.attached(student):
        out = obj(student, batch)
    assert out.n_tokens == 0 and float(out.total_sum.detach()) == 0.0 and out.terms["attn"] == 0.0
    assert out.terms["feature"] == 0.0


def test_a_reindexed_head_follows_its_map_and_a_missing_one_is_refused():
    teacher = tiny_model(seed=0, layers=3)
    student = _sliced(tiny_model(seed=4, layers=3), [0, 2])
    calib = torch.cat([s["input_ids"] for s in make_sequences(2, T=12, seed=9)])
    sp = LossSpec(channels={"kd": 1.0, "attn": 1.0}, attention={"heads": [[2, 3], [0, 1]]})
    # student layer 1 (teacher layer 2) holds the teacher's heads in reverse order (a re-indexed / pruned student)
    plan = make_plan(sp, teacher, student, {0: 0, 1: 2}, calib, mode="online", head_map={1: [3, 2, 1, 0]})
    assert [(p.student_layer, p.student_head) for p in plan.heads] == [(1, 0), (0, 1)]
    with pytest.raises(ConfigError, match=r"loss\.attention\.heads"):
        make_plan(sp.model_copy(update={"attention": sp.attention.model_copy(update={"heads": [(1, 0)]})}),
                  teacher, student, {0: 0, 1: 2}, calib, mode="online")
