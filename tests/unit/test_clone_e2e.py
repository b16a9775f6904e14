"""The clone channel and per-domain channel shares from a config, in `distillgate distill` and in
`distillgate run` (tiny teacher, the real offline MiniLM encoder)."""

from __future__ import annotations

import pytest

from distillgate import loop as loop_mod
from distillgate.config import DistillConfig, RunConfig, load_config
from distillgate.recipes.distill import distill
from distillgate.store import RunStore

CLONE = ["data.samples_per_prompt=3", "data.gen_temperature=1.0", "data.max_new_tokens=10", "data.gen_batch_size=8",
         "loss.channels={kd: 1.0, clone: 0.5}", "loss.clone.concise_ratio=1.0",
         "loss.domain_channel_shares={legal: {clone: 2.0}, medical: {kd: 0.5}}",
         "student.init=config", "student.config={num_hidden_layers: 1, intermediate_size: 32}",
         "train.steps=2", "train.batch_size=4", "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8"]


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home-clone"))


def test_distill_trains_the_clone_channel_from_a_config(tiny_teacher_dir, tmp_path):
    cfg = load_config(DistillConfig, None, [f"teacher.path={tiny_teacher_dir}", f"output_dir={tmp_path / 'out'}",
                                            "data.num_prompts=8", *CLONE])
    res = distill(cfg, progress=False)
    terms = res.summary["train"]["final_terms"]
    assert {"kd", "clone", "clone_concise"} <= set(terms) and terms["clone"] > 0
    assert res.summary["data"]["train"]["examples"] == 3 * res.summary["data"]["train"]["prompts"]


@pytest.mark.slow
def test_run_trains_the_clone_channel_from_a_config(tiny_teacher_dir, tmp_path):
    over = [f"teacher.path={tiny_teacher_dir}", "loop.prompts_per_iteration=6", "loop.heldout_prompts=3",
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]", "loop.perf_lengths=[16]",
            "loop.perf_repeats=1", f"store_root={tmp_path / 'runs'}", *CLONE]
    summary = loop_mod.run(load_config(RunConfig, None, over), progress=False)
    with RunStore.open(tmp_path / "runs", summary["run_id"]) as s:
        state = s.resolve("current").load_json("loop_state.json")
        recipe = s.resolve("current").load_json("recipe.json")
    metrics = state["history"][-1]["metrics"]
    assert metrics["loss/clone"] > 0 and "loss/clone_concise" in metrics
    assert recipe["loss"]["domain_channel_shares"]["legal"]["clone"] >= 2.0
