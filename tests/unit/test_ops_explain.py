"""G-O4 explanations: attribution against a hand-computed ablation, the automatic spot check, the human
workflow (export -> verdicts -> import, bad CSVs) and the gate provider's provenance."""

import csv
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from distillgate.errors import InputError
from distillgate.ops.explain import (ExplainOptions, Span, answer_logprobs, delete_spans, encode, explain,
                                     split_spans, split_steps, spot_check)
from distillgate.ops.explain_review import export, read_verdicts, spot_check_provider

PROMPTS = ["The invoice from Acme was issued on March 3 for 400 EUR, and the approval limit is 1000 EUR. "
           "Should we pay it?",
           "Booking made on June 1; the trip is on June 20. Policy: book at least 14 days ahead. Is it allowed?",
           "The patient has a mild fever, a cough and no allergies; the pharmacist checks the dose first."]
ANSWER = "Yes, pay it. The amount is within the limit."


class BagLM(nn.Module):
    """A causal LM whose logits at t are U (sum of the embeddings of tokens <= t), the pad token's embedding 0:
    deleting a span removes exactly its tokens' embeddings, so an ablation is computable by hand."""

    def __init__(self, vocab: int, pad: int, dim: int = 16, scale: float = 0.3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb, self.U = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g) * scale)
            self.emb.weight[pad] = 0
            self.U.weight.copy_(torch.randn(vocab, dim, generator=g) * scale)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None):
        e = self.emb(input_ids)
        if attention_mask is not None:
            e = e * attention_mask[..., None]
        return SimpleNamespace(logits=self.U(e.cumsum(1)))

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, **_):
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, self(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        return ids


@pytest.fixture(scope="module")
def bag(tiny_tokenizer):
    return BagLM(len(tiny_tokenizer), tiny_tokenizer.pad_token_id)


def _hand_deletion_drops(model, tok, prompt, spans):
    """log p(answer | prompt) - log p(answer | prompt without span j), by hand: sum of the answer's token
    log-probs from the model's logits on the re-tokenised prompt."""
    def lp(text):
        ids, n_ctx, _, _ = encode(tok, text, ANSWER)
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].double()
        return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(n_ctx, len(ids)))
    full = lp(prompt)
    return [full - lp(delete_spans(prompt, [s])) for s in spans]


def test_spans_and_steps_are_verbatim_and_partition():
    spans = split_spans(PROMPTS[0], max_words=4)
    assert all(PROMPTS[0][s.start:s.end] == s.text and len(s.text.split()) <= 4 for s in spans)
    assert [s.text for s in spans[:3]] == ["The invoice from Acme", "was issued on March", "3 for 400 EUR,"]
    steps = split_steps("Yes. The amount is within the limit; pay it now. Done", max_steps=8)
    assert [s.text for s in steps] == ["Yes.", "The amount is within the limit; pay it now.", "Done"]
    assert [s.text for s in split_steps("A. B. C. D.", max_steps=2)] == ["A.", "B. C. D."]
    assert delete_spans("a b c d", [Span(2, 3, "b")]) == "a c d"


@pytest.mark.parametrize("method", ["ig", "gxi"])
def test_attribution_ranks_spans_as_hand_computed_deletion(bag, tiny_tokenizer, one_thread, method):
    for prompt in PROMPTS:
        ex = explain(bag, tiny_tokenizer, prompt, ANSWER, options=ExplainOptions(method=method))
        drops = _hand_deletion_drops(bag, tiny_tokenizer, prompt, ex.spans)
        rho = spearmanr(ex.span_scores, drops)[0]
        assert rho > 0.8, (prompt, rho)
        top = max(range(len(drops)), key=lambda j: ex.span_scores[j])
        assert drops[top] >= sorted(drops)[-2]  # the top-attributed span is one of the two largest deletions
        # the whole answer's attribution is the sum of its steps' (IG and gxi are linear in the target)
        assert math.isclose(ex.answer_logprob, answer_logprobs(bag, tiny_tokenizer, [prompt], ANSWER)[0],
                            rel_tol=1e-4)
        if method == "ig":
            assert ex.meta["ig_max_convergence_delta"] < 0.01


def test_ig_on_tiny_llama_agrees_with_token_replacement(tiny_model_factory, tiny_tokenizer, one_thread):
    """On the random tiny Llama, IG's span scores follow replacing the span's tokens by the baseline (pad)
    token, the ablation IG integrates towards."""
    from distillgate.ops.explain import _owner

    model, tok, rhos = tiny_model_factory(seed=0).eval(), tiny_tokenizer, []
    for prompt in PROMPTS:
        ex = explain(model, tok, prompt, ANSWER, options=ExplainOptions(method="ig", n_steps=16))
        ids, n_ctx, p_end, _ = encode(tok, prompt, ANSWER)
        owner = _owner(p_end + [None] * (len(ids) - n_ctx), ex.spans)

        def lp(x):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
            return float(logp[n_ctx - 1:-1].gather(-1, ids[n_ctx:, None]).sum())
        full, drops = lp(ids), []
        for j in range(len(ex.spans)):
            x = ids.clone()
            x[[t for t, o in enumerate(owner) if o == j]] = tok.pad_token_id
            drops.append(full - lp(x))
        rhos.append(spearmanr(ex.span_scores, drops)[0])
    assert sum(rhos) / len(rhos) > 0.6, rhos


def test_spot_check_passes_flags_bad_quotes_and_weak_premises(bag, tiny_tokenizer, one_thread):
    ex = explain(bag, tiny_tokenizer, PROMPTS[1], ANSWER)
    res = spot_check(bag, tiny_tokenizer, ex)
    assert res["passed"], res["reasons"]
    assert res["drop_premises"] > max(res["drop_random"][:4]) or res["beaten"] >= 4
    # a quote that is not in the prompt
    ex.premises[0].quote = "issued in May"
    res = spot_check(bag, tiny_tokenizer, ex)
    assert not res["passed"] and "premise 1 'issued in May' is not verbatim" in res["reasons"][0]
    # premises that the answer does not rest on: the spans with the lowest attribution
    ex = explain(bag, tiny_tokenizer, PROMPTS[1], ANSWER)
    low = sorted(range(len(ex.spans)), key=lambda j: ex.span_scores[j])[:len(ex.premises)]
    for p, j in zip(ex.premises, low):
        p.span, p.quote, p.start, p.end = j, ex.spans[j].text, ex.spans[j].start, ex.spans[j].end
    res = spot_check(bag, tiny_tokenizer, ex)
    assert not res["passed"] and "random same-length deletions" in res["reasons"][0]


def test_empty_generated_answer_fails_its_check(tiny_model_factory, tiny_tokenizer, one_thread):
    model = tiny_model_factory(seed=0)  # a random tiny Llama answers only newlines
    ex = explain(model, tiny_tokenizer, PROMPTS[0], None, options=ExplainOptions(max_new_tokens=4))
    assert ex.answer == "" and spot_check(model, tiny_tokenizer, ex)["reasons"] == [
        "the model's answer is empty: nothing to explain"]
    with pytest.raises(InputError, match="answer is empty"):
        explain(model, tiny_tokenizer, PROMPTS[0], "  ")


def _export(bag, tok, tmp_path, n=3):
    exs = [explain(bag, tok, p, ANSWER, id=f"e{i}") for i, p in enumerate(PROMPTS[:n])]
    for e in exs:
        spot_check(bag, tok, e)
    return exs, export(exs, tmp_path / "review", "bag-lm")


def _fill(path, verdicts):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r, v in zip(rows, verdicts):
        r["verdict"] = v
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_export_import_round_trip(bag, tiny_tokenizer, tmp_path, one_thread):
    from scipy.stats import binomtest

    exs, paths = _export(bag, tiny_tokenizer, tmp_path)
    html = open(paths["html"], encoding="utf-8").read()
    with_premises = [e for e in exs if e.premises]
    assert with_premises and all(f"{e.premises[0].quote}<sup>[1]</sup></mark>" in html for e in with_premises)
    assert html.count("Reasoning chain") == 3
    rows = _fill(paths["csv"], ["pass", " PASS ", "fail"])
    assert [r["id"] for r in rows] == ["e0", "e1", "e2"] and rows[0]["model"] == "bag-lm"
    assert rows[0]["prompt"] == PROMPTS[0] and rows[0]["answer"] == ANSWER
    assert rows[0]["premises"] == " | ".join(f'[{i + 1}] "{p.quote}"' for i, p in enumerate(exs[0].premises))
    assert rows[0]["steps"].startswith("1. Yes, pay it. (rests on ")
    assert len(rows[0]["confidences"].split("; ")) == len(exs[0].steps)
    s = read_verdicts(paths["csv"])
    ci = binomtest(2, 3).proportion_ci(method="wilson")
    assert (s.n, s.passed, s.unreviewed) == (3, 2, 0) and s.pct == pytest.approx(200 / 3)
    assert s.ci95 == pytest.approx((100 * ci.low, 100 * ci.high))


def test_bad_verdict_csv_errors_name_row_and_column(bag, tiny_tokenizer, tmp_path, one_thread):
    _, paths = _export(bag, tiny_tokenizer, tmp_path)
    _fill(paths["csv"], ["pass", "maybe", ""])
    with pytest.raises(InputError) as e:
        read_verdicts(paths["csv"])
    msg = str(e.value)
    assert "2 bad cell(s)" in msg and "row 2 (line" in msg and "id 'e1'), column 'verdict': 'maybe' is not one of " \
        "pass, fail" in msg and "row 3" in msg and "--allow-unreviewed" in msg
    _fill(paths["csv"], ["pass", "fail", ""])
    s = read_verdicts(paths["csv"], allow_unreviewed=True)
    assert (s.n, s.passed, s.unreviewed) == (2, 1, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,answer\ne0,x\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['verdict'\]"):
        read_verdicts(bad)
    bad.write_text("id,verdict\ne0,pass\ne0,fail\n,pass\n")
    with pytest.raises(InputError, match=r"row 2 \(line 3, id 'e0'\), column 'id': 'e0' repeats row 1.*row 3"):
        read_verdicts(bad)
    with pytest.raises(InputError, match="verdict file not found"):
        read_verdicts(tmp_path / "nope.csv")


def test_provider_provenance_human_and_automatic(bag, tiny_tokenizer, tmp_path, one_thread):
    from distillgate.evaluate.providers import GateContext
    from distillgate.gates import evaluate_gates, load_gate_spec

    spec = load_gate_spec(None)
    _, paths = _export(bag, tiny_tokenizer, tmp_path)
    _fill(paths["csv"], ["pass", "pass", "pass"])
    ctx = GateContext(options={"explanation_verdicts": paths["csv"]})
    v = spot_check_provider(ctx)
    d = ctx.details["explanation_spot_check_pct"]
    assert v == 100.0 and d["provenance"] == "human spot check, n=3" and d["kind"] == "human"
    rep = evaluate_gates(spec, {"explanation_spot_check_pct": v, **ctx.extra},
                         provenance={"explanation_spot_check_pct": d["provenance"]},
                         sizes={"explanation_spot_check_pct": d["size"]})
    g = next(g for g in rep.gates if g.id == "G-O4")
    assert g.status == "pass" and g.uncertain and g.ci95[0] < 96.8 < g.ci95[1]  # n=3 cannot show 96.8%
    assert "3/n.s. explanations" in g.note and g.provenance == "human spot check, n=3"
    from rich.console import Console
    con = Console(width=250, record=True)
    con.print(rep.format_table())
    text = con.export_text()
    assert "human spot check, n=3" in text and "human spot check, n=3 traffic" not in text
    from distillgate.report.html import _provenance
    assert _provenance(g).endswith(">human spot check, n=3</span> ")

    # automatic: the student (here the bag LM) explains the built-in probe prompts itself
    student = SimpleNamespace(model=bag, tokenizer=tiny_tokenizer, fingerprint=None)
    ctx = GateContext.with_models(student, student, {"explain_prompts": 2})
    v = spot_check_provider(ctx)
    d = ctx.details["explanation_spot_check_pct"]
    assert d["provenance"] == "automatic spot check, n=2" and d["kind"] == "automatic" and v in (0.0, 50.0, 100.0)
    assert ctx.extra["explanation_spot_check_pct/ci_high"] <= 100.0
    # nothing to measure with: not measured, with the reason
    ctx = GateContext()
    assert spot_check_provider(ctx) is None and "--explanation-verdicts" in ctx.details[
        "explanation_spot_check_pct"]["note"]


def test_cli_export_and_import(tiny_student_dir, tmp_path, one_thread, capsys):
    import json

    from distillgate.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": ANSWER}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "out"
    assert main(["explain", "export", str(tiny_student_dir), "--prompts", str(prompts), "--out", str(out),
                 "--method", "gxi"]) == 0
    assert "automatic spot check:" in capsys.readouterr().out
    _fill(out / "explanations.csv", ["pass", "fail"])
    assert main(["explain", "import", str(out / "explanations.csv")]) == 0
    assert "1/2 explanations pass the human spot check: 50.0%" in capsys.readouterr().out
    _fill(out / "explanations.csv", ["yes", "fail"])
    assert main(["explain", "import", str(out / "explanations.csv")]) == 2
    assert "column 'verdict': 'yes'" in capsys.readouterr().err.replace("\n", "")
    assert main(["explain", "export", str(tmp_path / "no-such-run"), "--out", str(out)]) == 2
    # the gates command reads the verdicts before it loads or measures anything
    assert main(["gates", "--student", str(tiny_student_dir), "--teacher", str(tiny_student_dir),
                 "--explanation-verdicts", str(out / "explanations.csv")]) == 2
    assert "'yes' is not one of pass, fail" in capsys.readouterr().err.replace("\n", "")
