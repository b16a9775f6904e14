import json

import torch

from distillgate.cli import main
from distillgate.data.prompts import builtin_prompts, load_jsonl_prompts


def test_prompts_only_round_trips_through_jsonl(tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    assert main(["data", "generate", "--prompts-only", "data.num_prompts=10", "data.seed=4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and {"id", "prompt", "domain", "level", "complexity"} <= set(rows[0])
    assert [p.id for p in load_jsonl_prompts(out)] == [p.id for p in builtin_prompts(10, seed=4)]
    assert main(["data", "generate", "--prompts-only", "data.domains=[astrology]"]) == 2
    assert "data.domains" in capsys.readouterr().err


def test_generate_prints_counts_and_reuses(tmp_path, tiny_teacher_dir, capsys):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine: see test_data_generate
    try:
        args = ["data", "generate", f"teacher.path={tiny_teacher_dir}", "data.num_prompts=4", "data.max_new_tokens=3",
                "data.heldout_fraction=0.25", "--root", str(tmp_path), "--no-progress"]
        assert main(args) == 0
        first = capsys.readouterr().out
        assert "saved:" in first and "heldout" in first and "answer tokens" in first
        assert main(args) == 0
        saved = [line for line in capsys.readouterr().out.splitlines() if "saved:" in line]
        assert saved and saved[0].split()[1] in first and len(list(tmp_path.iterdir())) == 1
    finally:
        torch.set_num_threads(n)
