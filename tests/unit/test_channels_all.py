"""Every S2 channel on at once (kd, ce, attn, feature, clone, per-domain channel shares): gradient-accumulation
invariance (1 x 4 == 4 x 1) and bitwise resume on tiny models, and `distillgate run` from a config file with all
of them on (tiny teacher, the real offline MiniLM encoder for clone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillgate.config import LossSpec
from distillgate.data.dataset import collate
from distillgate.data.generate import Example
from distillgate.data.samples import build_clone_rows
from distillgate.losses.clone import CloneProvider
from distillgate.losses.objective import DistillObjective
from distillgate.train import StopTraining, train

from test_channels_attn_feature import _setup, _sliced, spec_
from test_clone import fake_encode
from test_train_support import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 2
SHARES = {"legal": {"kd": 0.5, "clone": 2.0, "attn": 1.5}, "medical": {"ce": 0.0, "feature": 0.25}}


def _examples(prompts=2, samples=2, seed=0):
    """``prompts`` x ``samples`` answers (a shared span and a span of their own, unequal lengths), two domains."""
    rng = np.random.default_rng(seed)
    texts = ["Revenue grew by twelve percent this quarter.", "Revenue grew twelve percent in the quarter.",
             "Costs stayed flat all year.", "Costs were flat this year."]
    exs = []
    for p in range(prompts):
        shared = rng.integers(4, VOCAB, 4).tolist()
        for s in range(samples):
            resp = shared[:2] + rng.integers(4, VOCAB, 1 + 2 * s + p).tolist() + shared[2:] + [EOT]
            prompt = [1, 10 + p, 11]
            exs.append(Example(id=f"p{p}/s{s}", prompt_id=f"p{p}", sample_idx=s, domain=["legal", "medical"][p % 2],
                               complexity=0.5, input_ids=prompt + resp,
                               loss_mask=[0] * len(prompt) + [1] * len(resp), response=texts[(2 * p + s) % 4]))
    return exs


def _spec():
    return LossSpec(channels={"kd": 1.0, "ce": 0.3, "attn": 1.0, "feature": 1.0, "clone": 0.5}, chunk_size=16,
                    attention={"key_heads": 2, "norm_weight": 0.1, "cache_top_k": 16},
                    feature={"cache_rank": 8, "gate_init": 0.2},
                    clone={"concise_ratio": 1.0, "coherence_min": -1.0}, domain_channel_shares=SHARES)


def _objective(exs, sp=None, student_seed=4):
    teacher = tiny_model(seed=0, layers=3)
    student = _sliced(tiny_model(seed=student_seed, layers=3), [0, 2])
    sp = sp or _spec()
    setup = _setup(sp, teacher, student, {0: 0, 1: 2})
    clone = CloneProvider(build_clone_rows(exs, sp.clone, fake_encode), EOT)
    obj = DistillObjective(sp, setup.provider(None, []), VOCAB, side=setup.student_channels(), clone=clone)
    return student, setup, obj


def _train(tmp, micro, exs, *, steps=2, stop=None, resume=False, student_seed=4):
    student, setup, obj = _objective(exs, student_seed=student_seed)
    def watch(info):
        if stop is not None and info.step == stop:
            raise StopTraining

    with setup.attached(student):
        train(student, obj, lambda e: micro, spec_(steps=steps, grad_accum=len(micro),
                                                   batch_size=micro[0]["input_ids"].shape[0],
                                                   checkpoint_every=1 if stop else 0),
              tmp, callbacks=[setup.on_step, watch], resume_from=tmp if resume else None, progress=False,
              tensorboard=False)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_all_channels_on_accumulation_invariant_and_bitwise_resume(tmp_path):
    exs = _examples()
    pad = 3
    student, setup, obj = _objective(exs)
    with setup.attached(student):       # every channel contributes (domain shares on): the checks are not vacuous
        out = obj(student, collate(exs, pad))
    assert {"kd", "ce", "attn", "feature", "clone", "clone_concise"} <= set(out.terms)
    assert all(out.terms[k] > 0 for k in ("kd", "ce", "attn", "feature", "clone", "clone_concise")), out.terms
    w_1x4 = _train(tmp_path / "a", [collate(exs, pad)], exs)
    w_4x1 = _train(tmp_path / "b", [collate([e], pad) for e in exs], exs)
    init = _sliced(tiny_model(seed=4, layers=3), [0, 2]).state_dict()
    assert max(float((w_1x4[k] - init[k]).abs().max()) for k in init) > 1e-4
    for k in w_1x4:
        torch.testing.assert_close(w_4x1[k], w_1x4[k], atol=2e-6, rtol=0)
    micro = [collate(exs[:2], pad), collate(exs[2:], pad)]          # one prompt (one domain) per micro-batch
    _train(tmp_path / "straight", micro, exs, steps=4)
    _train(tmp_path / "split", micro, exs, steps=4, stop=2)
    _train(tmp_path / "split", micro, exs, steps=4, resume=True, student_seed=9)   # weights come from the checkpoint
    a, b = tmp_path / "straight" / "checkpoints" / "step-00000004", tmp_path / "split" / "checkpoints" / "step-00000004"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tb = (json.loads((p / "trainer.json").read_text()) for p in (a, b))
    assert ta["history"]["loss"] == tb["history"]["loss"]


def test_domain_shares_reach_every_channel():
    """A channel's share in the batch's only domain scales that channel's part of the loss, linearly: the loss
    at share 0, 1 and 2 lies on a line with a non-zero slope, for each of the five channels."""
    exs = [e for e in _examples() if e.domain == "legal"]
    for ch in ("kd", "ce", "attn", "feature", "clone"):
        tot = []
        for share in (0.0, 1.0, 2.0):
            sp = _spec().model_copy(update={"domain_channel_shares": {"legal": {ch: share}}})
            student, setup, obj = _objective(exs, sp)
            with setup.attached(student):
                tot.append(float(obj(student, collate(exs, 3)).total_sum.detach()))
        assert tot[1] - tot[0] > 1e-2, (ch, tot)
        assert tot[2] - tot[1] == pytest.approx(tot[1] - tot[0], rel=2e-3), (ch, tot)


def test_run_from_a_config_with_every_channel_on(tiny_teacher_dir, tmp_path, monkeypatch):
    from distillgate.cli import main
    from distillgate.store import RunStore

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "all.yaml"
    cfg.write_text(
        f"teacher: {{path: {tiny_teacher_dir}}}\n"
        "student: {init: config, config: {num_hidden_layers: 1, intermediate_size: 32}}\n"
        "data: {samples_per_prompt: 2, gen_temperature: 1.0, max_new_tokens: 10, gen_batch_size: 8}\n"
        "train: {steps: 2, batch_size: 4, warmup_steps: 0, precision: fp32}\n"
        "targets: {top_k: 8}\n"
        "loss:\n"
        "  channels: {kd: 1.0, ce: 0.1, attn: 0.5, feature: 0.5, clone: 0.5}\n"
        "  attention: {key_heads: 2}\n"
        "  feature: {cache_rank: 8}\n"
        "  clone: {concise_ratio: 1.0}\n"
        "  domain_channel_shares: {legal: {clone: 2.0, attn: 0.5}, medical: {kd: 0.5, feature: 2.0}}\n"
        "loop:\n"
        "  prompts_per_iteration: 6\n"
        "  heldout_prompts: 3\n"
        "  stages: [{name: anchor, iterations: 0}, {name: joint, iterations: 1}]\n"
        "  perf_lengths: [16]\n"
        "  perf_repeats: 1\n"
        f"store_root: {tmp_path / 'runs'}\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    (run,) = RunStore.runs(tmp_path / "runs")
    with RunStore.open(tmp_path / "runs", run["run_id"]) as s:
        v = s.resolve("current")
        metrics = v.load_json("metrics.json")["student"]
        for ch in ("kd", "ce", "attn", "feature", "clone"):
            assert metrics[f"loss/{ch}"] > 0, (ch, metrics)
        assert "loss/clone_concise" in metrics
        rec = json.loads(v.path_of(next(n for n in v.files if n.startswith("channels"))).read_text())
        assert len(rec["plan"]["heads"]) == 2 and rec["cache"]["bytes_per_position"] > 0
        assert v.load_json("recipe.json")["loss"]["domain_channel_shares"]["legal"]["clone"] >= 2.0
