"""W3 placement: where the teacher and the student run, lowered precision / CPU offload when memory is short."""

import pytest
import torch

from distillgate import placement
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError, InputError
from distillgate.placement import HEADROOM, plan_teacher
from distillgate.report.from_store import placement_text

N = 1_000_000
F32 = int(N * 4 * HEADROOM)


def test_a_teacher_that_fits_stays_as_configured():
    p = plan_teacher("cpu", "float32", N, "auto", F32)
    assert (p.device, p.dtype, p.reason) == ("cpu", "float32", "as configured")
    assert plan_teacher("cpu", "float32", N, "auto", None).dtype == "float32"  # free memory unknown


def test_short_memory_lowers_precision_then_offloads(monkeypatch):
    p = plan_teacher("cuda:0", "float32", N, "auto", F32 - 1)
    assert (p.device, p.dtype) == ("cuda:0", "bfloat16") and p.reason.startswith("kept in bfloat16")
    monkeypatch.setattr(placement, "free_bytes", lambda d: 10 * F32)
    p = plan_teacher("cuda:0", "float32", N, "auto", F32 // 4)
    assert (p.device, p.dtype) == ("cpu", "float32") and "offloaded to the CPU" in p.reason
    assert p.requested_device == "cuda:0" and p.free_bytes == 10 * F32
    with pytest.raises(InputError, match="teacher.fit=auto"):
        plan_teacher("cuda:0", "float32", N, "strict", F32 - 1)
    with pytest.raises(InputError, match="even in bfloat16"):
        plan_teacher("cpu", "float32", N, "auto", F32 // 4)


def test_devices_are_validated_before_anything_loads():
    with pytest.raises(Exception, match="teacher.device"):
        load_config(RunConfig, None, ["teacher.device=tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="student.device.*CUDA is not available"):
            placement.resolve_device("cuda", "student.device")
    assert placement.resolve_device("cpu", "x") == "cpu"
    assert placement.resolve_device("auto", "x") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_the_loaded_teacher_records_where_it_went(tiny_teacher_dir, monkeypatch):
    from distillgate import pipeline

    from transformers import AutoConfig

    n = pipeline._param_count_from_config(AutoConfig.from_pretrained(tiny_teacher_dir))
    monkeypatch.setattr(placement, "free_bytes", lambda d: int(n * 4 * HEADROOM) - 1)  # float32 just does not fit
    cfg = load_config(RunConfig, None, [f"teacher.path={tiny_teacher_dir}"])
    t = pipeline.load_teacher(cfg)
    assert t.placement.dtype == "bfloat16" and next(t.model.parameters()).dtype == torch.bfloat16
    text = placement_text({"teacher": t.placement.to_json(), "student": {"device": "cpu", "dtype": "float32"},
                           "ranks": 2})
    assert text.startswith(" Ran on 2 rank(s): teacher on cpu (bfloat16, kept in bfloat16:") and \
        "student on cpu (float32)" in text


def test_batches_move_to_the_model_device():
    b = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "example_ids": ["a"]}
    assert placement.to_device(b, torch.device("cpu")) is b
