"""Multiple-choice scoring (packed, shared-prefix) against a direct per-request loop, and the loaders."""

import json
import random

import pytest
import torch

from distillgate.errors import InputError
from distillgate.evaluate.choice import MCDoc, evaluate_mc, load_copa, load_jsonl_mc, load_mmlu
from distillgate.evaluate.scoring import encode_pair, score_requests

COPA_XML = """<?xml version="1.0" encoding="UTF-8"?>
<copa-corpus version="1.0">
  <item id="1" asks-for="cause" most-plausible-alternative="1">
    <p>My body cast a shadow over the grass.</p><a1>The sun was rising.</a1><a2>The grass was cut.</a2>
  </item>
  <item id="2" asks-for="effect" most-plausible-alternative="2">
    <p>The driver turned on the car's headlights.</p><a1>He heard the engine.</a1><a2>The road was lit.</a2>
  </item>
</copa-corpus>
"""


def _direct(model, ctx, cont):
    """Sum of log p(cont | ctx) in float64, one unpadded forward per request."""
    with torch.no_grad():
        lp = torch.log_softmax(model.double()(torch.tensor([ctx + cont])).logits[0].double(), -1)
    model.float()
    return sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_requests_matches_direct_loop(tiny_model_factory, shared, batch_size):
    model = tiny_model_factory()
    rng = random.Random(0)
    prefix = [rng.randrange(4, 380) for _ in range(40)] if shared else []
    docs = [(prefix + [rng.randrange(4, 380) for _ in range(rng.randint(1, 8))],
             [[rng.randrange(4, 380) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 4))])
            for _ in range(7)]
    out = score_requests(model, docs, batch_size=batch_size, shared_prefix_min=32)
    for (ctx, conts), scores in zip(docs, out):
        assert len(scores) == len(conts)
        for cont, s in zip(conts, scores):
            assert s.logprob == pytest.approx(_direct(model, ctx, cont), abs=2e-4)
            assert s.n_tokens == len(cont)


def test_greedy_flag(tiny_model_factory):
    model = tiny_model_factory()
    ctx = [10, 20, 30]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    (greedy, other), = score_requests(model, [(ctx, [[nxt], [nxt + 1]])])
    assert greedy.is_greedy and not other.is_greedy


def test_encode_pair_matches_lm_eval_rules(tiny_tokenizer):
    tok = tiny_tokenizer
    ctx, cont = encode_pair(tok, "The cat sat ", "on the mat")    # trailing space moves to the continuation
    assert ctx == tok.encode("The cat sat") and ctx + cont == tok.encode("The cat sat on the mat")
    ctx, cont = encode_pair(tok, "", "The cat")                  # empty context: BOS conditions
    assert ctx == [tok.bos_token_id] and cont == tok.encode("The cat", add_special_tokens=False)


def test_evaluate_mc_acc_and_acc_norm_vs_direct(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    docs = [MCDoc("The contract terminates on", [" Monday", " 31 December unless notice", " the mat"], 1, "a"),
            MCDoc("Please summarise the", [" patient", " laptop battery"], 0, "b"),
            MCDoc("A cat sat on the", [" mat.", " flight", " refund"], 0, "c")]
    r = evaluate_mc(model, tiny_tokenizer, docs, batch_size=4)
    for d, pd in zip(docs, r["per_doc"]):
        lls = [_direct(model, *encode_pair(tiny_tokenizer, d.context, " " + c)) for c in d.choices]
        assert pd["loglikelihoods"] == pytest.approx(lls, abs=2e-4)
        assert pd["pred"] == max(range(len(lls)), key=lls.__getitem__)
        assert pd["pred_norm"] == max(range(len(lls)), key=lambda j: lls[j] / len(d.choices[j]))
    assert r["acc"] == sum(p["pred"] == d.gold for p, d in zip(r["per_doc"], docs)) / 3
    assert r["acc_norm"] == sum(p["pred_norm"] == d.gold for p, d in zip(r["per_doc"], docs)) / 3
    assert r["n"] == 3


def test_load_copa_matches_lm_eval_super_glue_format(tmp_path):
    from lm_eval.tasks.super_glue.copa import utils as copa_utils

    f = tmp_path / "copa.xml"
    f.write_text(COPA_XML)
    docs = load_copa(f)
    hf_rows = [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
                "choice2": "The grass was cut.", "question": "cause", "label": 0},
               {"premise": "The driver turned on the car's headlights.", "choice1": "He heard the engine.",
                "choice2": "The road was lit.", "question": "effect", "label": 1}]
    for d, row in zip(docs, hf_rows):
        assert d.context == copa_utils.doc_to_text(row)
        assert d.choices == copa_utils.doc_to_choice(row)
        assert d.gold == row["label"]
    assert [d.doc_id for d in docs] == ["copa-1", "copa-2"] and len(load_copa(f, limit=1)) == 1


def test_load_copa_rejects_bad_label(tmp_path):
    f = tmp_path / "copa.xml"
    f.write_text(COPA_XML.replace('most-plausible-alternative="2"', 'most-plausible-alternative="3"'))
    with pytest.raises(InputError, match="item 2"):
        load_copa(f)


def test_load_mmlu_prompt(tmp_path):
    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    (tmp_path / "mmlu" / "test").mkdir()
    (tmp_path / "mmlu" / "dev" / "toy_subject_dev.csv").write_text("Q1?,a,b,c,d,A\n\"Q2, with comma?\",e,f,g,h,C\n")
    (tmp_path / "mmlu" / "test" / "toy_subject_test.csv").write_text("T1?,w,x,y,z,D\n")
    d, = load_mmlu(tmp_path, "toy_subject", num_fewshot=5)
    assert d.context == ("The following are multiple choice questions (with answers) about toy subject.\n\n"
                         "Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
                         "Q2, with comma?\nA. e\nB. f\nC. g\nD. h\nAnswer: C\n\n"
                         "T1?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert d.choices == ["A", "B", "C", "D"] and d.gold == 3
    with pytest.raises(InputError, match="not found"):
        load_mmlu(tmp_path, "nope")


def test_load_jsonl_mc(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "2+2=", "choices": ["3", "4"], "label": "4"}) + "\n\n"
                 + json.dumps({"context": "Sky is", "choices": ["blue", "green"], "label": 0, "id": "x"}) + "\n")
    docs = load_jsonl_mc(f)
    assert [d.gold for d in docs] == [1, 0] and docs[1].doc_id == "x"
    f.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(InputError, match="mc.jsonl:1: label 5"):
        load_jsonl_mc(f)
