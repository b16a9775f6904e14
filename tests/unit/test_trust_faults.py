"""Issue 15, faults: a file-size limit (RLIMIT_FSIZE, the portable stand-in for a full disk) during a commit or a
checkpoint, and SIGTERM, each end in one typed line and exit status, with the run's statuses recorded; resuming
afterwards gives the uninterrupted run's weights."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from distillgate.cli import main
from distillgate.store import RunStore
from distillgate.testing import make_tiny_tokenizer, save_tiny_model

CLI = "import sys; from distillgate.cli import main; sys.exit(main(sys.argv[1:]))"


def _args(teacher, root, run_id="r"):
    return ["run", f"teacher.path={teacher}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}", "data.max_new_tokens=8",
            "train.steps=1", "train.batch_size=2", "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8",
            "loop.prompts_per_iteration=4", "loop.heldout_prompts=2",
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]", "loop.perf_lengths=[8]",
            "loop.perf_repeats=1", f"store_root={root}", f"run_id={run_id}", "--no-report", "--no-progress"]


def _env(home):
    src = os.path.dirname(os.path.dirname(sys.modules["distillgate"].__file__))
    return dict(os.environ, DISTILLGATE_HOME=str(home), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH", "")] if p))


def _weights(root, run_id="r"):
    with RunStore.open(root, run_id) as s:
        v = s.resolve("current")
        return {n: load_file(str(v.path_of(n))) for n in v.names("student/") if n.endswith(".safetensors")}


def _same(a, b):
    return a.keys() == b.keys() and all(a[f].keys() == b[f].keys() and all(bool((a[f][k] == b[f][k]).all())
                                                                           for k in a[f]) for f in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A teacher whose 1-layer student weighs ~445 KB (optimizer state ~0.9 MB), and its uninterrupted run."""
    base = tmp_path_factory.mktemp("faults")
    teacher = save_tiny_model(base / "teacher", num_layers=4, hidden=128, intermediate=512, seed=0,
                              tokenizer=make_tiny_tokenizer())
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLGATE_HOME", str(base / "home-ref"))
    assert main(_args(teacher, base / "ref")) == 0
    mp.undo()
    return teacher, _weights(base / "ref")


def _limited(args, home, limit):
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-c", CLI, *args], env=_env(home), capture_output=True, text=True,
                          preexec_fn=cap, timeout=300)


@pytest.mark.parametrize("where,limit,failed_phase", [("commit", 300_000, "commit"), ("checkpoint", 800_000, "map")])
def test_file_size_limit_is_one_line_with_statuses_and_resume_gives_the_uninterrupted_weights(
        where, limit, failed_phase, reference, tmp_path, monkeypatch):
    teacher, want = reference
    root, home = tmp_path / "runs", tmp_path / "home"
    r = _limited(_args(teacher, root), home, limit)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "could not write: file too large" in errors[0] and "(EFBIG)" in errors[0], errors
    assert ("student" if where == "commit" else "checkpoints/step-") in errors[0]
    with RunStore.open(root, "r") as s:
        assert s.info()["status"] == "failed"
        its = s.catalog.iterations()
        assert not [i for i in its if i["status"] == "running"]       # before: `running` forever
        assert its[-1]["status"] == "failed"
        if failed_phase == "map":
            assert its[-1]["phases"]["map"]["status"] == "failed"
    monkeypatch.setenv("DISTILLGATE_HOME", str(home))
    assert main(["run", "--resume", "r", "--root", str(root), "--no-report", "--no-progress"]) == 0
    assert _same(_weights(root), want)


def test_sigterm_stops_like_sigint_and_records_the_run_status(reference, tmp_path, monkeypatch):
    teacher, want = reference
    root, home = tmp_path / "runs", tmp_path / "home"
    p = subprocess.Popen([sys.executable, "-c", CLI, *_args(teacher, root)], env=_env(home),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (root / "r" / "catalog.sqlite").exists():
            time.sleep(0.05)
        time.sleep(0.5)                                # inside the loop (setup or iteration 0)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143 and "terminated (SIGTERM)" in err, err[-2000:]
    with RunStore.open(root, "r") as s:
        assert s.info()["status"] == "interrupted"     # SIGTERM and Ctrl-C: interrupted, not `running` nor `failed`
        assert not [i for i in s.catalog.iterations() if i["status"] == "running"]
    monkeypatch.setenv("DISTILLGATE_HOME", str(home))
    assert main(["run", "--resume", "r", "--root", str(root), "--no-report", "--no-progress"]) == 0
    assert _same(_weights(root), want)


def test_enospc_on_a_small_tmpfs_is_one_line_with_statuses_and_resume_gives_the_uninterrupted_weights(
        reference, tmp_path, monkeypatch, capsys):
    """A real full disk: the run store on a 500 KB tmpfs (root only; elsewhere RLIMIT_FSIZE above stands in)."""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE tests cover the same path")
    teacher, want = reference
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode()[:200]}")
    try:
        monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))  # caches on the big disk
        assert main(_args(teacher, small / "runs")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on the device (ENOSPC)" in errors[0], err[-5:]
        with RunStore.open(small / "runs", "r") as s:
            assert s.info()["status"] == "failed"
            assert not [i for i in s.catalog.iterations() if i["status"] == "running"]
        shutil.copytree(small / "runs", tmp_path / "runs")           # the disk is "freed": resume elsewhere
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert main(["run", "--resume", "r", "--root", str(tmp_path / "runs"), "--no-report", "--no-progress"]) == 0
    assert _same(_weights(tmp_path / "runs"), want)
