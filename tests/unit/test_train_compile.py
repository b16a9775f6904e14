"""train.compile: mode resolution, the compile cache location, the trainer wiring (aot_eager backend: the same
dynamo/AOTAutograd path without a C++ build, fast), bitwise resume with compile on, and -- slow, needs g++ --
inductor's loss and gradients against eager on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from distillgate.config import TrainSpec
from distillgate.errors import ConfigError
from distillgate.train import list_checkpoints, read_metrics, train
from distillgate.train import compile as tc

from distillgate.train import StopTraining
from test_train_support import EpochBatches, ce_loss, spec, tiny_model


def _no_compiler(monkeypatch):
    monkeypatch.setattr(tc.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)


def test_resolve_compile_modes(monkeypatch):
    cpu = torch.device("cpu")
    assert tc.resolve_compile("off", cpu, 10_000) == (False, "train.compile: off")
    monkeypatch.setattr(tc.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert tc.resolve_compile("on", cpu, 1)[0]
    assert not tc.resolve_compile("auto", cpu, tc.AUTO_MIN_STEPS - 1)[0]       # short CPU run: stays eager
    assert tc.resolve_compile("auto", cpu, tc.AUTO_MIN_STEPS)[0]
    _no_compiler(monkeypatch)
    with pytest.raises(ConfigError, match="train.compile.*C\\+\\+ compiler"):
        tc.resolve_compile("on", cpu, 10)
    enabled, why = tc.resolve_compile("auto", cpu, 10_000)
    assert not enabled and "C++ compiler" in why
    with pytest.raises(ConfigError, match="train.compile"):
        tc.resolve_compile("max", cpu, 10)
    with pytest.raises(ValueError, match="compile"):
        TrainSpec(compile="yes")


def test_compile_cache_dir_is_keyed_by_torch_version(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path))
    assert tc.compile_cache_dir() == tmp_path / "compile" / f"torch-{torch.__version__}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))   # the user's choice wins
    assert tc.compile_cache_dir() == tmp_path / "mine"


def test_decoder_layers_found_and_missing():
    m = tiny_model()
    assert tc.decoder_layers(m) is m.model.layers
    with pytest.raises(ConfigError, match="train.compile"):
        tc.decoder_layers(torch.nn.Linear(2, 2))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_compiles_layers_reports_compile_time_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "BACKEND", "aot_eager")
    eager, comp = tiny_model(), tiny_model()
    r0 = train(eager, ce_loss, EpochBatches(), spec(steps=3), tmp_path / "eager", progress=False, tensorboard=False)
    seen = []
    r1 = train(comp, ce_loss, EpochBatches(), spec(steps=3, compile="on"), tmp_path / "comp",
               callbacks=[lambda info: seen.append(comp.model.layers[0]._compiled_call_impl is not None)],
               progress=False, tensorboard=False)
    assert seen == [True, True, True] and not r0.compiled and r1.compiled
    assert all(layer._compiled_call_impl is None for layer in comp.model.layers)   # eager again after training
    assert r1.compile_seconds > 0 and r0.compile_seconds == 0
    recs = read_metrics(tmp_path / "comp" / "metrics.jsonl")
    assert recs[0]["compile_s"] > 0 and sum(r["compile_s"] for r in recs) == pytest.approx(r1.compile_seconds)
    assert recs[0]["seconds"] < recs[0]["compile_s"] + 60          # step seconds exclude the compile
    a, b = _weights(eager), _weights(comp)
    assert list(a) == list(b)                                      # same state-dict names (checkpoints unchanged)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    assert r1.final_loss == pytest.approx(r0.final_loss, rel=1e-5)


def test_resume_with_compile_on_is_bitwise(tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "BACKEND", "aot_eager")

    def stop_at(step):
        def cb(info):
            if info.step == step:
                raise StopTraining
        return cb

    sp = spec(steps=4, compile="on")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(tiny_model(), ce_loss, EpochBatches(), sp, straight, progress=False, tensorboard=False).compiled
    train(tiny_model(), ce_loss, EpochBatches(), sp, split, callbacks=[stop_at(2)], progress=False,
          tensorboard=False)
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["step-00000002"]
    train(tiny_model(seed=5), ce_loss, EpochBatches(), sp, split, resume_from=split, progress=False,
          tensorboard=False)
    a, b = straight / "checkpoints" / "step-00000004", split / "checkpoints" / "step-00000004"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "trainer.json").read_text())["history"]["loss"] == \
        json.loads((b / "trainer.json").read_text())["history"]["loss"]


@pytest.mark.slow
@pytest.mark.skipif(tc.cxx_compiler() is None, reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_loss_and_gradients_match_eager(tmp_path, monkeypatch):
    """The real backend (a cold compile: ~2 min on a loaded 2-core CPU, hence slow): loss and every gradient of
    the compiled student equal eager's within float32 tolerance; one fused-loss-free CE on a tiny Llama."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 16), generator=g)
    eager, comp = tiny_model(), tiny_model()
    info = tc.compile_layers(comp, "on", 1)
    assert info.enabled and info.layers == 2 and info.cache_dir == str(tmp_path / "inductor")
    losses = []
    for m in (eager, comp):
        logits = m(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert any((tmp_path / "inductor").rglob("*")), "nothing written to the compile cache"
    tc.uncompile(info)


def _online_objective(teacher):
    from distillgate.config import LossSpec
    from distillgate.losses.objective import DistillObjective
    from distillgate.targets import OnlineTeacher

    return DistillObjective(LossSpec(divergence="forward_kl", channels={"kd": 1.0, "ce": 0.5}), OnlineTeacher(teacher),
                            vocab_size=teacher.config.vocab_size)


def test_online_teacher_compiles_with_the_student_and_matches_eager(tmp_path, monkeypatch):
    """train.compile: on with an online teacher: its decoder layers run compiled (inference graph, under no_grad)
    during training, eager again after; the trained weights equal the eager run's within fp32 tolerance."""
    monkeypatch.setattr(tc, "BACKEND", "aot_eager")
    teacher = tiny_model(seed=3, layers=3)
    seen = []

    def probe(info):
        seen.append((comp.model.layers[0]._compiled_call_impl is not None,
                     teacher.model.layers[0]._compiled_call_impl is not None))

    eager, comp = tiny_model(), tiny_model()
    r0 = train(eager, _online_objective(teacher), EpochBatches(), spec(steps=3), tmp_path / "eager", progress=False,
               tensorboard=False)
    assert not r0.teacher_compiled
    r1 = train(comp, _online_objective(teacher), EpochBatches(), spec(steps=3, compile="on"), tmp_path / "comp",
               callbacks=[probe], progress=False, tensorboard=False)
    assert seen == [(True, True)] * 3 and r1.compiled and r1.teacher_compiled
    assert all(layer._compiled_call_impl is None for layer in teacher.model.layers)    # eager again after
    assert all(p.grad is None for p in teacher.parameters())                        # the teacher never trains
    a, b = _weights(eager), _weights(comp)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    assert r1.final_loss == pytest.approx(r0.final_loss, rel=1e-5)


def test_online_teacher_compile_follows_the_student(monkeypatch):
    """The teacher compiles only when the student does (auto's rule is the student's); cached targets and a
    loss without an online teacher compile nothing; a teacher device without a compiler stays eager."""
    teacher = tiny_model(seed=3)
    obj = _online_objective(teacher)
    off = tc.CompileInfo(False, "train.compile: off")
    assert not tc.compile_online_teacher(obj, off, "off", 10).enabled
    assert not tc.compile_online_teacher(ce_loss, tc.CompileInfo(True, "on"), "on", 10).enabled
    on = tc.compile_online_teacher(obj, tc.CompileInfo(True, "on"), "auto", tc.AUTO_MIN_STEPS, backend="aot_eager")
    assert on.enabled and on.layers == 2
    tc.uncompile(on)
    _no_compiler(monkeypatch)
    info = tc.compile_online_teacher(obj, tc.CompileInfo(True, "on"), "on", 10)    # inductor, no g++: eager
    assert not info.enabled and "C++ compiler" in info.reason
    assert all(layer._compiled_call_impl is None for layer in teacher.model.layers)
