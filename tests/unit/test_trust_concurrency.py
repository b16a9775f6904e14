"""Issue 15, caches: runs started together on one empty cache home all finish, with a sequential run's weights.

Before the fix, teacher targets and profiles were check-then-write: the second of two runs computing the same
key died with ``targets/<key>: already exists (refusing to overwrite)`` (3 of 4 trials of three runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from distillgate.store import RunStore

CLI = "import sys; from distillgate.cli import main; sys.exit(main(sys.argv[1:]))"


def _args(teacher, root, run_id):
    return ["run", f"teacher.path={teacher}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}", "data.max_new_tokens=16",
            "data.gen_batch_size=8", "train.steps=1", "train.batch_size=2", "train.warmup_steps=0",
            "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=4", "loop.heldout_prompts=6",
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]", "loop.perf_lengths=[8]",
            "loop.perf_repeats=1", f"store_root={root}", f"run_id={run_id}", "--no-report", "--no-progress"]


def _env(home):
    env = dict(os.environ, DISTILLGATE_HOME=str(home), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
        sys.modules["distillgate"].__file__)), env.get("PYTHONPATH", "")] if p)
    return env


def _weights(root, run_id):
    with RunStore.open(root, run_id) as s:
        v = s.resolve("current")
        return {n: load_file(str(v.path_of(n))) for n in v.names("student/") if n.endswith(".safetensors")}


def _trials(teacher, tmp_path, trials):
    from distillgate.cli import main

    seq_home = tmp_path / "home-seq"                  # the sequential reference runs in this process
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLGATE_HOME", str(seq_home))
    try:
        assert main(_args(teacher, tmp_path / "seq", "s")) == 0
    finally:
        mp.undo()
    assert any((seq_home / "profiles").iterdir()) and any((seq_home / "targets").iterdir())  # the caches raced for
    want = _weights(tmp_path / "seq", "s")
    for t in range(trials):
        home, root = tmp_path / f"home-{t}", tmp_path / f"runs-{t}"
        procs = [subprocess.Popen([sys.executable, "-c", CLI, *_args(teacher, root, f"c{i}")], env=_env(home),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(3)]
        errs = [p.communicate(timeout=600)[1] for p in procs]
        for p, err in zip(procs, errs):
            assert p.returncode == 0, f"trial {t}: {err[-2000:]}"
        for i in range(3):
            got = _weights(root, f"c{i}")
            assert got.keys() == want.keys()
            for f in want:
                assert got[f].keys() == want[f].keys()
                assert all(bool((got[f][k] == want[f][k]).all()) for k in want[f]), f"trial {t} c{i}: {f} differs"


def _publish(args):
    """One process: build a cache folder for ``key`` and publish it (all of them start at the same moment)."""
    final, barrier_file, i = args
    import time as _time

    from distillgate.io import atomic_dir

    while not os.path.exists(barrier_file):
        _time.sleep(0.001)
    with atomic_dir(final, kind="cache", format_version=1, meta={"writer": i}, exist_ok=True) as tmp:
        (tmp / "data.bin").write_bytes(b"same content" * 1000)
        _time.sleep(0.05)                              # widen the race: everyone is past the existence check
    return i


def test_concurrent_publishers_of_one_cache_key_all_succeed(tmp_path):
    import multiprocessing as mpc

    from distillgate.io import verify_manifest

    for trial in range(5):
        final, go = tmp_path / f"key-{trial}", tmp_path / f"go-{trial}"
        with mpc.get_context("fork").Pool(4) as pool:
            res = pool.map_async(_publish, [(final, go, i) for i in range(4)])
            go.write_text("")
            assert sorted(res.get(timeout=60)) == [0, 1, 2, 3]    # before: 3 of them "already exists"
        verify_manifest(final, kind="cache")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".key-{trial}")]  # no temp left


def test_three_concurrent_runs_on_one_empty_cache_home(tiny_teacher_dir, tmp_path):
    _trials(tiny_teacher_dir, tmp_path, trials=1)


@pytest.mark.slow
def test_three_concurrent_runs_ten_trials(tiny_teacher_dir, tmp_path):
    _trials(tiny_teacher_dir, tmp_path, trials=10)
