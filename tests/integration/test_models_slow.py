"""Student derivation on the real SmolLM2 teacher: derive, save, reload with plain transformers, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]



RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(out)
ids = tok("The capital of France is", return_tensors="pt").input_ids
gen = m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
print(json.dumps({"layers": m.config.num_hidden_layers, "mlp": m.config.intermediate_size,
                  "tied": m.lm_head.weight is m.model.embed_tokens.weight, "gen": gen[0].tolist(),
                  "distillgate_imported": any(k.startswith("distillgate") for k in sys.modules)}))
"""


def test_derive_smollm2_save_reload_generate(smollm2_dir, datasets_dir, tmp_path):
    from distillgate.models import load_model, save_model
    from distillgate.models.derive import calib_ids_from_text, check_not_larger, derive_student, layer_map

    lm = load_model(str(smollm2_dir))
    text = open(os.path.join(datasets_dir, "wikitext2", "valid.txt"), encoding="utf-8").read()
    ids = calib_ids_from_text(lm.tokenizer, text, n_tokens=256, seq_len=128)
    # Greedy from 30 to 28 blocks (two steps: 30 + 8 trials) with MLP 1536 -> 1024 by activation importance.
    student, rep = derive_student(lm.model, lm.tokenizer, ids, num_layers=28, mlp_width=1024,
                                  layer_selection="greedy_ppl")
    check_not_larger(lm.model, student)
    assert rep.kept_layers == [i for i in range(30) if i not in rep.dropped_layers] and len(rep.dropped_layers) == 2
    assert [t["trials"] for t in rep.greedy_trace] == [30, 8]
    assert rep.selection_ppl[rep.selection_used] <= rep.selection_ppl["block_influence"]
    assert rep.params_teacher["total"] == 134_515_008 and rep.params_student["embedding"] == 28_311_552
    assert 1.0 < rep.teacher_ppl < rep.student_ppl < 1e4 and torch.isfinite(torch.tensor(rep.student_ppl))

    out = save_model(student, lm.tokenizer, tmp_path / "student", meta={"layer_map": layer_map(rep)})
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["layers"], got["mlp"], got["tied"], got["distillgate_imported"]) == (28, 1024, True, False)
    prompt = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    ref = student.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    assert got["gen"] == ref[0].tolist() and len(got["gen"]) == prompt.shape[1] + 5
