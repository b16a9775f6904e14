"""`distillgate gates` on the real SmolLM2 teacher vs a student sliced from its layers (no training)."""

import copy
import json
import os
import re

import pytest

from distillgate.cli import main

pytestmark = pytest.mark.slow


def slice_layers(model, keep: list[int]):
    """A plain HF model holding only the decoder blocks ``keep`` of ``model`` (renumbered 0..len-1)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(cfg)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for k, v in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m is None:
            state[k] = v
        elif int(m.group(1)) in new_index:
            state[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = v
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing)
    student.tie_weights()
    return student.eval()


def test_gates_smollm2_vs_sliced_student(tmp_path, smollm2_dir, datasets_dir):
    from distillgate.models import load_model, save_model

    t = load_model(str(smollm2_dir))
    n = t.model.config.num_hidden_layers
    student = slice_layers(t.model, [0, 1, n - 2, n - 1])
    sdir = save_model(student, t.tokenizer, tmp_path / "student")
    out = tmp_path / "gates.json"
    rc = main(["gates", "--student", str(sdir), "--teacher", str(smollm2_dir),
               "--ppl-text", os.path.join(datasets_dir, "wikitext2", "valid.txt"), "--ppl-tokens", "256",
               "--lengths", "32,96", "--repeats", "2", "--context-len", "64",
               "--skip", "latency_volatility_ratio,f1_gap_points,inheritance,path_consistency",
               "--json", str(out)])
    rep = json.loads(out.read_text())
    gates = {g["id"]: g for g in rep["gates"]}
    assert rc == 1 and not rep["all_passed"]
    # an untrained 4-of-30-layer student is far worse at language modelling
    assert gates["G-C1"]["status"] == "fail" and gates["G-C1"]["value"] > 1.5
    ppl = rep["details"]["measurements"]["ppl_ratio"]
    assert ppl["teacher"]["n_tokens"] == ppl["student"]["n_tokens"] == 255
    # ... but much faster and smaller
    assert 0 < gates["G-P1"]["value"] < 0.65 and gates["G-P1"]["status"] == "pass"
    assert 0 < gates["G-P3"]["value"] < 1
    mem = rep["details"]["measurements"]["perf"]["memory"]
    assert mem["teacher"]["kv_cache_bytes"] == 2 * 30 * 3 * 64 * 64 * 4  # 30 layers, 3 KV heads, head_dim 64
    assert mem["student"]["kv_cache_bytes"] == mem["teacher"]["kv_cache_bytes"] * 4 // 30
    for gid in ("G-P2", "G-C2", "G-C3", "G-C4"):  # skipped -> missing -> counted as failures
        assert gates[gid]["status"] == "missing" and "skipped" in gates[gid]["note"] and gates[gid]["counted"]
    assert gates["G-P4"]["status"] == "not_measured" and gates["G-B1a"]["status"] == "not_measured"
    assert rep["dimensions"]["capability"]["status"] == "fail"
    assert rep["dimensions"]["business"]["status"] == "no_score"
