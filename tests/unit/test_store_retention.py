"""Store retention (issue 13 part 5): the policy (what is kept and why), its validation, `distillgate runs gc`,
and crash safety of the purge: a real subprocess SIGKILLs itself at each purge step, then `runs show`, rollback,
resume, catalog repair and the next gc all accept the store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from distillgate.cli import main
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError
from distillgate.store import CRASH_ENV, RunStore
from distillgate.store.repair import rebuild_catalog
from distillgate.store.versions import GC_STEPS


def _gate(passed: bool, gate: str = "G-C1") -> dict:
    return {"gate": gate, "passed": passed, "value": 1.0, "threshold": 2.0, "dimension": "capability"}


def _v(s, it, weights: bytes, aliases=("current",), loop_state=None) -> int:
    with s.begin_version(it, kind="iteration") as vw:
        vw.add_file("student/model.safetensors", _bin(s, weights), check_finite=False)
        vw.add_json("student/tokenizer.json", {"vocab": 17})       # identical in every version: one blob
        vw.add_json("loop_state.json", loop_state or {})
        return vw.commit(aliases=aliases)


def _bin(s, data: bytes):
    p = s.dir / "work" / "w.bin"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def _make(root):
    """v1..v8 (iterations 0..7): v2, v4 stable; v3 gates all pass; v1 best; v8 current names v2 as last good."""
    with RunStore.create(root, {"store": {"retention": {"keep_last": 2}}}, run_id="r") as s:
        ids = []
        for it in range(8):
            state = {"last_good": {"iteration": 1, "version": 2, "recipe": {}}} if it == 7 else None
            ids.append(_v(s, it, f"weights {it}".encode() * 500, loop_state=state,
                          aliases=("current", "stable") if it in (1, 3) else ("current",)))
        s.set_alias("best", ids[0])
        s.record_gates(ids[2], [_gate(True)])
        s.record_gates(ids[4], [_gate(True), _gate(False, "G-C2")])
        s.record_metrics(ids[5], {"kl": 0.5})
    return ids


def test_plan_keeps_recent_aliases_stable_gates_rollback_targets_and_loop_state(tmp_path):
    ids = _make(tmp_path)
    with RunStore.open(tmp_path, "r", writer=True) as s:
        plan = s.retention_plan(keep_last=2)
        assert plan["prune"] == [5, 6]                  # v5 (a failing gate) and v6 (metrics only)
        why = {v: " ".join(r) for v, r in plan["keep"].items()}
        assert "alias best" in why[1] and "loop state last_good" in why[2] and "gates all passed" in why[3]
        assert "last 3 stable" in why[4] and "newest 2" in why[7] and "alias current" in why[8]
        assert s.retention_plan(2, keep_aliases=False, keep_referenced=False)["prune"] == [1, 3, 5, 6]
        assert s.retention_plan(2, keep_aliases=False)["drop_aliases"] == ["best"]
        # a kept rollback protects what it restored (here: v6, otherwise pruned)
        r = s.rollback(version=6)
        plan = s.retention_plan(keep_last=2)
        assert 6 in plan["keep"] and "rollback target of v9" in plan["keep"][6]
        n_before = len(s.blobs.all_hashes())
        assert s.prune(keep_last=2) == [5, 7]
        assert len(s.blobs.all_hashes()) == n_before - 2  # their weights; the shared tokenizer blob stays
        assert s.metrics_history("kl")[0]["version_id"] == ids[5]  # a pruned version's records stay
        assert s.get_version(r).load_json("loop_state.json") == {}
        for v in (1, 2, 3, 4, 6, 8, 9):
            s.get_version(v).verify()
        with pytest.raises(ConfigError, match="pruned"):
            s.rollback(version=5)
        # keep_aliases off: an alias of a pruned version is dropped with it, never left dangling
        assert 1 in s.prune(keep_last=2, keep_aliases=False, keep_referenced=False)
        assert "best" not in s.aliases() and s.resolve("current").version_id == 9


def test_keep_last_one_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ConfigError, match=r"store\.retention\.keep_last.*nothing to roll back to"):
        load_config(RunConfig, None, ["store.retention.keep_last=1"])
    with pytest.raises(ConfigError, match="store.retention.*auto_gc: true needs keep_last"):
        load_config(RunConfig, None, ["store.retention.auto_gc=true"])
    assert load_config(RunConfig, None, ["store.retention.keep_last=3"]).store.retention.keep_last == 3
    _make(tmp_path)
    with RunStore.open(tmp_path, "r", writer=True) as s:
        with pytest.raises(ConfigError, match="keep_last"):
            s.prune(keep_last=1)


def test_runs_gc_cli_dry_run_policy_and_errors(tmp_path, capsys):
    _make(tmp_path)
    before = sorted(p.name for p in (tmp_path / "r" / "versions").iterdir())
    assert main(["runs", "gc", "r", "--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would prune 2 version(s) [5, 6]" in out and "gates all passed" in out
    assert sorted(p.name for p in (tmp_path / "r" / "versions").iterdir()) == before
    assert main(["runs", "gc", "r", "--root", str(tmp_path), "--keep-last", "1"]) == 2
    assert "--keep-last" in capsys.readouterr().err
    assert main(["runs", "gc", "r", "--root", str(tmp_path)]) == 0  # keep_last=2 from the run's config
    assert "pruned 2 version(s) [5, 6]" in capsys.readouterr().out
    assert main(["runs", "show", "r", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pruned" in out and "identical files are stored once" in out


def _gc_subprocess(root, crash_at):
    env = {**os.environ, CRASH_ENV: crash_at}
    return subprocess.run([sys.executable, "-m", "distillgate.cli", "runs", "gc", "r", "--root", str(root),
                           "--keep-last", "2"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("crash_at", ["gc_marked", "gc_manifest:1", "gc_blob:1"])
def test_sigkill_during_purge_leaves_a_store_every_tool_accepts(tmp_path, capsys, crash_at):
    assert {p.split(":")[0] for p in ["gc_marked", "gc_manifest:1", "gc_blob:1"]} == set(GC_STEPS)
    root = tmp_path / "runs"
    _make(root)
    proc = _gc_subprocess(root, crash_at)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    run = root / "r"
    assert main(["runs", "show", "r", "--root", str(root)]) == 0           # readers
    with RunStore.open(root, "r") as s:
        assert [r["version_id"] for r in s.versions()] == [1, 2, 3, 4, 7, 8]  # the marking committed
        for v in s.versions():
            s.get_version(v["version_id"]).verify()
    copy = tmp_path / "copy"                                                # catalog rebuild from the files
    shutil.copytree(root, copy)
    (copy / "r" / "catalog.sqlite").write_bytes(b"garbage")
    rebuilt = rebuild_catalog(copy, "r")
    assert rebuilt["corrupt"] == [] and {1, 2, 3, 4, 7, 8} <= set(rebuilt["versions"])
    with RunStore.open(root, "r", writer=True) as s:                        # resume, rollback, the next gc
        assert s.resume_point().version.version_id == 8
        assert s.rollback(version=2) == 9
        s.prune(keep_last=2)
        assert not (run / "versions" / "000005.json").exists() and not (run / "versions" / "000006.json").exists()
        referenced = {e["sha256"] for r in s.versions() for e in s.get_version(r["version_id"]).files.values()}
        assert s.blobs.all_hashes() == referenced
    assert main(["rollback", "r", "--to", "3", "--root", str(root)]) == 0
    capsys.readouterr()
