"""Catalog records survive reopen; aliases move atomically with history; rollback makes a new version that
shares blobs and overwrites nothing; schema versioning refuses a newer catalog."""

from __future__ import annotations

import math
import sqlite3

import pytest

from distillgate.errors import ArtifactError, ConfigError
from distillgate.store import Decision, Finding, GateRow, RunStore, list_runs
from distillgate.store.catalog import SCHEMA_VERSION


def _v(store, iteration, payload, aliases=("current",)) -> int:
    with store.begin_version(iteration) as vw:
        vw.add_json("state.json", payload)
        vw.add_json("tokenizer.json", {"vocab": 17})  # identical in every version: one blob
        return vw.commit(aliases=aliases)


def test_records_survive_reopen(tmp_path):
    with RunStore.create(tmp_path, {"lr": 1e-3}, run_id="r") as s:
        s.begin_iteration(0)
        s.record_phase(0, "extract", 1.5)
        s.record_phase(0, "map", 12.25, "ok")
        s.record_phase(0, "validate", 0.0, "skipped")
        v1 = _v(s, 0, {"k": 0})
        s.record_metrics(v1, {"kl": 0.5, "loss": float("nan"), "ppl": math.inf})
        s.record_metrics(v1, {"acc": 0.75}, split="test")
        s.record_gates(v1, [GateRow("G-Q1", True, 0.97, 0.95, "quality", {"n": 40}),
                            {"gate": "G-O5", "passed": False, "value": 20.0, "threshold": 15.0}])
        ids = s.record_findings(0, [Finding("regression", "warning", "kl", "kl up 10%", {"delta": 0.1})], v1)
        s.record_decisions(0, [Decision(0, "", "loss.weights.kl", 1.0, 1.5, "kl regressed")])
        s.finish_iteration(0, "ok", converged=False)
        v2 = _v(s, 1, {"k": 1})
        s.record_metrics(v2, {"kl": 0.25})
        s.set_run_status("finished", converged=True)

    with RunStore.open(tmp_path, "r") as s:
        assert s.config == {"lr": 1e-3}
        [it0, it1] = s.catalog.iterations()
        assert it0["phases"] == {"extract": {"seconds": 1.5, "status": "ok"}, "map": {"seconds": 12.25, "status": "ok"},
                                 "validate": {"seconds": 0.0, "status": "skipped"}}
        # iteration 1 never finished: the run's stop closed it as failed (issue 15: never `running` forever)
        assert it0["status"] == "ok" and it0["finished"] is not None and it1["status"] == "failed"
        m = s.catalog.metrics(v1, split="val")
        assert m["kl"] == 0.5 and math.isnan(m["loss"]) and math.isnan(m["ppl"])
        nan = pytest.approx(math.nan, nan_ok=True)
        assert s.catalog.metrics(v1) == {"test/acc": 0.75, "val/kl": 0.5, "val/loss": nan, "val/ppl": nan}
        assert s.metrics_history("kl") == [{"version_id": v1, "iteration": 0, "value": 0.5},
                                           {"version_id": v2, "iteration": 1, "value": 0.25}]
        g = s.catalog.gate_results(v1)
        assert [(x.gate, x.passed, x.value, x.threshold, x.dimension, x.detail) for x in g] == [
            ("G-O5", False, 20.0, 15.0, "", {}), ("G-Q1", True, 0.97, 0.95, "quality", {"n": 40})]
        assert s.catalog.last_gated_version() == v1
        [f] = s.catalog.findings(0)
        assert (f["id"], f["version_id"], f["data"], f["severity"]) == (ids[0], v1, {"delta": 0.1}, "warning")
        [d] = s.catalog.decisions(0)
        assert (d["knob"], d["old"], d["new"], d["reason"]) == ("loss.weights.kl", 1.0, 1.5, "kl regressed")
        info = s.info()
        assert (info["status"], info["converged"], info["iterations"], info["versions"], info["current"]) == \
               ("finished", True, 2, 2, v2)


def test_typed_records_fail_loudly(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        v = _v(s, 0, {})
        with pytest.raises(ConfigError, match=r"GateRow.pased"):
            s.record_gates(v, [{"gate": "g", "pased": True}])
        with pytest.raises(ConfigError, match="severity"):
            s.record_findings(0, [{"kind": "stall", "subject": "kl", "message": "flat", "severity": "fatal"}])
        with pytest.raises(ConfigError, match="reason"):
            s.record_decisions(0, [Decision(0, "", "lr", 1, 2, " ")])
        with pytest.raises(ConfigError, match="phase status"):
            s.record_phase(0, "map", 1.0, "done")
        with pytest.raises(ConfigError, match="seconds"):
            s.record_phase(0, "map", -1.0)
        with pytest.raises(ConfigError, match="committed version"):
            s.record_metrics(99, {"kl": 1.0})
        with pytest.raises(ConfigError, match="metric 'kl'"):
            s.record_metrics(v, {"ok": 1.0, "kl": "high"})
        assert s.catalog.metrics(v) == {}
        assert s.catalog.gate_results(v) == [] and s.catalog.findings() == [] and s.catalog.decisions() == []


def test_aliases_move_atomically_with_history(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        v1 = _v(s, 0, {"k": 0}, aliases=("current", "best", "stable"))
        v2 = _v(s, 1, {"k": 1})
        assert s.aliases() == {"best": v1, "current": v2, "stable": v1}
        with pytest.raises(ConfigError, match="committed version"):
            s.set_alias("best", 42)
        assert s.aliases()["best"] == v1  # a refused move changes nothing
        s.set_alias("stable", v2, reason="gates passed")
        s.set_alias("my-tag", v1)
        assert s.alias_history("stable") == [
            {"version_id": v1, "previous": None, "moved": pytest.approx(s.alias_history("stable")[0]["moved"]),
             "reason": "commit candidate"},
            {"version_id": v2, "previous": v1, "moved": pytest.approx(s.alias_history("stable")[1]["moved"]),
             "reason": "gates passed"}]
        assert s.stable_versions() == [v2, v1]
        assert s.resolve("my-tag").version_id == v1
        with pytest.raises(ConfigError, match="alias"):
            s.resolve("nope")


def test_rollback_is_a_new_version_sharing_blobs(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        v1 = _v(s, 0, {"k": 0})
        v2 = _v(s, 1, {"k": 1})
        v3 = _v(s, 2, {"k": 2})
        manifests = {p.name: p.read_bytes() for p in (s.dir / "versions").iterdir()}
        blobs = s.blobs.all_hashes()
        assert len(blobs) == 4  # three states + one shared tokenizer
        r = s.rollback(iteration=1, reason="G-Q1 regressed")
        rv = s.get_version(r)
        assert (r, rv.parent, rv.iteration, rv.kind) == (4, v2, 1, "rollback")
        assert rv.files == s.get_version(v2).files and rv.load_json("state.json") == {"k": 1}
        assert rv.meta == {"rollback_to": v2, "rolled_back_from": v3, "reason": "G-Q1 regressed"}
        assert s.aliases()["current"] == r
        assert s.blobs.all_hashes() == blobs  # nothing copied
        assert all((s.dir / "versions" / n).read_bytes() == b for n, b in manifests.items())  # nothing overwritten
        assert s.get_version(v3).load_json("state.json") == {"k": 2}
        r2 = s.rollback(version=v1)
        assert s.get_version(r2).parent == v1 and s.resume_point().version.version_id == r2
        assert s.resume_point().next_iteration == 3
        with pytest.raises(ConfigError, match="exactly one"):
            s.rollback(iteration=0, version=v1)
        with pytest.raises(ConfigError, match=r"iteration: got 9; allowed: .*\[0, 1, 2\]"):
            s.rollback(iteration=9)
        # a rollback to a corrupted version is refused (never restore garbage)
        p = s.blobs.path(s.get_version(v3).files["state.json"]["sha256"])
        p.chmod(0o644)
        p.write_bytes(b"{}")
        with pytest.raises(ArtifactError, match="version 3 file 'state.json'"):
            s.rollback(version=v3)
        assert s.aliases()["current"] == r2


def test_resume_point_of_fresh_and_used_runs(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        rp = s.resume_point()
        assert (rp.version, rp.last_iteration, rp.next_iteration) == (None, None, 0)
        _v(s, 0, {})
        v = _v(s, 1, {})
        s.begin_iteration(2)  # crashed in iteration 2 before committing anything
    with RunStore.open(tmp_path, "r", writer=True) as s:
        rp = s.resume_point()
        assert (rp.version.version_id, rp.last_iteration, rp.next_iteration) == (v, 1, 2)


def test_schema_version_and_read_only(tmp_path):
    RunStore.create(tmp_path, {}, run_id="r").close()
    db = tmp_path / "r" / "catalog.sqlite"
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with RunStore.open(tmp_path, "r") as reader:
        with pytest.raises(ArtifactError, match="read-only"):
            reader.begin_version(0)
        with pytest.raises(ArtifactError, match="read-only"):
            reader.record_phase(0, "map", 1.0)
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(ArtifactError, match="newer than this distillgate"):
        RunStore.open(tmp_path, "r")
    assert "unreadable" in list_runs(tmp_path)[0]["status"]


def test_create_validates_before_touching_disk(tmp_path):
    with pytest.raises(ConfigError, match="run_id"):
        RunStore.create(tmp_path / "runs", {}, run_id="../evil")
    assert not (tmp_path / "runs").exists()
    RunStore.create(tmp_path, {}, run_id="r").close()
    with pytest.raises(ConfigError, match="not yet used"):
        RunStore.create(tmp_path, {}, run_id="r")
    with pytest.raises(ConfigError, match="run: got 'x'"):
        RunStore.open(tmp_path, "x")
    assert [r["run_id"] for r in list_runs(tmp_path)] == ["r"]


def test_prune_keeps_aliases_stable_and_recent_and_frees_blobs(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        ids = [_v(s, it, {"k": it}, aliases=("current", "stable") if it in (1, 2, 3) else ("current",))
               for it in range(8)]
        s.set_alias("best", ids[0])
        s.record_metrics(ids[4], {"kl": 0.1})
        n_before = len(s.blobs.all_hashes())
        pruned = s.prune(keep_last=2)
        assert pruned == [ids[4], ids[5]]  # v1 best, v2-v4 the last three stable, v7-v8 the newest two
        assert len(s.blobs.all_hashes()) == n_before - 2
        assert s.metrics_history("kl") == [{"version_id": ids[4], "iteration": 4, "value": 0.1}]  # history kept
        with pytest.raises(ConfigError, match="pruned"):
            s.get_version(ids[4])
        with pytest.raises(ConfigError, match="pruned"):
            s.set_alias("best", ids[4])
        for v in (ids[0], ids[1], ids[2], ids[3], ids[6], ids[7]):
            s.get_version(v).verify()
        r = s.rollback(version=ids[1])
        assert s.get_version(r).load_json("state.json") == {"k": 1}
        assert s.prune(keep_last=2) == [ids[6]]  # v8 and the rollback are now the newest two


def test_json_artifacts_take_numpy_and_torch_scalars_but_refuse_arrays(tmp_path):
    """A numpy bool from a comparison (an exploration trial's verdict, found by `make demo`) or a 0-d tensor is
    written as its Python value; an array stays an error naming its type (no silent list conversion)."""
    import json

    import numpy as np
    import torch

    with RunStore.create(tmp_path, {"x": 1}, run_id="r") as s:
        vw = s.begin_version(0)
        vw.add_json("trials.json", [{"won": np.bool_(True), "kl": np.float32(1.5), "n": np.int64(3),
                                     "t": torch.tensor(2.0)}])
        vid = vw.commit()
        assert json.loads(s.get_version(vid).path_of("trials.json").read_text()) == \
            [{"won": True, "kl": 1.5, "n": 3, "t": 2.0}]
        vw = s.begin_version(1)
        with pytest.raises(TypeError, match="ndarray is not JSON-serialisable"):
            vw.add_json("bad.json", {"a": np.zeros(3)})
        vw.abort()
