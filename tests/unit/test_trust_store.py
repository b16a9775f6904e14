"""Issue 15, the run store under hostile conditions: a deleted lock file, read-only folders, a garbage catalog,
a corrupt shared blob, a full disk."""

from __future__ import annotations

import os

import pytest

from distillgate.errors import LockLostError
from distillgate.store import RunStore


def _commit(store, text: str, iteration: int = 0) -> int:
    with store.begin_version(iteration) as vw:
        vw.add_json("x.json", {"text": text})
        return vw.commit()


def test_deleted_lock_stops_the_first_writer_and_its_abort_keeps_the_second_writers_manifest(tmp_path):
    a = RunStore.create(tmp_path, {}, run_id="r")
    _commit(a, "a1")
    vw = a.begin_version(1)                           # A is writing version 2 ...
    vw.add_json("x.json", {"text": "a2"})
    os.unlink(tmp_path / "r" / "run.lock")            # ... when someone deletes the lock file
    b = RunStore.open(tmp_path, "r", writer=True)     # so a second writer gets in
    assert _commit(b, "b2", iteration=1) == 2
    with pytest.raises(LockLostError, match="deleted or replaced"):
        vw.commit()
    vw.abort()
    with pytest.raises(LockLostError):                # and every later write of A is refused too
        a.set_run_status("failed")
    a.close()
    v = b.get_version(2)
    v.verify(deep=True)                               # B's committed manifest survived A's abort
    assert v.load_json("x.json") == {"text": "b2"}
    b.close()


def test_replaced_lock_file_is_detected(tmp_path):
    a = RunStore.create(tmp_path, {}, run_id="r")
    lock = tmp_path / "r" / "run.lock"
    os.replace(lock, tmp_path / "old.lock")
    lock.write_text("")
    with pytest.raises(LockLostError, match="now inode"):
        _commit(a, "x")
    a.close()


# ---------------------------------------------------------------------------------------- read-only, garbage catalog
import contextlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from distillgate.cli import main  # noqa: E402
from distillgate.errors import ArtifactError  # noqa: E402


@contextlib.contextmanager
def _read_only(path):
    """``path`` read-only for this process: chmod for a normal user; a read-only bind mount for root (root
    ignores permission bits)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"root without a read-only bind mount: {r.stderr.decode()[:200]}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, tiny_teacher_dir):
    """One finished tiny loop run (root, run id); tests copy it before changing anything."""
    from distillgate import loop as loop_mod
    from distillgate.config import RunConfig, load_config

    base = tmp_path_factory.mktemp("looprun")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLGATE_HOME", str(base / "home"))
    over = [f"teacher.path={tiny_teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}", "data.max_new_tokens=8",
            "train.steps=1", "train.batch_size=2", "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8",
            "loop.prompts_per_iteration=4", "loop.heldout_prompts=2",
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]", "loop.perf_lengths=[8]",
            "loop.perf_repeats=1", f"store_root={base / 'runs'}", "run_id=r"]
    loop_mod.run(load_config(RunConfig, None, over), progress=False)
    yield base / "runs", "r"
    mp.undo()


def _copy(loop_run, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(loop_run[0], root)
    return root


def test_read_only_store_can_be_shown_and_reported(loop_run, tmp_path, capsys):
    root = _copy(loop_run, tmp_path)
    for p in root.rglob("catalog.sqlite-*"):  # a clean copy: no WAL index next to the catalog
        p.unlink()
    out = tmp_path / "elsewhere" / "report.html"
    out.parent.mkdir()
    with _read_only(root):
        assert main(["runs", "show", "r", "--root", str(root)]) == 0
        assert "versions" in capsys.readouterr().out
        assert main(["report", "r", "--root", str(root), "--out", str(out), "--no-param-diff"]) == 0
    assert out.stat().st_size > 1000


def test_garbage_catalog_is_a_typed_error_and_runs_repair_rebuilds_it(loop_run, tmp_path, capsys):
    root = _copy(loop_run, tmp_path)
    with RunStore.open(root, "r") as s:
        want = [(r["version_id"], r["iteration"], r["manifest_sha256"]) for r in s.versions()]
        cur = s.aliases()["current"]
    cat = root / "r" / "catalog.sqlite"
    for p in root.rglob("catalog.sqlite-*"):
        p.unlink()
    cat.write_bytes(os.urandom(8192))
    with pytest.raises(ArtifactError, match="not a readable run catalog.*runs repair r"):
        RunStore.open(root, "r")
    assert main(["runs", "show", "r", "--root", str(root)]) == 2
    assert "runs repair" in capsys.readouterr().err
    assert main(["runs", "repair", "r", "--root", str(root)]) == 0
    assert "catalog rebuilt from 2 version manifests (0 corrupt)" in capsys.readouterr().out
    with RunStore.open(root, "r") as s:
        assert [(r["version_id"], r["iteration"], r["manifest_sha256"]) for r in s.versions()] == want
        assert s.aliases()["current"] == cur
        assert s.config["teacher"]["path"]                       # the config came back from config.json
        assert s.catalog.metrics(cur)                            # and the loop's rows from the versions' JSON
        s.resolve("current").verify(deep=True)
    assert list((root / "r").glob("catalog.sqlite.damaged-*"))
    assert main(["run", "--resume", "r", "--root", str(root), "--no-report", "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------- corrupt shared blobs
def _flip(path):
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _shared_store(root, run_id="r"):
    """Versions 1-3 share the blob of tok.json (like student/tokenizer.json); each has its own weights."""
    s = RunStore.create(root, {}, run_id=run_id)
    for i in range(3):
        with s.begin_version(i) as vw:
            vw.add_json("tok.json", {"vocab": list(range(50))})
            vw.add_json("w.json", {"w": i})
            vw.commit()
    return s


def test_one_flipped_byte_in_a_shared_blob_is_reported_not_restarted(tmp_path):
    s = _shared_store(tmp_path)
    v = s.resolve("current")
    _flip(v.blobs.path(v.files["tok.json"]["sha256"]))
    s.close()
    s = RunStore.open(tmp_path, "r", writer=True)
    with pytest.raises(ArtifactError, match=r"none of its 3 versions verifies.*tok.json.*no good copy found"):
        s.resume_point()                              # before: ResumePoint(None, ...): restart at iteration 0
    assert {r["status"] for r in s.catalog.version_rows(status=None)} == {"corrupt"}
    # a good copy appears (another run holds the same blob): repaired, and every version is usable again
    _shared_store(tmp_path, "other").close()
    point = s.resume_point()
    assert point.version.version_id == 3 and point.next_iteration == 3
    assert {r["status"] for r in s.catalog.version_rows(status=None)} == {"committed"}
    assert any("repaired from a good copy" in a["message"] for a in s.catalog.alerts())
    assert s.rollback(version=1) == 4                 # old versions can be rolled back to again
    s.close()


def test_rewritten_blob_makes_corrupt_versions_usable_again(tmp_path):
    s = _shared_store(tmp_path)
    v = s.resolve("current")
    blob = v.blobs.path(v.files["tok.json"]["sha256"])
    good = blob.read_bytes()
    _flip(blob)
    assert s.latest_valid_version() is None           # every version marked corrupt
    with s.begin_version(3) as vw:                    # a later commit writes the same tokenizer: the blob is
        vw.add_json("tok.json", {"vocab": list(range(50))})  # re-admitted (repaired) ...
        vw.add_json("w.json", {"w": 3})
        vw.commit()
    assert blob.read_bytes() == good
    assert s.latest_valid_version().version_id == 4
    assert s.rollback(version=2) == 5                 # ... and version 2 is usable again
    assert s.catalog.version_row(2)["status"] == "committed"
    s.close()


def test_fallback_lineage_names_the_version_resumed_from(tmp_path):
    s = _shared_store(tmp_path)
    v3 = s.resolve("current")
    _flip(v3.blobs.path(v3.files["w.json"]["sha256"]))  # only version 3's own blob
    s.close()
    s = RunStore.open(tmp_path, "r", writer=True)
    point = s.resume_point()
    assert point.version.version_id == 2
    assert s.aliases()["current"] == 2
    with s.begin_version(2) as vw:
        vw.add_json("w.json", {"w": "2 again"})
        vid = vw.commit()
    assert s.catalog.version_row(vid)["parent"] == 2  # before: 3, the corrupt version
    s.close()


def test_loop_resume_after_a_flipped_tokenizer_blob(loop_run, tmp_path, tiny_teacher_dir, capsys):
    root = _copy(loop_run, tmp_path)
    with RunStore.open(root, "r") as s:
        v = s.resolve("current")
        blob = v.blobs.path(v.files["student/tokenizer.json"]["sha256"])
        n = len(s.versions())
    _flip(blob)
    rc = main(["run", "--resume", "r", "--root", str(root), "--no-report", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    with RunStore.open(root, "r") as s:  # the teacher folder holds the same tokenizer.json: the good copy
        assert any("repaired from a good copy" in a["message"] for a in s.catalog.alerts())
        assert len(s.versions()) == n and s.info()["status"] != "running"
        s.resolve("current").verify(deep=True)
