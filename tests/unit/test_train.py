"""Trainer: schedule, accumulation invariance, bitwise resume, corruption fallback, NaN skip/rollback,
metrics, bf16 autocast. Tiny models (2 layers, hidden 32) on CPU, one thread."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillgate.errors import ArtifactError, ConfigError
from distillgate.train import (
    NonFiniteError, StopTraining, lr_factor, list_checkpoints, load_checkpoint, read_metrics, train,
)
from distillgate.train.state import optimizer_from_parts, optimizer_to_parts

from test_train_support import (
    EpochBatches, TinyLM, ce_loss, collate, make_sequences, noisy_ce, spec, tiny_model,
)

HERE = Path(__file__).parent


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- schedule

def test_schedule_values_pinned():
    got = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    want = [0.5, 1.0, 1.0, 0.955436, 0.83057, 0.650134, 0.449866, 0.26943, 0.144564, 0.1]
    assert got == pytest.approx(want, abs=1e-6)
    # float64 reference of the cosine leg: min + (1-min) * (1 + cos(pi * p)) / 2, p = (s-2)/7
    for s in range(2, 10):
        ref = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 7))
        assert lr_factor(s, 10, 2, 0.1) == pytest.approx(ref, rel=1e-12)
    assert [lr_factor(s, 4, 0, 0.0) for s in range(4)] == pytest.approx([1.0, 0.75, 0.25, 0.0])
    assert lr_factor(0, 1, 0, 0.3) == 1.0 and lr_factor(5, 3, 8, 0.0) == pytest.approx(6 / 8)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        lr_factor(0, 10, 2, 1.5)


# ------------------------------------------------------------------------------------------ accumulation

def _one_step(seqs_per_micro: list[list[dict]], out, lr=1e-3, steps=2) -> dict:
    model = tiny_model()
    batches = [collate(s) for s in seqs_per_micro]
    sp = spec(steps=steps, batch_size=len(seqs_per_micro[0]), grad_accum=len(batches) // 1, lr=lr,
              warmup_steps=0, max_grad_norm=1e9)
    # same 4 sequences every step: the window is the whole epoch
    train(model, ce_loss, lambda epoch: batches, sp, out, progress=False, tensorboard=False)
    return _weights(model)


def test_grad_accum_invariance_1x4_vs_4x1(tmp_path):
    seqs = make_sequences(4, seed=3)
    counts = [int(s["loss_mask"][:, 1:].sum()) for s in seqs]
    assert len(set(counts)) > 2, counts  # unequal token counts per micro-batch: the case that matters
    w_1x4 = _one_step([seqs], tmp_path / "a")
    w_4x1 = _one_step([[s] for s in seqs], tmp_path / "b")
    w_2x2 = _one_step([seqs[:2], seqs[2:]], tmp_path / "c")
    for k in w_1x4:
        torch.testing.assert_close(w_4x1[k], w_1x4[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(w_2x2[k], w_1x4[k], atol=1e-6, rtol=0)
    # the weights moved (an invariance that holds because nothing happened would prove nothing)
    init = _weights(tiny_model())
    assert max((w_1x4[k] - init[k]).abs().max() for k in init) > 1e-4


# ---------------------------------------------------------------------------------------------- resume

def _stop_at(step):
    def cb(info):
        if info.step == step:
            raise StopTraining
    return cb


def _straight_and_split(tmp_path, make_model, precision, fresh_process):
    """6 steps straight vs 3 steps, stop, resume (fresh process or fresh model object), 3 steps.

    5 micro-batches/epoch with grad_accum=2 -> windows straddle epochs; the loss draws torch/python/numpy
    randomness (and TinyLM has dropout), so the RNG restore matters."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    sp = spec(steps=6, precision=precision)
    train(make_model(), noisy_ce, EpochBatches(), sp, straight, progress=False, tensorboard=False)
    r = train(make_model(), noisy_ce, EpochBatches(), sp, split, callbacks=[_stop_at(3)], progress=False,
              tensorboard=False)
    assert r.stopped_early and [p.name for p in list_checkpoints(split / "checkpoints")] == ["step-00000003"]
    if fresh_process:
        env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
        sub = subprocess.run([sys.executable, str(HERE / "test_train_support.py"), str(split), "6"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr[-3000:]
    else:
        train(make_model(seed=5), noisy_ce, EpochBatches(), sp, split, resume_from=split, progress=False,
              tensorboard=False)
    a, b = straight / "checkpoints" / "step-00000006", split / "checkpoints" / "step-00000006"
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "scheduler.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tb = json.loads((a / "trainer.json").read_text()), json.loads((b / "trainer.json").read_text())
    assert ta["history"]["loss"] == tb["history"]["loss"]
    assert (ta["epoch"], ta["index"], ta["tokens"]) == (tb["epoch"], tb["index"], tb["tokens"])
    assert (ta["epoch"], ta["index"]) == (2, 2)  # 12 micro-batches = 5 + 5 + 2
    # metrics.jsonl of the split run: one record per step, no duplicates
    assert [x["step"] for x in read_metrics(split / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_in_fresh_process_is_bitwise_identical(tmp_path):
    _straight_and_split(tmp_path, lambda seed=0: TinyLM(seed=seed), "fp32", fresh_process=True)


def test_resume_bf16_llama_is_bitwise_identical(tmp_path):
    _straight_and_split(tmp_path, lambda seed=0: tiny_model(seed=seed), "bf16", fresh_process=False)


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path):
    out = tmp_path / "run"
    train(tiny_model(), ce_loss, EpochBatches(), spec(steps=4, checkpoint_every=2), out, progress=False,
          tensorboard=False)
    ck2, ck4 = list_checkpoints(out / "checkpoints")
    good = (ck4 / "model.safetensors").read_bytes()
    raw = bytearray(good)
    raw[-5] ^= 0xFF  # flip one byte of a weight
    (ck4 / "model.safetensors").write_bytes(bytes(raw))
    model = tiny_model(seed=7)
    before = _weights(model)
    with pytest.raises(ArtifactError, match="model.safetensors: sha256 mismatch"):
        load_checkpoint(ck4, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched on failure
    r = train(model, ce_loss, EpochBatches(), spec(steps=4, checkpoint_every=2), out, resume_from=ck4,
              progress=False, tensorboard=False)
    kinds = [e["event"] for e in r.events]
    assert "checkpoint_fallback" in kinds and r.events[-1]["path"].endswith("step-00000002")
    # redoing steps 3-4 from step 2 reproduces the original step-4 weights exactly
    assert (ck4 / "model.safetensors").read_bytes() == good
    with pytest.raises(ArtifactError, match="earlier run; pass resume_from"):  # no silent mixing of runs
        train(tiny_model(), ce_loss, EpochBatches(), spec(steps=4), out, progress=False, tensorboard=False)


# ------------------------------------------------------------------------------------------- non-finite

class Poisoned:
    """Wraps a loss: NaN loss on the given 1-based optimizer steps (grad_accum=1), or NaN gradients."""

    def __init__(self, nan_steps=(), nan_grad_steps=()):
        self.nan_steps, self.nan_grad_steps, self.calls = set(nan_steps), set(nan_grad_steps), 0

    def __call__(self, model, batch):
        self.calls += 1
        out = ce_loss(model, batch)
        if self.calls in self.nan_steps:
            out.total_sum = out.total_sum * float("nan")
        if self.calls in self.nan_grad_steps:
            out.total_sum.register_hook(lambda g: g * float("inf"))
        return out


def _capture():
    seen = {}

    def cb(info):
        seen[info.step] = (info.skipped, info.lr, _weights_of(cb.model))
    return seen, cb


def _weights_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_nan_loss_and_nan_grad_steps_are_skipped(tmp_path):
    model = tiny_model()
    seen, cb = _capture()
    cb.model = model
    r = train(model, Poisoned(nan_steps=[3], nan_grad_steps=[5]), EpochBatches(), spec(steps=6, grad_accum=1),
              tmp_path, callbacks=[cb], progress=False, tensorboard=False)
    assert r.skipped_steps == 2 and r.rollbacks == 0
    reasons = [e["reason"] for e in r.events if e["event"] == "skip"]
    assert reasons[0].startswith("non-finite loss") and reasons[1].startswith("non-finite gradient norm")
    for s in (3, 5):  # no update on a skipped step
        assert seen[s][0] and all(torch.equal(seen[s][2][k], seen[s - 1][2][k]) for k in seen[s][2])
    assert not all(torch.equal(seen[4][2][k], seen[3][2][k]) for k in seen[4][2])  # training went on
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [x["skipped"] for x in recs] == [False, False, True, False, True, False]


def test_repeated_nan_rolls_back_and_halves_lr(tmp_path):
    model = tiny_model()
    seen, cb = _capture()
    cb.model = model
    sp = spec(steps=7, grad_accum=1, checkpoint_every=2, warmup_steps=0)
    r = train(model, Poisoned(nan_steps=[3, 4, 5]), EpochBatches(), sp, tmp_path, callbacks=[cb],
              progress=False, tensorboard=False)
    assert r.rollbacks == 1 and r.skipped_steps == 3
    rb = [e for e in r.events if e["event"] == "rollback"][0]
    # the newest checkpoint (step 4, written mid-streak) holds the last good weights: those after step 2
    assert rb["step"] == 5 and rb["restored"].endswith("step-00000004") and rb["lr_scale"] == 0.5
    assert all(torch.equal(seen[5][2][k], seen[2][2][k]) for k in seen[2][2])
    assert not all(torch.equal(seen[5][2][k], seen[1][2][k]) for k in seen[2][2])
    assert seen[6][1] == pytest.approx(0.5 * sp.lr * lr_factor(5, 7, 0, sp.min_lr_ratio))
    assert r.final_loss == r.final_loss and all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_rollback_without_checkpoint_uses_start_state_and_raise_mode(tmp_path):
    model = tiny_model()
    init = _weights_of(model)
    seen, cb = _capture()
    cb.model = model
    r = train(model, Poisoned(nan_steps=[2, 3]), EpochBatches(), spec(steps=3, grad_accum=1), tmp_path / "a",
              callbacks=[cb], max_consecutive_nonfinite=2, progress=False, tensorboard=False)
    assert r.rollbacks == 1 and r.events[-1]["restored"] == "start of this run"
    assert all(torch.equal(seen[3][2][k], init[k]) for k in init)
    assert not list((tmp_path / "a").glob("rollback-start*"))          # the on-disk start snapshot is removed
    with pytest.raises(NonFiniteError, match="step 2: non-finite loss"):
        train(tiny_model(), Poisoned(nan_steps=[2]), EpochBatches(), spec(steps=3, grad_accum=1), tmp_path / "b",
              on_nonfinite="raise", progress=False, tensorboard=False)
    assert not (tmp_path / "b" / "checkpoints").exists()


# --------------------------------------------------------------------------------- metrics, bf16, state

def test_metrics_jsonl_has_every_term_and_tensorboard(tmp_path):
    r = train(tiny_model(), ce_loss, EpochBatches(), spec(steps=4, log_every=2), tmp_path, progress=False)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in recs] == [2, 4]
    for x in recs:
        assert set(x["terms"]) == {"ce", "entropy"} and all(math.isfinite(v) for v in x["terms"].values())
        for key in ("lr", "loss", "grad_norm", "loss_tokens_per_s", "input_tokens_per_s", "seconds", "skipped"):
            assert key in x
        assert x["loss_tokens"] < x["input_tokens"]
    assert recs[-1]["loss"] == pytest.approx(r.final_loss) and set(r.final_terms) == {"ce", "entropy"}
    src = EpochBatches()  # 4 steps x 2 micro-batches = all 5 of epoch 0 + the first 3 of epoch 1
    used = src.batches(0) + src.batches(1)[:3]
    assert r.tokens == sum(int(b["loss_mask"][:, 1:].sum()) for b in used)
    assert r.input_tokens == sum(int(b["attention_mask"].sum()) for b in used)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert r.peak_rss_mb > 50 and r.tokens_per_s > 0


def test_bf16_autocast_path_runs_finite(tmp_path):
    dtypes = []

    def loss(model, batch):
        dtypes.append(model(input_ids=batch["input_ids"][:, :4]).logits.dtype)
        return ce_loss(model, batch)
    model = tiny_model()
    r = train(model, loss, EpochBatches(), spec(steps=2, precision="bf16"), tmp_path, progress=False,
              tensorboard=False)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert math.isfinite(r.final_loss) and r.skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_optimizer_state_round_trip_is_exact():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    ce_loss(model, collate(make_sequences(2))).total_sum.backward()
    opt.step()
    tensors, meta = optimizer_to_parts(opt)
    json.dumps(meta)  # JSON-able, no pickle
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    optimizer_from_parts(opt2, tensors, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_token_counting_counts_prediction_positions():
    from distillgate.train.cursor import loss_token_count

    b = {"loss_mask": torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]])}
    assert loss_token_count(b) == 4  # [:, 1:]: position 0 is never a prediction target
    from distillgate.errors import InputError
    with pytest.raises(InputError, match="loss_mask"):
        loss_token_count({"input_ids": torch.zeros(1, 3)})


def test_progress_summary_table_lists_terms(tmp_path, capfd):
    train(tiny_model(), ce_loss, EpochBatches(), spec(steps=1), tmp_path, progress=True, tensorboard=False)
    err = capfd.readouterr().err
    assert "training summary" in err and "final ce" in err and "final entropy" in err
    train(tiny_model(), ce_loss, EpochBatches(), spec(steps=1), tmp_path / "quiet", progress=None,
          tensorboard=False)  # not a TTY under pytest: no bar, no table
    assert "training summary" not in capfd.readouterr().err
