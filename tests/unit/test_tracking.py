"""Tracking where users already look (issue 13 part 6): train.report_to [tensorboard, mlflow] on a tiny loop run,
offline (MLflow's SQLite backend in the run folder), with retention (auto_gc) on in the same run: the MLflow run
mirrors metrics, gates, the report and the store's aliases, and a resume continues the same MLflow run."""

from __future__ import annotations

import json

import pytest

from distillgate.cli import main
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError
from distillgate.store import RunStore

OVER = ["student.init=config", "student.config={num_hidden_layers: 1, intermediate_size: 32}",
        "data.max_new_tokens=12", "data.gen_batch_size=8", "train.steps=2", "train.batch_size=2",
        "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
        "loop.heldout_prompts=4", "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 3}]",
        "loop.perf_lengths=[16]", "loop.perf_repeats=1", "loop.capability_checks=[]",
        "train.report_to=[tensorboard, mlflow]", "store.retention.keep_last=2", "store.retention.auto_gc=true",
        "run_id=tracked"]


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_mlflow_missing_is_a_clear_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train\.report_to.*pip install 'distillgate\[mlflow\]'"):
        load_config(RunConfig, None, ["train.report_to=[mlflow]"])
    assert load_config(RunConfig, None, ["train.report_to=[]"]).train.report_to == []


def test_loop_run_reports_to_tensorboard_and_mlflow_offline(tiny_teacher_dir, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "runs"
    assert main(["run", f"teacher.path={tiny_teacher_dir}", f"store_root={root}", *OVER, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "retention: pruned versions" in out and "report logged to the run's MLflow run" in out
    run_dir = root / "tracked"
    with RunStore.open(root, "tracked") as s:
        aliases = s.aliases()
        states = {r["version_id"]: r["status"] for r in s.catalog.version_rows(status=None)}
        assert "pruned" in states.values()                      # auto_gc pruned after commits
        assert all(states[v] == "committed" for v in aliases.values())
        kl = {r["iteration"]: r["value"] for r in s.metrics_history("kl")}

    uri = f"sqlite:///{run_dir}/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name("distillgate")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["distillgate.run_id"] == "tracked"
    rid = runs[0].info.run_id
    hist = {m.step: m.value for m in c.get_metric_history(rid, "kl")}
    assert hist == pytest.approx(kl) and sorted(hist) == [0, 1, 2, 3]
    assert [m.step for m in c.get_metric_history(rid, "gate/G-C1/passed")] == [0, 1, 2, 3]
    assert runs[0].data.params["train.steps"] == "2"
    arts = [a.path for a in c.list_artifacts(rid, "iterations/003")] + [a.path for a in c.list_artifacts(rid, "report")]
    assert arts == ["iterations/003/gates.json", "report/report.html"]
    gates = json.loads(open(c.download_artifacts(rid, "iterations/003/gates.json", str(tmp_path))).read())
    assert {g["id"] for g in gates["gates"]} >= {"G-C1"}
    for name in ("current", "best", "stable"):
        if name in aliases:
            mv = c.get_model_version_by_alias("distillgate-tracked", name)
            assert mv.tags["distillgate.version"] == str(aliases[name]) and mv.run_id == rid

    ev = EventAccumulator(str(run_dir / "tensorboard"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("iteration/kl")] == [0, 1, 2, 3]
    assert "phase_seconds/validate" in ev.Tags()["scalars"]

    # a resume (nothing left to run) continues the same MLflow run, and the pruned store is accepted
    assert main(["run", "--resume", "tracked", "--root", str(root), "--no-report", "--no-progress"]) == 0
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    _training_steps_go_to_one_mlflow_run_per_output_folder(tmp_path, uri)


def _training_steps_go_to_one_mlflow_run_per_output_folder(tmp_path, uri):
    """`distill`'s step metrics (MetricsLog); here in the loop test's database (creating one costs seconds)."""
    from mlflow.tracking import MlflowClient

    from distillgate.config import MlflowSpec
    from distillgate.train.metrics import MetricsLog

    out, spec = tmp_path / "train", MlflowSpec(tracking_uri=uri, experiment="steps")
    for resume_step, steps in ((None, (1, 2)), (2, (3,))):  # a resumed training continues the same run
        m = MetricsLog(out, tensorboard=False, resume_step=resume_step, mlflow=spec)
        for s in steps:
            m.step({"step": s, "loss": 1.0 / s, "lr": 1e-3, "terms": {"kd": 0.5 * s, "ce": float("nan")}})
        m.close()
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("steps").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    assert [(x.step, x.value) for x in c.get_metric_history(rid, "train/loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert c.get_metric_history(rid, "train/term/ce") == []  # NaN is left out, as in TensorBoard



def test_a_failing_tracker_is_switched_off_with_an_alert_and_the_run_goes_on(tmp_path):
    from distillgate.loop.contract import Iteration
    from distillgate.tracking import LoopTracker, _name

    class Broken:
        name = "mlflow"

        def iteration(self, *a):
            raise ConnectionError("tracking server gone")

    cfg = load_config(RunConfig, None, ["train.report_to=[]"])
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        said = []
        tr = LoopTracker(cfg, s, say=said.append)
        tr.sinks.append(Broken())
        it = Iteration(1, None, {}, cfg)
        tr.iteration(it)
        assert tr.sinks == [] and "switched off (ConnectionError: tracking server gone)" in said[0]
        assert any(a["source"] == "tracking" for a in s.catalog.alerts())
        tr.iteration(it)  # nothing left to fail
    assert _name("acc:mmlu/marketing (5-shot)") == "acc_mmlu/marketing _5-shot_"
