"""The real CLI end to end on the real default teacher (SmolLM2-135M-Instruct): distill, run, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillgate.cli import main

pytestmark = pytest.mark.slow

SMALL = ["student.num_layers=4", "student.layer_selection=block_influence", "student.calib_tokens=256",
         "data.num_prompts=8", "data.max_new_tokens=16", "data.heldout_fraction=0.25", "train.steps=2",
         "train.batch_size=2", "train.warmup_steps=0", "targets.top_k=16"]


def test_distill_end_to_end_and_student_loads_without_distillgate(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "out"
    assert main(["distill", "--no-progress", f"output_dir={out}", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "student saved to" in printed and "top-1 agreement" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"]["layers"] == 4 and summary["teacher"]["layers"] == 30
    assert summary["after"]["kl"] > 0 and summary["train"]["steps"] == 2
    assert len(summary["student"]["init"]["report"]["kept_layers"]) == 4
    # plain transformers, in a fresh interpreter that never imports distillgate
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'student')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out / 'student')!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "g = m.generate(**ids, max_new_tokens=5, do_sample=False)\n"
        "assert g.shape[1] > ids['input_ids'].shape[1]\n"
        "assert 'distillgate' not in sys.modules\n"
        "print(m.config.num_hidden_layers)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("4")


def test_run_one_iteration_end_to_end_with_report(tmp_path, smollm2_dir, capsys):
    root = tmp_path / "runs"
    args = ["run", "--no-progress", f"store_root={root}", "run_id=slow", *SMALL,
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]",
            "loop.prompts_per_iteration=6", "loop.heldout_prompts=3", "loop.perf_lengths=[16]", "loop.perf_repeats=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trajectory" in printed and "report:" in printed
    report = root / "slow" / "report.html"
    assert report.is_file() and report.stat().st_size > 100_000
    assert main(["runs", "show", "slow", "--root", str(root)]) == 0


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for bad, field in ((["loss.temperature.value=0"], "loss.temperature.value"), (["loss.beta=1.5"], "loss.beta"),
                       (["train.lr=-1"], "train.lr"), (["trian.steps=3"], "trian"),
                       (["student.num_layers=40"], "student.num_layers"),
                       (["data.source=jsonl", f"data.path={tmp_path / 'none.jsonl'}"], "data.path")):
        assert main(["distill", f"output_dir={out}", *bad]) == 2
        err = capsys.readouterr().err
        assert field in err, (bad, err)
        assert not out.exists()
