"""`distillgate runs list|show` and `distillgate rollback` through the real CLI entry point."""

from __future__ import annotations

from distillgate.cli import main
from distillgate.store import GateRow, RunStore


def _make_run(root):
    with RunStore.create(root, {"seed": 0}, run_id="run-a") as s:
        for it in range(3):
            s.begin_iteration(it)
            s.record_phase(it, "extract", 1.0 + it)
            s.record_phase(it, "map", 10.0)
            with s.begin_version(it) as vw:
                vw.add_json("state.json", {"it": it})
                vid = vw.commit(aliases=("current", "best") if it == 1 else ("current",))
            s.record_gates(vid, [GateRow("G-Q1", it == 1, 0.9 + it / 100, 0.905)])
            s.finish_iteration(it)
        s.set_run_status("finished", converged=False)


def test_runs_list_show_and_rollback(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["runs", "list", "--root", str(root)]) == 0
    assert "no runs" in capsys.readouterr().out
    _make_run(root)

    assert main(["runs", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "run-a" in ln)
    assert [c.strip() for c in line.strip("│ ").split("│")][2:] == ["3", "3", "finished", "no", "1", "v3"]

    assert main(["rollback", "run-a", "--to", "1", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "new version v4 (iteration 1, parent v2, 1 files shared)" in out and "current: v3 -> v4" in out

    assert main(["runs", "show", "run-a", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "extract" in out and "12.0" in out  # iteration 1: 2.0 + 10.0 seconds
    assert "gate results of v3" in out and "FAIL" in out
    v4 = next(ln for ln in out.splitlines() if "│ v4 " in ln)
    assert "rollback" in v4 and "v2" in v4 and "current" in v4
    assert "current: version 3 -> 4" in out  # the rollback alert

    with RunStore.open(root, "run-a") as s:
        assert s.get_version(4).load_json("state.json") == {"it": 1}
        assert [r["version_id"] for r in s.versions()] == [1, 2, 3, 4]


def test_cli_errors_are_clean(tmp_path, capsys):
    def err() -> str:  # rich wraps long messages at the terminal width
        return " ".join(capsys.readouterr().err.split())

    _make_run(tmp_path)
    assert main(["rollback", "run-a", "--to", "7", "--root", str(tmp_path)]) == 2
    assert "iteration: got 7; allowed: an iteration with a committed version: [0, 1, 2]" in err()
    assert main(["runs", "show", "nope", "--root", str(tmp_path)]) == 2
    assert "run: got 'nope'" in err()
    with RunStore.open(tmp_path, "run-a", writer=True):
        assert main(["rollback", "run-a", "--to", "0", "--root", str(tmp_path)]) == 2
        assert "held by pid" in err()
