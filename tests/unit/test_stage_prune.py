"""The S3 ``prune`` stage in a real loop on tiny models: progressive cuts, versioned, resumable bitwise,
regressions diagnosed and retried smaller, FLOPs reported, and a student that loads in plain transformers."""

import json

import pytest
from safetensors.torch import load_file

from distillgate import loop as loop_mod
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError
from distillgate.store import RunStore


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))


def _cfg(teacher_dir, root, stages, **extra):
    over = [f"teacher.path={teacher_dir}", "student.init=derive", "student.num_layers=3",
            "student.layer_selection=block_influence", "student.calib_tokens=256",
            "data.max_new_tokens=24", "data.gen_batch_size=8", "train.steps=4", "train.batch_size=2",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
            "loop.heldout_prompts=4", f"loop.stages={stages}", "loop.perf_lengths=[16]", "loop.perf_repeats=1",
            f"store_root={root}"]
    return load_config(RunConfig, None, over + [f"{k}={v}" for k, v in extra.items()])


PRUNE = ("[{name: anchor, iterations: 0}, {name: joint, iterations: 1}, "
         "{name: prune, iterations: 2, options: {cycles: 2, kinds: [heads, mlp], keep: {heads: 0.5, mlp: 0.5}, "
         "importance: {calib_tokens: 256}, tolerance: 10.0}}]")


def _weights(v):
    return {n: load_file(str(v.path_of(n))) for n in v.names("student/") if n.endswith(".safetensors")}


def test_prune_cycles_cut_progressively_and_each_cut_is_a_version(tiny_teacher_dir, tmp_path):
    summary = loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", PRUNE, run_id="p"), progress=False)
    assert [h["iteration"] for h in summary["iterations"]] == [0, 1, 2, 3]
    with RunStore.open(tmp_path / "runs", "p") as s:
        rows = s.versions()
        state = s.resolve("current").load_json("loop_state.json")
        structs = [h["recipe"]["student"]["structure"] for h in state["history"]]
        # teacher 4 heads / 2 KV heads, MLP 64: two cuts toward half: heads 4 -> 2 (per KV group), MLP 64 -> 45 -> 32
        assert [x["heads"] for x in structs] == [4, 4, 2, 2]
        assert [x["intermediate_size"] for x in structs] == [64, 64, 45, 32]
        assert all(x["kv_heads"] == 2 for x in structs)
        pst = state["stages"]["prune"]["data"]
        assert pst["cycles_done"] == 2 and [c["iteration"] for c in pst["cuts"]] == [2, 3]
        v2 = s.get_version(rows[2]["version_id"])
        assert v2.meta["stage"] == "S3" and v2.meta["stage_name"] == "prune"
        rep = json.loads(v2.path_of("prune.json").read_text())
        assert rep["method"] == "taylor_trace" and rep["source"] == "student"  # the default
        assert rep["before"]["heads"] == 4 and rep["after"]["heads"] == 2
        assert rep["flops"]["flops_saved_pct"] > 0
        assert all(abs(x) < 2 for x in rep["flops"]["counted"]["analytic_vs_counted_pct"])
        assert set(rep["removed_share_by_layer"]) == {"heads", "mlp"}
        assert "kl_with" in rep["fold_in"] and "kl_without" in rep["fold_in"]
        m = v2.load_json("metrics.json")["student"]
        assert m["flops_ratio"] < 1 and m["prune/flops_saved_pct"] > 0 and "ttft_ratio" in m  # perf re-measured
        # the pruned student is a plain HF model
        from transformers import AutoModelForCausalLM

        folder = s.resolve("current").checkout("student", tmp_path / "co")
        hf = AutoModelForCausalLM.from_pretrained(str(folder))
        assert hf.config.num_attention_heads == 2 and hf.config.intermediate_size == 32
    # the report and `runs show` show the structure and FLOPs per iteration
    from distillgate.report.html import render_html
    from distillgate.report.data import ReportData
    from distillgate.report.from_store import load_report_data

    data = load_report_data(tmp_path / "runs", "p", param_diffs=False)
    assert [(x.heads, x.mlp) for x in data.structure] == [(4, 64), (4, 64), (2, 45), (2, 32)]
    assert data.structure[0].teacher_layers == data.structure[-1].teacher_layers and data.structure[-1].flops
    assert ReportData.from_dict(json.loads(json.dumps(data.to_dict()))).structure == data.structure
    html = render_html(data)
    assert 'id="structure"' in html and "share of each block kept" in html
    from distillgate.cli import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["runs", "show", "p", "--root", str(tmp_path / "runs")]) == 0
    out = buf.getvalue()
    assert "structure and FLOPs" in out and "flops_ratio" in out


def test_resume_in_the_middle_of_a_prune_cycle_is_bitwise(tiny_teacher_dir, tmp_path):
    from distillgate.testing.resume import assert_same_weights, committed, killed_and_resumed

    # Two runs are compared, each measuring its own TTFT: with the core rules on, a TTFT regression (timing
    # noise on a loaded machine) could revert a knob in one run and not the other. The stage's own rule acts on
    # quality metrics only (prune.retry_on), so it stays on.
    run_id = killed_and_resumed(lambda root: _cfg(tiny_teacher_dir, root, PRUNE, run_id="r",
                                                  **{"loop.strategy.rules": "[]"}),
                                (tmp_path / "a", tmp_path / "b"), kill_at=3, after_training=False)
    (sa, wa), (sb, wb) = committed(tmp_path / "a", run_id), committed(tmp_path / "b", run_id)
    assert sa["prune"] == sb["prune"] and sa["prune"]["data"]["cycles_done"] == 2
    assert_same_weights(wa, wb)


@pytest.fixture(scope="module")
def layered_teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny teacher whose attention and MLP outputs are 40x the shared fixture's. On that one the scaled-up
    embeddings carry the residual stream: a cut moved held-out KL by ~1e-7, as much as the tail samples' noise
    did, and whether it "regressed" flipped with transformers 5.25 (the saved config.json names the version ->
    another teacher fingerprint and cache key -> other tail samples). Here a cut costs 8-17% of KL or PPL, on
    5.24 and 5.25 alike."""
    import torch

    from distillgate.models import save_model
    from distillgate.testing.tiny import make_tiny_model

    model = make_tiny_model(len(tiny_tokenizer), num_layers=4, hidden=32, intermediate=64, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(40.0)
            layer.mlp.down_proj.weight.mul_(40.0)
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("layered") / "teacher")


def test_a_regressed_cut_restores_the_last_good_weights_and_retries_smaller(layered_teacher_dir, tmp_path):
    stages = ("[{name: anchor, iterations: 0}, {name: joint, iterations: 1}, "
              "{name: prune, iterations: 3, options: {cycles: 1, kinds: [heads, mlp], keep: {heads: 0.5, mlp: 0.25}, "
              "importance: {calib_tokens: 256}, tolerance: 0.0, max_retries: 1}}]")
    loop_mod.run(_cfg(layered_teacher_dir, tmp_path / "runs", stages, run_id="g"), progress=False)
    with RunStore.open(tmp_path / "runs", "g") as s:
        state = s.resolve("current").load_json("loop_state.json")
        decisions = [d for d in state["decisions"] if d["rule"] == "prune_retry"]
        findings = s.get_version(s.versions()[2]["version_id"]).load_json("findings.json")
        good = [r["version_id"] for r, h in zip(s.versions()[:2], [0, 1])
                if not any(f["kind"] in ("regression", "nonfinite")
                           for f in s.get_version(r["version_id"]).load_json("findings.json"))]
        retried = s.get_version(s.versions()[3]["version_id"]).load_json("findings.json")
        good_iter = [i for i, r in enumerate(s.versions()[:2]) if r["version_id"] == good[-1]][0]
    regs = [f for f in findings if f["kind"] == "regression"]
    assert regs, "a cut with tolerance 0 must count as a regression on tiny models"
    assert "heatmap_layer_kind" in regs[0]["evidence"] and regs[0]["evidence"]["tolerance"]["allowed"] == 0.0
    heat = regs[0]["evidence"]["heatmap_layer_kind"]
    assert heat["rows"] == ["heads", "mlp"] and len(heat["cols"]) == 3
    assert all(0.0 <= v <= 1.0 for row in heat["z"] for v in row) and any(v > 0 for row in heat["z"] for v in row)
    from distillgate.report.convert import evidence_from_dict

    assert any(h.y == ["heads", "mlp"] for h in evidence_from_dict(regs[0]["evidence"]).heatmaps)  # drawn
    blamed = {b["knob"] for b in regs[0]["evidence"]["knob_blame"]}
    assert any(k.startswith("student.structure") for k in blamed) and "prune.strength" in blamed
    assert decisions[0]["iteration"] == 2 and decisions[0]["old"] == 1.0 and decisions[0]["new"] == 0.5
    assert "restoring the last good version's weights" in decisions[0]["reason"]
    structs = [h["recipe"]["student"]["structure"] for h in state["history"]]
    # iteration 3 restored iteration 1's structure and cut half as much
    assert structs[2]["intermediate_size"] == 16 and 16 < structs[3]["intermediate_size"] < 64
    assert state["history"][3]["recipe"]["prune"]["strength"] == 0.5
    assert state["history"][3]["recipe"]["prune"]["restored_from"] == good[-1]  # the last good version
    # the retry regressed too (tolerance 0): after max_retries=1 the cut is skipped, and the skipped cycle counts
    assert [d["new"] for d in decisions[:2]] == [0.5, 0.0] and "skipping this cut" in decisions[1]["reason"]
    assert state["history"][4]["recipe"]["prune"]["strength"] == 0.0
    assert state["stages"]["prune"]["data"]["cycles_done"] == 1
    # the retried cut is judged against the restored version, not against the failed cut before it
    for f in retried:
        if f["kind"] == "regression":
            assert f["evidence"]["baseline_iteration"] == good_iter and f"since iteration {good_iter}" in f["message"]


def test_prune_options_are_checked_at_preflight(tiny_teacher_dir, tmp_path):
    bad = "[{name: anchor, iterations: 0}, {name: prune, iterations: 1, options: {kinds: [heads, wings]}}]"
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options\.kinds"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", bad), progress=False)
    bad = "[{name: anchor, iterations: 0}, {name: prune, iterations: 1, options: {keep: {heads: 0}}}]"
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options\.keep\.heads"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", bad), progress=False)
    bad = ("[{name: anchor, iterations: 0}, {name: prune, iterations: 1, options: {kinds: [hidden], "
           "importance: {source: teacher}}}]")
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options.*source 'student'"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", bad), progress=False)
    # a metric that never gets a regression finding would never retry a cut
    bad = "[{name: anchor, iterations: 0}, {name: prune, iterations: 1, options: {retry_on: [kl, reverse_kl]}}]"
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options\.retry_on.*reverse_kl.*allowed: \[.*'kl'"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", bad), progress=False)
    assert not (tmp_path / "runs").exists()


def test_every_kind_and_teacher_scores_and_a_params_target(tiny_teacher_dir, tmp_path):
    stages = ("[{name: anchor, iterations: 0}, "
              "{name: prune, iterations: 1, options: {cycles: 1, kinds: [layers, hidden, rotary], "
              "keep: {layers: 0.67, hidden: 0.75, rotary: 0.5}, importance: {calib_tokens: 256, method: taylor}, "
              "tolerance: 10.0}}, "
              "{name: prune, iterations: 1, options: {cycles: 1, kinds: [heads, mlp], gqa: whole_groups, "
              "target: {params: 17000}, importance: {calib_tokens: 256, method: obd, source: teacher}, tolerance: 10.0}}]")
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages, run_id="k"), progress=False)
    with RunStore.open(tmp_path / "runs", "k") as s:
        state = s.resolve("current").load_json("loop_state.json")
        structs = [h["recipe"]["student"]["structure"] for h in state["history"]]
        v1 = s.get_version(s.versions()[1]["version_id"])
        rep1 = json.loads(v1.path_of("prune.json").read_text())
        rep2 = json.loads(s.get_version(s.versions()[2]["version_id"]).path_of("prune.json").read_text())
    assert structs[0]["layers"] == 3 and structs[1]["layers"] == 2
    assert structs[1]["hidden_size"] == 24 and structs[1]["head_dim"] == 4
    assert rep1["method"] == "taylor" and set(rep1["kinds"]) == {"layers", "hidden", "rotary"}
    assert rep2["source"] == "teacher" and rep2["method"] == "obd"  # obd scores the teacher on its own output
    # whole KV groups: query heads stay 2 per KV head; the params target is approached in one cut
    assert structs[2]["heads"] == 2 * structs[2]["kv_heads"]
    assert structs[2]["kv_heads"] < 2 or structs[2]["intermediate_size"] < 64
    assert structs[2]["params"] < structs[1]["params"] and abs(structs[2]["params"] - 17000) < 2500
    # the layer map follows the cut (student block -> teacher block)
    assert len(state["layer_map"]) == 2


def test_taylor_trace_scores_along_the_re_distillation_and_restores_the_weights(tiny_teacher_dir, tmp_path,
                                                                                monkeypatch):
    """importance.method taylor_trace: the score comes from trace_steps steps of the iteration's own
    re-distillation, every unit kept; the student's weights are put back before the cut, and the probe's
    checkpoint is removed; a teacher source is refused at preflight."""
    import torch

    from distillgate.stages.prune import PruneStage

    seen = []
    orig = PruneStage._trace_scores

    def spy(self, run, it, kinds):
        before = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
        out = orig(self, run, it, kinds)
        after = run.student.state_dict()
        seen.append((all(torch.equal(before[k], after[k]) for k in before),
                     {k: float(v.min()) for k, v in out.items()}, {k: float(v.max()) for k, v in out.items()}))
        return out

    monkeypatch.setattr(PruneStage, "_trace_scores", spy)
    stages = ("[{name: anchor, iterations: 0}, {name: prune, iterations: 1, options: {cycles: 1, kinds: [heads, mlp], "
              "keep: {heads: 0.5, mlp: 0.5}, importance: {calib_tokens: 256, method: taylor_trace, trace_steps: 2}, "
              "fade_fraction: 0.0, fold_in: false, tolerance: 10.0}}]")
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages, run_id="t"), progress=False)
    assert len(seen) == 1
    restored, lo, hi = seen[0]
    assert restored and set(lo) == {"heads", "mlp"} and all(lo[k] >= 0 and hi[k] > 0 for k in lo)
    with RunStore.open(tmp_path / "runs", "t") as s:
        v1 = s.get_version(s.versions()[1]["version_id"])
        rep = json.loads(v1.path_of("prune.json").read_text())
        state = s.resolve("current").load_json("loop_state.json")
    assert rep["method"] == "taylor_trace" and rep["after"]["heads"] == 2 and rep["after"]["mlp"] == 32
    assert state["history"][1]["recipe"]["student"]["structure"]["intermediate_size"] == 32
    assert not list((tmp_path / "runs").rglob("iter-001-trace"))  # the probe's checkpoint is gone
    bad = stages.replace("trace_steps: 2", "trace_steps: 2, source: teacher")
    with pytest.raises(ConfigError, match=r"loop\.stages\[1\]\.options.*source 'student'"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs2", bad), progress=False)
