"""Issue 15, resume: a teacher swapped between a kill and ``--resume`` is refused (or recorded when allowed)."""

from __future__ import annotations

import shutil

import pytest

from distillgate import loop as loop_mod
from distillgate.cli import main
from distillgate.config import RunConfig, load_config
from distillgate.store import RunStore
from distillgate.testing import save_tiny_model


def _cfg(teacher_dir, root, **extra):
    over = [f"teacher.path={teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=8", "data.gen_batch_size=8", "train.steps=1", "train.batch_size=2",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=4",
            "loop.heldout_prompts=2", "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]",
            "loop.perf_lengths=[8]", "loop.perf_repeats=1", f"store_root={root}", "run_id=r"]
    over += [f"{k}={v}" for k, v in extra.items()]
    return load_config(RunConfig, None, over)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "dg-home"))


def test_resume_with_a_swapped_teacher_is_refused_unless_allowed(tmp_path, tiny_teacher_dir, tiny_tokenizer, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    root = tmp_path / "runs"
    loop_mod.run(_cfg(teacher, root), progress=False)
    with RunStore.open(root, "r") as s:
        n_versions = len(s.versions())
    # the teacher's weights change (a proper re-save: its manifest matches, so only the run can notice)
    shutil.rmtree(teacher)
    save_tiny_model(teacher, num_layers=4, hidden=32, intermediate=64, seed=7, tokenizer=tiny_tokenizer)
    args = ["run", "--resume", "r", "--root", str(root), "--no-report", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "teacher" in err and "changed since version" in err and "--allow-teacher-change" in err
    with RunStore.open(root, "r") as s:
        assert len(s.versions()) == n_versions                       # nothing was written
    assert main(args + ["--allow-teacher-change"]) == 0
    with RunStore.open(root, "r") as s:
        alerts = [a for a in s.catalog.alerts() if a["source"] == "resume"]
        assert alerts and "changed teacher" in alerts[0]["message"] and "weights fingerprint" in alerts[0]["message"]
