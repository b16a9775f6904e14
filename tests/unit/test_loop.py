"""The loop end to end on tiny models: versions, aliases, findings, resume equivalence, rollback, plug-ins."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distillgate import loop as loop_mod
from distillgate.cli import main
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError
from distillgate.store import RunStore


def _cfg(teacher_dir, root, **extra):
    over = [f"teacher.path={teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=12", "data.gen_batch_size=8", "train.steps=2", "train.batch_size=2",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
            "loop.heldout_prompts=4", "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 2}]",
            "loop.perf_lengths=[16]", "loop.perf_repeats=1", f"store_root={root}"]
    over += [f"{k}={v}" for k, v in extra.items()]
    return load_config(RunConfig, None, over)


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))


def _weights(store_root, run_id, alias="current"):
    with RunStore.open(store_root, run_id) as s:
        v = s.resolve(alias)
        return {n: load_file(str(v.path_of(n))) for n in v.names("student/") if n.endswith(".safetensors")}


def test_run_commits_every_iteration_with_aliases_and_records(tiny_teacher_dir, tmp_path):
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs")
    summary = loop_mod.run(cfg, progress=False)
    assert summary["status"] == "iterations_exhausted"  # business/operations gates are never measured here
    assert [h["iteration"] for h in summary["iterations"]] == [0, 1, 2]
    with RunStore.open(tmp_path / "runs", summary["run_id"]) as s:
        rows = s.versions()
        assert [r["iteration"] for r in rows] == [0, 1, 2]
        assert {"current", "best"} <= set(s.aliases())
        v = s.resolve("current")
        for name in ("recipe.json", "gates.json", "loop_state.json", "metrics.json", "findings.json"):
            assert name in v.files
        assert any(n.startswith("teacher_profile/") for n in s.get_version(rows[0]["version_id"]).files)
        its = s.catalog.iterations()
        assert all(set(it["phases"]) >= {"extract", "map", "validate", "attribute", "compensate", "commit"}
                   for it in its)
        state = v.load_json("loop_state.json")
        assert len(state["history"]) == 3 and state["history"][1]["metrics"]["kl"] > 0
        # the held-out prompts are never trained on
        used = {p for ids in state["used_prompts"].values() for p in ids}
        assert not used & set(state["heldout_prompts"])
        assert s.catalog.findings(), "every iteration with failing gates yields findings"


def test_bad_config_creates_no_run_folder(tiny_teacher_dir, tmp_path):
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", **{"eval.text_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match="eval.text_file"):
        loop_mod.run(cfg, progress=False)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(RunConfig, None, ["loop.stages=[{name: nope, iterations: 1}]"])


def test_kill_then_resume_gives_the_same_final_weights(tiny_teacher_dir, tmp_path, monkeypatch):
    straight = loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "a"), progress=False)
    real = loop_mod.Run.distil

    def crash_in_iteration_2(self, it, **kw):
        if it.index == 2:
            real(self, it, **kw)  # training finished, the process dies before the commit
            raise KeyboardInterrupt("simulated kill")
        return real(self, it, **kw)

    monkeypatch.setattr(loop_mod.Run, "distil", crash_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "b", run_id="crashy"), progress=False)
    monkeypatch.setattr(loop_mod.Run, "distil", real)
    with RunStore.open(tmp_path / "b", "crashy") as s:
        assert [r["iteration"] for r in s.versions()] == [0, 1]
    resumed = loop_mod.run(None, resume_run="crashy", root=str(tmp_path / "b"), progress=False)
    assert [h["iteration"] for h in resumed["iterations"]] == [0, 1, 2]
    a, b = _weights(tmp_path / "a", straight["run_id"]), _weights(tmp_path / "b", "crashy")
    assert a.keys() == b.keys()
    for f in a:
        for k in a[f]:
            assert a[f][k].equal(b[f][k]), k


def test_rollback_then_resume_continues_from_the_restored_iteration(tiny_teacher_dir, tmp_path, capsys):
    summary = loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", run_id="rb"), progress=False)
    assert summary["status"] == "iterations_exhausted"
    before = {}
    with RunStore.open(tmp_path / "runs", "rb") as s:
        for r in s.versions():
            before[r["version_id"]] = dict(s.get_version(r["version_id"]).files)
    assert main(["rollback", "rb", "--to", "1", "--root", str(tmp_path / "runs")]) == 0
    with RunStore.open(tmp_path / "runs", "rb") as s:
        cur = s.resolve("current")
        assert cur.kind == "rollback" and cur.iteration == 1
        one = [r for r in s.versions() if r["iteration"] == 1][0]
        assert cur.files == s.get_version(one["version_id"]).files
        for vid, files in before.items():  # nothing overwritten
            assert s.get_version(vid).files == files
        s.get_version(max(before)).verify(deep=True)
        assert len(s.versions()) == len(before) + 1
    resumed = loop_mod.run(None, resume_run="rb", root=str(tmp_path / "runs"), progress=False)
    # the restored state is iteration 1's: iteration 2 runs again from it (a new version, parent = the rollback)
    assert [h["iteration"] for h in resumed["iterations"]] == [0, 1, 2]
    with RunStore.open(tmp_path / "runs", "rb") as s:
        rows = s.versions()
        assert rows[-1]["iteration"] == 2 and rows[-1]["parent"] == rows[-2]["version_id"]
        assert len(rows) == len(before) + 2
    # resuming again after that (a second crash/restart) works too: nothing is left to run
    again = loop_mod.run(None, resume_run="rb", root=str(tmp_path / "runs"), progress=False)
    assert [h["iteration"] for h in again["iterations"]] == [0, 1, 2]


class _Probe:
    name, code = "probe", "S2"
    calls = []

    def __init__(self, options):
        self.options = options

    def extract(self, it, run):
        _Probe.calls.append(("extract", it.index))
        run.training.add_prompts(it.index, run.training.take(4, it.recipe["data"]["mix"], "lm", it.index))

    def map(self, it, run):
        _Probe.calls.append(("map", it.index))

    def attribute(self, it, run):
        _Probe.calls.append(("attribute", it.index))


def test_a_new_stage_plugs_in_without_touching_the_core(tiny_teacher_dir, tmp_path):
    from distillgate.stages import STAGES, register_stage

    register_stage("probe", _Probe)
    try:
        cfg = _cfg(tiny_teacher_dir, tmp_path / "runs",
                   **{"loop.stages": "[{name: anchor, iterations: 0}, {name: probe, iterations: 1}]"})
        loop_mod.run(cfg, progress=False)
    finally:
        STAGES.pop("probe")
    assert _Probe.calls == [("extract", 1), ("map", 1), ("attribute", 1)]


def test_resume_rebuilds_catalog_rows_lost_between_commit_and_catalog_write(tiny_teacher_dir, tmp_path):
    import sqlite3

    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", run_id="gap"), progress=False)
    with RunStore.open(tmp_path / "runs", "gap") as s:
        vid = s.resolve("current").version_id
        want = s.catalog.metrics(vid)
        n_findings = len(s.catalog.findings(2))
        n_decisions = len(s.catalog.decisions())
    assert want and n_findings
    db = sqlite3.connect(tmp_path / "runs" / "gap" / "catalog.sqlite")  # as if the process died right after commit
    with db:
        for table in ("metrics", "gate_results", "findings"):
            db.execute(f"DELETE FROM {table} WHERE version_id=?", (vid,))
    db.close()
    loop_mod.run(None, resume_run="gap", root=str(tmp_path / "runs"), progress=False)
    with RunStore.open(tmp_path / "runs", "gap") as s:
        assert s.catalog.metrics(vid) == want
        assert len(s.catalog.findings(2)) == n_findings and s.catalog.gate_results(vid)
        assert any("rebuilt" in a["message"] for a in s.catalog.alerts())
        assert len(s.catalog.decisions()) == n_decisions  # rows that survived are not written twice


@pytest.mark.parametrize("min_iterations,ran", [(2, [0, 1, 2]), (0, [0])])
def test_budget_spent_by_the_setup_still_leaves_min_iterations(tiny_teacher_dir, tmp_path, monkeypatch,
                                                                min_iterations, ran):
    """A setup (iteration 0) that alone spends the wall-clock budget, as a slow derivation on a loaded
    machine did: loop.min_iterations joint iterations still run, then the budget stops the run."""
    clock = {"now": 1000.0}
    monkeypatch.setattr(loop_mod, "time", type("FakeTime", (), {"time": staticmethod(lambda: clock["now"])}))
    real_setup = loop_mod.Run.setup

    def slow_setup(self, *a, **kw):
        clock["now"] += 120.0  # two minutes against a one-minute budget
        return real_setup(self, *a, **kw)

    monkeypatch.setattr(loop_mod.Run, "setup", slow_setup)
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", **{
        "loop.budget_minutes": 1, "loop.min_iterations": min_iterations,
        "loop.stages": "[{name: anchor, iterations: 0}, {name: joint, iterations: 4}]"})
    summary = loop_mod.run(cfg, progress=False)
    assert summary["status"] == "budget_exhausted"
    assert [h["iteration"] for h in summary["iterations"]] == ran


def test_capability_checks_sized_in_the_gate_table_and_g_p2_with_perf(tiny_teacher_dir, tmp_path, monkeypatch):
    """G-C4 and G-P2 on in validate: G-C4's size and CI reach gates.json; G-P2 is measured with G-P1/G-P3 (once:
    the structure does not change) and carried into later iterations; the teacher's paths are traced once."""
    from distillgate import perf
    from distillgate.evaluate import decision_path as dp

    vol, traced = [], []
    real_vol, real_path = perf.compare_latency_volatility, dp.evidence_paths
    monkeypatch.setattr(perf, "compare_latency_volatility", lambda *a, **k: vol.append(1) or real_vol(*a, **k))
    monkeypatch.setattr(dp, "evidence_paths", lambda m, tok, insts, **k: traced.extend([m] * len(insts))
                        or real_path(m, tok, insts, **k))
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", **{"loop.capability_checks": "[decision_path, volatility]",
                                                        "loop.path_instructions": 3, "loop.stages":
                                                        "[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]"})
    summary = loop_mod.run(cfg, progress=False)
    assert len(vol) == 1 and len(traced) == 2 * 3 + 3   # 2 iterations of the student, the teacher once
    with RunStore.open(tmp_path / "runs", summary["run_id"]) as s:
        gates = {g["metric"]: g for g in s.resolve("current").load_json("gates.json")["gates"]}
    c4, p2 = gates["path_consistency"], gates["latency_volatility_ratio"]
    assert c4["size"]["used"] == 3 and c4["size"]["spec"] == 5000 and len(c4["ci95"]) == 2
    assert "3/5000 instructions" in c4["note"] and c4["uncertain"] == (c4["ci95"][0] <= 0.935 <= c4["ci95"][1])
    assert p2["status"] in ("pass", "fail") and p2["ci95"] is not None
