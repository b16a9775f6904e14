"""Crash safety of the version commit: a real subprocess SIGKILLs itself at each step of the protocol, then
we check that readers see the old version or the new one, never a partial one, and that the next writer
cleans up and keeps going."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from distillgate.errors import ConfigError
from distillgate.store import COMMIT_STEPS, CRASH_ENV, RunStore

OLD = {"a.json": {"v": "old"}, "c.json": {"n": 1}}
NEW = {"a.json": {"v": "new"}, "c.json": {"n": 2}}
NEW_BIN = b"new weights " * 1000

WRITER = textwrap.dedent("""
    import sys
    from distillgate.store import RunStore
    root, binpath = sys.argv[1], sys.argv[2]
    s = RunStore.open(root, "r", writer=True)
    with s.begin_version(1, kind="candidate") as vw:
        vw.add_json("a.json", {"v": "new"})
        vw.add_file("b.bin", binpath)
        vw.add_json("c.json", {"n": 2})
        vid = vw.commit(aliases=("current",))
    print("COMMITTED", vid, flush=True)
""")


def _content(v) -> dict:
    return {n: (v.path_of(n).read_bytes() if n.endswith(".bin") else v.load_json(n)) for n in v.names()}


@pytest.fixture
def store_with_v1(tmp_path):
    root = tmp_path / "runs"
    s = RunStore.create(root, {"seed": 0}, run_id="r")
    with s.begin_version(0, kind="init") as vw:
        vw.add_json("a.json", OLD["a.json"])
        vw.add_json("c.json", OLD["c.json"])
        assert vw.commit() == 1
    s.close()
    binpath = tmp_path / "new.bin"
    binpath.write_bytes(NEW_BIN)
    return root, binpath


def _run_writer(root, binpath, crash_at: str | None):
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-c", WRITER, str(root), str(binpath)], env=env,
                          capture_output=True, text=True, timeout=60)


CRASH_POINTS = ["after_blob:1", "after_blob:2", "after_blob:3", "before_manifest", "after_manifest_tmp",
                "after_rename", "before_marker", "marker_uncommitted", "after_marker"]


def test_crash_points_cover_every_step():
    assert {p.split(":")[0] for p in CRASH_POINTS} == set(COMMIT_STEPS)


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_sigkill_during_commit_leaves_old_or_new_never_partial(store_with_v1, crash_at):
    root, binpath = store_with_v1
    proc = _run_writer(root, binpath, crash_at)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert "COMMITTED" not in proc.stdout

    committed = crash_at == "after_marker"
    with RunStore.open(root, "r", writer=False) as reader:  # a reader needs no cleanup to be right
        v = reader.latest_valid_version()
        assert v.version_id == (2 if committed else 1)
        assert _content(v) == ({**NEW, "b.bin": NEW_BIN} if committed else OLD)
        assert reader.aliases()["current"] == v.version_id  # the alias moved with the marker, or not at all
        assert [r["version_id"] for r in reader.versions()] == ([1, 2] if committed else [1])

    # the next writer gets the lock (the kernel freed it), cleans the leftovers and commits normally
    with RunStore.open(root, "r", writer=True) as w:
        assert list((root / "r" / "tmp").iterdir()) == []
        manifests = sorted(p.name for p in (root / "r" / "versions").iterdir())
        assert manifests == (["000001.json", "000002.json"] if committed else ["000001.json"])
        if crash_at in ("after_rename", "before_marker", "marker_uncommitted", "after_manifest_tmp"):
            assert any("interrupted commit" in a["message"] for a in w.catalog.alerts())
        with w.begin_version(2, kind="candidate") as vw:
            vw.add_json("a.json", {"v": "after crash"})
            vid = vw.commit()
        assert vid == (3 if committed else 2)
        assert w.latest_valid_version().load_json("a.json") == {"v": "after crash"}
        w.gc()  # blobs of the crashed commit are unreferenced unless it committed
        referenced = {e["sha256"] for r in w.versions() for e in w.get_version(r["version_id"]).files.values()}
        assert w.blobs.all_hashes() == referenced


def test_uncrashed_writer_commits(store_with_v1):
    root, binpath = store_with_v1
    proc = _run_writer(root, binpath, None)
    assert proc.returncode == 0 and "COMMITTED 2" in proc.stdout, proc.stderr[-2000:]


def test_garbage_files_do_not_break_readers_and_writer_cleans_them(store_with_v1):
    root, _ = store_with_v1
    run = root / "r"
    (run / "tmp" / "blob.xyz.tmp").write_bytes(b"half a blob")
    (run / "tmp" / "stray_dir").mkdir()
    (run / "versions" / ".000002.json.999.tmp").write_text('{"trunc')
    (run / "versions" / "000002.json").write_text('{"not": "committed"}')
    junk = run / "objects" / "sha256" / "ff" / ("0" * 62)
    junk.parent.mkdir()
    junk.write_bytes(b"orphan")
    with RunStore.open(root, "r") as reader:
        assert reader.latest_valid_version().version_id == 1
        assert _content(reader.latest_version()) == OLD
    with RunStore.open(root, "r", writer=True) as w:
        assert list((run / "tmp").iterdir()) == []
        assert sorted(p.name for p in (run / "versions").iterdir()) == ["000001.json"]
        assert w.gc() == (1, len(b"orphan"))
        assert _content(w.latest_valid_version()) == OLD


def test_in_process_failure_inside_marker_transaction_rolls_back(tmp_path):
    def hook(step):
        if step == "marker_uncommitted":
            raise RuntimeError("disk on fire")

    with RunStore.create(tmp_path, {}, run_id="r") as s:
        with s.begin_version(0) as vw:
            vw.add_json("x.json", 1)
            vw.commit()
        with pytest.raises(RuntimeError, match="disk on fire"):
            with s.begin_version(1, crash_hook=hook) as vw:
                vw.add_json("x.json", 2)
                vw.commit(aliases=("current", "best"))
        assert [r["version_id"] for r in s.versions()] == [1]
        assert s.aliases() == {"current": 1}
        assert not (tmp_path / "r" / "versions" / "000002.json").exists()
        with s.begin_version(1) as vw:  # the writer slot was released by the abort
            vw.add_json("x.json", 3)
            assert vw.commit() == 2


def test_bad_crash_env_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "after_lunch")
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        with pytest.raises(ConfigError, match="DISTILLGATE_CRASH_AT"):
            s.begin_version(0)
