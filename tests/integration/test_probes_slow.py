"""G-C2 probes on the real SmolLM2-135M teacher over small slices of the shared evaluation data."""

import math

import pytest

from distillgate.evaluate.probes import f1_gap, probe_suite


@pytest.mark.slow
def test_smollm2_probe_scores_plausible(smollm2_dir, datasets_dir, tmp_path, monkeypatch):
    from distillgate.models import load_model

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    lm = load_model(str(smollm2_dir))
    # Two candidate layers keep it short; the CPU preset (400/400/300, 4 candidate layers) is a few minutes.
    r = probe_suite(lm.model, lm.tokenizer, datasets_dir, limit_sentences=80, blimp_pairs=60, seed=0,
                    layers=[15, 21], cache=True, fingerprint=lm.fingerprint)
    s = r["scores"]
    assert r["n"]["pos"]["test"] == 16 and r["n"]["grammaticality"] == {"pairs": 60}
    assert s["pos_micro_f1"] > 0.7, s        # UPOS from frozen states (majority tag NOUN is ~0.17)
    assert s["deprel_micro_f1"] > 0.45, s
    assert s["uas"] > 0.25, s                # above chance (1 / ~15 candidate heads)
    assert s["ner_f1"] > 0.0, s
    assert s["grammaticality_accuracy"] > 0.6 and s["grammaticality_f1"] == s["grammaticality_accuracy"], s
    assert set(r["layers"].values()) <= {15, 21}
    again = probe_suite(lm.model, lm.tokenizer, datasets_dir, limit_sentences=80, blimp_pairs=60, seed=0,
                        layers=[15, 21], cache=True, fingerprint=lm.fingerprint)
    assert again["cached"] and again["scores"] == s
    gap = f1_gap(r, again)
    assert gap["f1_gap_points"] == 0.0 and all(math.isfinite(v) for v in gap["per_task_gap_points"].values())
