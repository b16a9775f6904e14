"""`distillgate profile` on the real teacher, with a student diff against the saved profile."""

import json

import pytest

from distillgate.cli import main

pytestmark = pytest.mark.slow


def test_profile_teacher_then_student_against_it(tmp_path, smollm2_dir, datasets_dir, capsys):
    text = f"{datasets_dir}/wikitext2/valid.txt"
    prof = tmp_path / "teacher-profile"
    assert main(["profile", "--model", "default", "--text", text, "--tokens", "512", "--seq-len", "128",
                 "--suite", "quick", "--limit", "40", "--data-dir", datasets_dir, "--out", str(prof),
                 "--json", str(tmp_path / "t.json")]) == 0
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["meta"]["num_layers"] == 30 and len(d["layers"]) >= 20
    lens = d["layers"]["lens_top1"]
    assert lens[-1] == pytest.approx(1.0) and lens[0] < 0.5  # the logit lens sharpens with depth
    blimp = [v for k, v in d["scores"].items() if "blimp" in k and "acc" in k]
    assert blimp and all(v > 0.6 for v in blimp), d["scores"]
    # a 6-layer student of the teacher, diffed through its layer map
    student = tmp_path / "student"
    assert main(["models", "derive", "--teacher", "default", "--num-layers", "6", "--selection", "block_influence",
                 "--calib-file", text, "--out", str(student)]) == 0
    capsys.readouterr()
    assert main(["profile", "--model", str(student), "--text", text, "--tokens", "512", "--seq-len", "128",
                 "--against", str(prof), "--json", str(tmp_path / "diff.json")]) == 0
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert len(diff["layer_map"]) == 6 and max(diff["layer_map"]) <= 29
    assert "mean |delta|" in capsys.readouterr().out
