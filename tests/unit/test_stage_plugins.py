"""The stage plug-in contract: a third-party stage installed as a package (entry point `distillgate.stages`),
with options validated at preflight, its own state across iterations and resume, and its own strategy rule."""

import json
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from distillgate import loop as loop_mod
from distillgate import stages as stages_mod
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError
from distillgate.store import RunStore

STAGE_SOURCE = textwrap.dedent('''
    """A third-party stage: it imports nothing of distillgate's loop, only pydantic."""
    from pydantic import BaseModel, ConfigDict, Field


    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompts: int = Field(4, ge=1)
        steps: int = Field(1, ge=1)
        lr_floor: float = Field(1e-5, gt=0)


    class CountingStage:
        name, code = "counting", "S2"
        Options = Options

        def __init__(self, options):
            self.options = options

        def extract(self, it, run):
            st = run.stage_state(self.name)
            st["extracts"] = st.get("extracts", 0) + 1
            st.setdefault("iterations", []).append(it.index)
            new = run.training.take(self.options.prompts, it.recipe["data"]["mix"], "lm", it.index)
            run.training.add_prompts(it.index, new)

        def map(self, it, run):
            run.distil(it, steps=self.options.steps)

        def rules(self):
            floor = self.options.lr_floor

            def halve_lr(step):
                lr = step.get("train.lr")
                if lr / 2 >= floor:
                    step.change("halve_lr", "train.lr", lr / 2, "the counting stage halves the lr each round")
            return [("halve_lr", halve_lr)]
''')


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))


@pytest.fixture
def installed_stage(tmp_path, monkeypatch):
    """Install a package the way pip lays it out: the module and a dist-info with an entry point."""
    site = tmp_path / "site"
    (site / "dg_counting_stage").mkdir(parents=True)
    (site / "dg_counting_stage" / "__init__.py").write_text(STAGE_SOURCE)
    info = site / "dg_counting_stage-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dg-counting-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[distillgate.stages]\ncounting = dg_counting_stage:CountingStage\n")
    monkeypatch.syspath_prepend(str(site))
    stages_mod.available_stages(refresh=True)
    yield
    stages_mod.STAGES.pop("counting", None)
    sys.modules.pop("dg_counting_stage", None)


def _cfg(teacher_dir, root, stages, **extra):
    over = [f"teacher.path={teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=12", "data.gen_batch_size=8", "train.steps=2", "train.batch_size=2",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
            "loop.heldout_prompts=4", f"loop.stages={stages}", "loop.perf_lengths=[16]", "loop.perf_repeats=1",
            f"store_root={root}"]
    return load_config(RunConfig, None, over + [f"{k}={v}" for k, v in extra.items()])


STAGES = "[{name: anchor, iterations: 0}, {name: counting, iterations: 2, options: {prompts: 4, steps: 1}}]"


def test_an_installed_stage_runs_in_a_real_loop_with_state_and_rules(installed_stage, tiny_teacher_dir, tmp_path):
    assert "counting" in stages_mod.available_stages()
    # the core's tune rule leaves the lr alone here, so the stage's own rule is the only one moving it
    summary = loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", STAGES, run_id="plug",
                                **{"loop.strategy.tune_knobs": "[loss.channels.ce]"}), progress=False)
    assert [h["iteration"] for h in summary["iterations"]] == [0, 1, 2]
    with RunStore.open(tmp_path / "runs", "plug") as s:
        v = s.resolve("current")
        state = v.load_json("loop_state.json")
        assert state["stages"]["counting"]["data"] == {"extracts": 2, "iterations": [1, 2]}
        assert len(state["used_prompts"]["1"]) == 4
        rules = [d["rule"] for d in state["decisions"]]
        assert rules.count("halve_lr") == 3  # iterations 0, 1, 2 (a stage's rules run every iteration)
        assert any("[halve_lr]" in d["reason"] for d in s.catalog.decisions())
        recipes = [h["recipe"]["train"]["lr"] for h in state["history"]]
        assert recipes[2] == pytest.approx(recipes[1] / 2)
        assert s.get_version(s.versions()[1]["version_id"]).meta["stage_name"] == "counting"


def test_stage_options_are_validated_at_preflight_naming_the_field(installed_stage, tiny_teacher_dir, tmp_path):
    bad = "[{name: anchor, iterations: 0}, {name: counting, iterations: 1, options: {prompts: 0}}]"
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options\.prompts"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", bad), progress=False)
    typo = "[{name: anchor, iterations: 0}, {name: counting, iterations: 1, options: {prompt: 3}}]"
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options\.prompt.*unknown option"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", typo), progress=False)
    anchor = "[{name: anchor, iterations: 1}]"
    with pytest.raises(ConfigError, match=r"loop\.stages\[0\]\.iterations"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", anchor), progress=False)
    assert not (tmp_path / "runs").exists()


def test_stage_state_survives_a_kill_and_resume_bitwise(installed_stage, tiny_teacher_dir, tmp_path):
    from distillgate.testing.resume import assert_same_weights, committed, killed_and_resumed

    run_id = killed_and_resumed(lambda root: _cfg(tiny_teacher_dir, root, STAGES, run_id="s"),
                                (tmp_path / "a", tmp_path / "b"), kill_at=2)
    (sa, wa), (sb, wb) = committed(tmp_path / "a", run_id), committed(tmp_path / "b", run_id)
    assert sa == sb == {"counting": {"version": 1, "data": {"extracts": 2, "iterations": [1, 2]}}}
    assert_same_weights(wa, wb)


def test_an_unknown_stage_names_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown stage.*registered: .*anchor.*joint"):
        load_config(RunConfig, None, ["loop.stages=[{name: nope, iterations: 1}]"])


def test_the_core_knows_no_stage_by_name():
    from pathlib import Path

    core = Path(loop_mod.__file__).parent
    for f in core.glob("*.py"):
        text = f.read_text()
        for name in ('"anchor"', '"joint"', "AnchorStage", "JointStage", "from ..stages.", "import stages."):
            assert name not in text, f"{f.name} names {name}"
    assert json.dumps(sorted(stages_mod.available_stages())).count("anchor") == 1


class _Restorer:
    """Iteration 2 brings back iteration 1's weights instead of training (restore_student), and records it."""

    name, code = "restorer", "S2"

    def __init__(self, options):
        self.options = options

    def map(self, it, run):
        if it.index == 1:
            run.distil(it)
        else:
            run.restore_student(run.state.last_good.version)
            run.stage_state(self.name)["restored_from"] = run.state.last_good.version


def test_restore_student_brings_back_a_versions_weights(tiny_teacher_dir, tmp_path):
    stages_mod.register_stage("restorer", _Restorer)
    try:
        cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", "[{name: anchor, iterations: 0}, {name: restorer, iterations: 2}]",
                   run_id="rs")
        loop_mod.run(cfg, progress=False)
    finally:
        stages_mod.STAGES.pop("restorer")
    with RunStore.open(tmp_path / "runs", "rs") as s:
        rows = s.versions()
        w = [{n: load_file(str(v.path_of(n))) for n in v.names("student/") if n.endswith(".safetensors")}
             for v in (s.get_version(r["version_id"]) for r in rows)]
        state = s.resolve("current").load_json("loop_state.json")
    assert state["stages"]["restorer"]["data"]["restored_from"] == rows[1]["version_id"]
    for f in w[1]:
        for k in w[1][f]:
            assert w[2][f][k].equal(w[1][f][k]), k
    assert not all(w[1][f][k].equal(w[0][f][k]) for f in w[0] for k in w[0][f])  # iteration 1 trained
    structure = state["history"][0]["recipe"]["student"]["structure"]
    assert structure["layers"] == 1 and structure["intermediate_size"] == 32 and structure["params"] > 0
    assert state["last_good"]["version"] is None or state["last_good"]["version"] == rows[2]["version_id"]


def test_strategy_section_configures_rules_and_numbers(tiny_teacher_dir, tmp_path):
    fixed = loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", "[{name: anchor, iterations: 0}, {name: joint, iterations: 2}]",
                              **{"loop.strategy.rules": "[]", "run_id": "fixed"}), progress=False)
    with RunStore.open(tmp_path / "runs", fixed["run_id"]) as s:
        assert s.catalog.decisions() == []  # a fixed recipe: no rule ran
    joint = "[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]"
    with pytest.raises(ConfigError, match=r"loop\.strategy\.rules"):
        _cfg(tiny_teacher_dir, tmp_path / "x", joint, **{"loop.strategy.rules": "[revert, nope]"})
    with pytest.raises(ConfigError, match=r"loop\.strategy\.hard_weight"):
        _cfg(tiny_teacher_dir, tmp_path / "x", joint, **{"loop.strategy.hard_weight": -1})


def test_attribution_covers_any_registered_metric():
    from distillgate.attribution import attribute, registry_meta
    from distillgate.evaluate.providers import METRICS, register_metric

    register_metric("flops_ratio_test", higher_is_better=False, description="student / teacher FLOPs per token",
                    module=__name__)
    try:
        meta = registry_meta({"flops_ratio_test": 0.6, "kl": 1.0, "loss/kd": 3.0, "reverse_kl": 1.0}, 0.02)
        assert set(meta) == {"flops_ratio_test", "kl"}  # loss terms are not registered; reverse_kl is no signal
        found = attribute(iteration=3, metrics={"flops_ratio_test": 0.7, "kl": 1.0}, prev={"flops_ratio_test": 0.6,
                          "kl": 1.0}, teacher={}, meta=meta, samples=[], recipe={}, last_good_recipe={},
                          channel_history={})
        (reg,) = [f for f in found if f.kind == "regression"]
        assert reg.subject == "flops_ratio_test" and reg.iteration == 3
    finally:
        METRICS.pop("flops_ratio_test")


def test_uncertain_findings_are_not_acted_on():
    from distillgate.schema import Finding
    from distillgate.strategy import next_recipe

    recipe = {"loss": {"channels": {"kd": 1.0}, "domain_weights": {}}, "data": {"mix": {"legal": 0.5, "medical": 0.5}},
              "hard_pool": {}, "curriculum": {"tier": "lm"}}
    weak = Finding("weak_domain", "warning", "kl/domain/legal", "legal is weak", {"domain": "legal"})
    _, acted = next_recipe(recipe, [weak], iteration=1, last_good=None, gate_status={}, recent_decisions=[])
    weak.uncertain = True
    _, ignored = next_recipe(recipe, [weak], iteration=1, last_good=None, gate_status={}, recent_decisions=[])
    assert acted and not ignored
