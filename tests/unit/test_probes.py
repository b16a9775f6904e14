"""G-C2 probes: readers, word alignment, linear and bilinear probes, metrics, the suite, the gap, the cache."""

import json
import math

import pytest
import torch

from distillgate.errors import InputError
from distillgate.evaluate import probes
from distillgate.evaluate.probes import (Sentence, default_layers, f1_gap, grammaticality_f1, label_f1,
                                         predict_heads, probe_suite, read_conll, read_conllu, read_minimal_pairs,
                                         sample_split, train_head_probe, train_linear_probe, word_features,
                                         word_last_tokens)

CONLLU = """# sent_id = 1
# text = I'm home.
1-2\tI'm\t_\t_\t_\t_\t_\t_\t_\t_
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2\t'm\tbe\tAUX\tVBP\t_\t3\tcop\t_\t_
3\thome\thome\tNOUN\tNN\t_\t0\troot\t_\t_
3.1\tis\tbe\tAUX\t_\t_\t_\t_\t3:cop\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
2\tthere\tthere\tADV\tRB\t_\t1\tnmod:npmod\t_\t_
"""


def test_read_conll_and_errors(tmp_path):
    p = tmp_path / "ner.conll"
    p.write_text("Paris\tB-location\nis\tO\n\n\nNew\tB-location\nYork\tI-location\n")
    sents = read_conll(p)
    assert [s.words for s in sents] == [["Paris", "is"], ["New", "York"]]
    assert sents[1].tags == ["B-location", "I-location"]
    p.write_text("Paris\tB-location\nis O\n")
    with pytest.raises(InputError, match=r"ner\.conll:2: expected 'token<TAB>BIO-tag'"):
        read_conll(p)
    p.write_text("Paris\tLOC\n")
    with pytest.raises(InputError, match=r"ner\.conll:1:"):
        read_conll(p)


def test_read_conllu_skips_ranges_and_empty_nodes(tmp_path):
    p = tmp_path / "ud.conllu"
    p.write_text(CONLLU)
    a, b = read_conllu(p)
    assert a.words == ["I", "'m", "home", "."] and a.tags == ["PRON", "AUX", "NOUN", "PUNCT"]
    assert a.heads == [3, 3, 0, 3] and a.deprels == ["nsubj", "cop", "root", "punct"]
    assert b.deprels == ["root", "nmod"]   # subtype stripped
    lines = CONLLU.splitlines()
    lines[5] = "3\thome\thome\tNOUN\tNN\t_"   # 6 columns on file line 6
    p.write_text("\n".join(lines))
    with pytest.raises(InputError, match=r"ud\.conllu:6: expected 10 tab-separated"):
        read_conllu(p)
    lines = CONLLU.splitlines()
    lines[3] = lines[3].replace("\t3\tnsubj", "\t9\tnsubj")
    p.write_text("\n".join(lines))
    with pytest.raises(InputError, match=r"ud\.conllu:4: sentence has HEAD 9"):
        read_conllu(p)


def test_read_minimal_pairs_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"sentence_good": "A.", "sentence_bad": "B.", "UID": "u"}\n{"sentence_good": "A."}\n')
    assert read_minimal_pairs([p], limit=1) == [("A.", "B.", "u")]
    with pytest.raises(InputError, match=r"x\.jsonl:2: needs non-empty string fields"):
        read_minimal_pairs([p])


def test_sample_split_is_seeded_and_disjoint():
    sents = [Sentence([f"w{i}"] * (1 + i % 5)) for i in range(50)] + [Sentence(["x"] * 100)]
    a, b = sample_split(sents, 20, seed=3, max_words=64), sample_split(sents, 20, seed=3, max_words=64)
    assert {k: len(v) for k, v in a.items()} == {"train": 12, "dev": 4, "test": 4}
    assert a == b and sample_split(sents, 20, seed=4) != a
    ids = [id(s) for v in a.values() for s in v]
    assert len(set(ids)) == 20 and all(len(s.words) <= 64 for v in a.values() for s in v)


def test_word_last_tokens_tiny_tokenizer(tiny_tokenizer):
    words = ["The", "quarterly", "report", "grew", "12", "percent", "!"]
    ids, last = word_last_tokens(tiny_tokenizer, words)
    assert ids[0] == tiny_tokenizer.bos_token_id and len(last) == len(words)
    assert last == sorted(last) and len(set(last)) == len(last) and last[-1] == len(ids) - 1
    prev = 0
    for w, pos in zip(words, last):   # tokens after the previous word's last token spell this word
        assert tiny_tokenizer.decode(ids[prev + 1:pos + 1]).strip() == w
        prev = pos


def test_word_features_batching_matches_single(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory(num_layers=2).eval()
    sents = [["a", "cat", "sat"], ["The", "flight", "to", "Lisbon", "departs", "at", "9:40"], ["Hi"]]
    batched = word_features(model, tiny_tokenizer, sents, [1, 2], batch_tokens=64)
    assert batched[2].shape == (11, 32) and batched[2].dtype == torch.float32
    single = word_features(model, tiny_tokenizer, sents[1:2], [1, 2])
    torch.testing.assert_close(batched[2][3:10], single[2], atol=1e-5, rtol=1e-5)
    ids, last = word_last_tokens(tiny_tokenizer, sents[0])
    hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(batched[1][:3], hs[1][0, last], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="probe layers"):
        word_features(model, tiny_tokenizer, sents, [3])


def test_default_layers():
    assert default_layers(30) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert default_layers(15) == [2, 4, 6, 8, 10, 12, 14, 15]
    assert default_layers(2) == [1, 2]


def test_linear_probe_separable_reaches_f1_one():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.arange(200) % 5
    x = centers[y] + 0.3 * torch.randn(200, 16, generator=g)
    w, b = train_linear_probe(x[:150], y[:150], 5, l2=1e-4)
    pred = (x[150:] @ w + b).argmax(-1)
    r = label_f1([str(v) for v in y[150:].tolist()], [str(v) for v in pred.tolist()])
    assert r == {"macro_f1": 1.0, "micro_f1": 1.0}


def _tree_features(n_sent: int, seed: int, L: int = 6):
    """Words carry one-hot(position) and one-hot(head position; slot 0 = ROOT): heads bilinearly recoverable."""
    g = torch.Generator().manual_seed(seed)
    hs, heads, lens = [], [], []
    for _ in range(n_sent):
        n = int(torch.randint(2, L + 1, (1,), generator=g))
        root = int(torch.randint(1, n + 1, (1,), generator=g))
        hd = [0 if i == root else int(torch.randint(1, n, (1,), generator=g)) for i in range(1, n + 1)]
        hd = [h + (h >= i) if h else 0 for i, h in zip(range(1, n + 1), hd)]   # never the word itself
        f = torch.zeros(n, 2 * L + 1)
        f[torch.arange(n), torch.arange(n)] = 1
        f[torch.arange(n), L + torch.tensor(hd)] = 1
        hs.append(f)
        heads.append(torch.tensor(hd))
        lens.append(n)
    h, mask = probes._pad(torch.cat(hs), lens)
    return h, mask, probes._pad(torch.cat(heads), lens)[0]


def test_bilinear_head_probe_recovers_heads():
    h, mask, heads = _tree_features(60, seed=0)
    p = train_head_probe(h, mask, heads, rank=16, l2=1e-4, max_iter=200, seed=0)
    ht, mt, yt = _tree_features(30, seed=1)
    pred = predict_heads(p, ht, mt)
    assert (pred == yt)[mt].float().mean().item() == 1.0
    assert (pred[~mt] == 0).all()


def test_label_f1_hand_computed():
    r = label_f1(["A", "A", "B", "C"], ["A", "B", "B", "B"])
    # A: tp1 fn1 -> 2/3; B: tp1 fp2 -> 0.5; C: fn1 -> 0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3) and r["micro_f1"] == 0.5


def test_grammaticality_f1_constructed():
    r = grammaticality_f1([-1.0, -2.0, -5.0, -3.0], [-2.0, -1.0, -6.0, -3.0], ["a", "a", "b", "b"])
    # pair 0 right, pair 1 wrong, pair 2 right, pair 3 tie (wrong): TP 2, FP 2, FN 2
    assert r["f1"] == pytest.approx(0.5) and r["accuracy"] == 0.5 and r["n"] == 4
    assert r["per_paradigm"]["a"]["f1"] == 0.5 and r["per_paradigm"]["b"]["accuracy"] == 0.5


def test_f1_gap_arithmetic():
    base = {"data_sha256": {"f": "x"}, "settings": {"seed": 0, "layers": [3, 6]}}
    t = {**base, "scores": {"grammaticality_f1": 0.80, "ner_f1": 0.40, "uas": 0.70, "deprel_micro_f1": 0.85,
                            "pos_micro_f1": 0.9}}
    s = {**base, "settings": {"seed": 0, "layers": [2, 4]},
         "scores": {"grammaticality_f1": 0.79, "ner_f1": 0.41, "uas": 0.68, "deprel_micro_f1": 0.845,
                    "pos_micro_f1": 0.5}}
    with pytest.raises(InputError, match="no test size"):
        f1_gap(t, s)
    t["n"] = {"grammaticality": {"pairs": 300}, "ner": {"test_entities": 100, "test_words": 900},
              "uas": {"test_words": 1000}, "deprel": {"test_words": 1000}}
    g = f1_gap(t, s)
    # normal approximation of two independent proportions, by hand (z = 1.959964)
    se = 100 * math.sqrt((0.8 * 0.2 + 0.79 * 0.21) / 300)
    assert g["family_ci95"]["grammaticality"] == pytest.approx([1.0 - 1.959964 * se, 1.0 + 1.959964 * se])
    assert g["family_n"] == {"grammaticality": 300, "ner": 100, "dependency": 1000}
    se_ner = 100 * math.sqrt((0.4 * 0.6 + 0.41 * 0.59) / 100)   # entities, not words
    assert g["family_ci95"]["ner"][1] == pytest.approx(-1.0 + 1.959964 * se_ner)
    assert g["ci95"] == pytest.approx([max(c[0] for c in g["family_ci95"].values()),
                                       max(c[1] for c in g["family_ci95"].values())])
    assert g["ci95"][0] < g["f1_gap_points"] < g["ci95"][1]
    assert g["per_task_gap_points"]["ner_f1"] == pytest.approx(-1.0)
    assert g["family_gap_points"] == pytest.approx({"grammaticality": 1.0, "ner": -1.0, "dependency": 2.0})
    assert g["f1_gap_points"] == pytest.approx(2.0) and g["worst_family"] == "dependency"
    with pytest.raises(InputError, match="different settings"):
        f1_gap(t, {**s, "settings": {"seed": 1}})


def _write_tiny_data(root):
    import json
    import random

    rng = random.Random(0)
    nouns, verbs = ["cat", "dog", "report", "flight", "order"], ["sat", "grew", "arrived", "left"]
    ner, ud = [], []
    for i in range(30):
        name = rng.choice(["Lisbon", "Monday", "Acme"])
        words = ["The", rng.choice(nouns), rng.choice(verbs), "in", name, "."]
        ner.append("\n".join(f"{w}\t{'B-location' if w == name else 'O'}" for w in words))
        rows = [("DET", 2, "det"), ("NOUN", 3, "nsubj"), ("VERB", 0, "root"), ("ADP", 5, "case"),
                ("PROPN", 3, "obl"), ("PUNCT", 3, "punct")]
        ud.append("\n".join(f"{k}\t{w}\t_\t{p}\t_\t_\t{h}\t{d}\t_\t_"
                            for k, (w, (p, h, d)) in enumerate(zip(words, rows), 1)))
    (root / "wnut17").mkdir(parents=True)
    (root / "wnut17" / "emerging.dev.conll").write_text("\n\n".join(ner) + "\n")
    (root / "ud_english_ewt").mkdir()
    (root / "ud_english_ewt" / "t.conllu").write_text("\n\n".join(ud) + "\n")
    (root / "blimp").mkdir()
    pairs = [{"sentence_good": f"The {n} {v}.", "sentence_bad": f"The {n} {v} the.", "UID": "p"}
             for n in nouns for v in verbs]
    (root / "blimp" / "p.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    return root


def test_probe_suite_tiny_model_and_teacher_cache(tmp_path, monkeypatch, tiny_model_factory, tiny_tokenizer):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    data = _write_tiny_data(tmp_path / "data")
    model = tiny_model_factory(num_layers=2).eval()
    kw = dict(limit_sentences=25, blimp_pairs=10, seed=0, max_iter=30)
    r = probe_suite(model, tiny_tokenizer, data, cache=True, **kw)
    assert not r["cached"] and set(r["layers"]) == {"ner", "pos", "deprel", "uas"}
    assert r["n"]["uas"] == {"train": 15, "dev": 5, "test": 5, "test_words": 30}
    assert r["n"]["grammaticality"] == {"pairs": 10}
    for k in ("ner_f1", "pos_micro_f1", "pos_macro_f1", "deprel_micro_f1", "uas", "grammaticality_f1"):
        assert math.isfinite(r["scores"][k]) and 0 <= r["scores"][k] <= 1, k
    assert r["scores"]["pos_micro_f1"] > 0.5   # POS is nearly lexical here: even a random model's states carry it
    assert len(list((tmp_path / "home" / "eval_cache").glob("probes-*.json"))) == 1
    again = probe_suite(model, tiny_tokenizer, data, cache=True, **kw)
    assert again["cached"] and again["scores"] == r["scores"]

    def recomputes(*a, **k):
        raise RuntimeError("cache miss: features recomputed")
    monkeypatch.setattr(probes, "word_features", recomputes)
    assert probe_suite(model, tiny_tokenizer, data, cache=True, **kw)["cached"]
    for other in (dict(fingerprint="another-teacher"), dict(seed=1), dict(cache=False)):
        with pytest.raises(RuntimeError, match="cache miss"):
            probe_suite(model, tiny_tokenizer, data, **{**kw, "cache": True, **other})


def test_gate_provider(tmp_path, monkeypatch, tiny_teacher_dir, tiny_student_dir):
    from distillgate.gates import METRIC_PROVIDERS, GateContext

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    prov = METRIC_PROVIDERS["f1_gap_points"]
    assert prov.higher_is_better is False and prov.module == "distillgate.evaluate.probes"
    ctx = GateContext(student_spec=str(tiny_student_dir), teacher_spec=str(tiny_teacher_dir))
    assert prov.fn(ctx) is None and "--data-dir" in ctx.details["f1_gap_points"]["note"]
    data = _write_tiny_data(tmp_path / "data")
    ctx = GateContext(student_spec=str(tiny_student_dir), teacher_spec=str(tiny_teacher_dir),
                      options={"data_dir": str(data), "probe_sentences": 20, "blimp_pairs": 8})
    value = prov.fn(ctx)
    d = ctx.details["f1_gap_points"]
    assert math.isfinite(value) and value == d["f1_gap_points"]
    assert d["teacher"]["settings"]["layers"] == [1, 2, 3, 4] and d["student"]["settings"]["layers"] == [1, 2]
    assert d["size"]["used"] == min(d["family_n"].values()) and d["size"]["spec"] is None
    assert [ctx.extra["f1_gap_points/ci_low"], ctx.extra["f1_gap_points/ci_high"]] == d["ci95"]
    # the bounded layer search: at most probe_layers candidates per model
    ctx2 = GateContext(student_spec=str(tiny_student_dir), teacher_spec=str(tiny_teacher_dir),
                       options={**ctx.options, "probe_layers": 2}, teacher_cache={})
    ctx2.cache.update(teacher=ctx.teacher(), student=ctx.student())
    prov.fn(ctx2)
    assert ctx2.details["f1_gap_points"]["teacher"]["settings"]["layers"] == [2, 4]
    # the teacher side comes from the run's teacher_cache on a later call: only the student is probed
    calls = []
    real = probes.probe_suite
    monkeypatch.setattr(probes, "probe_suite", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    ctx3 = GateContext(options=ctx2.options, teacher_cache=ctx2.teacher_cache)
    ctx3.cache.update(teacher=ctx.teacher(), student=ctx.student())
    assert prov.fn(ctx3) == ctx2.details["f1_gap_points"]["f1_gap_points"]
    assert calls == [ctx.student().model] and ctx3.details["f1_gap_points"]["seconds"]["teacher"] == 0.0
    with pytest.raises(InputError, match="missing"):
        probe_suite(ctx.student().model, ctx.student().tokenizer, tmp_path)


@pytest.mark.parametrize("module,metric,fn,opt", [
    ("distillgate.evaluate.inheritance", "inheritance", "capability_inheritance", ("inheritance_groups", "n_groups")),
    ("distillgate.evaluate.decision_path", "path_consistency", "decision_path_consistency", ("path_instructions", "n")),
])
def test_g_c3_c4_providers_wiring(monkeypatch, tiny_teacher_dir, tiny_student_dir, module, metric, fn, opt):
    import importlib

    from distillgate.gates import METRIC_PROVIDERS, GateContext

    mod = importlib.import_module(module)
    calls = []

    def fake(student, teacher, tokenizer, **kw):
        calls.append((student, teacher, kw))
        return {metric: 0.75, "n": 4, "n_groups": 4, "rows": [{"consistent": c} for c in (1, 1, 1, 0)],
                "per_group": [{"inherited": c} for c in (1, 1, 1, 0)]}
    monkeypatch.setattr(mod, fn, fake)
    prov = METRIC_PROVIDERS[metric]
    assert prov.higher_is_better and prov.module == module
    ctx = GateContext(student_spec=str(tiny_student_dir), teacher_spec=str(tiny_teacher_dir),
                      options={opt[0]: 3, "seed": 2})
    assert prov.fn(ctx) == 0.75 and ctx.details[metric][metric] == 0.75
    (student, teacher, kw), = calls
    assert student is ctx.student().model and teacher is ctx.teacher().model
    memo = kw.pop("memo")
    assert memo is next(iter(ctx.teacher_cache.values()))   # the teacher side lives in the run's teacher_cache
    extra = {"max_new_tokens": 32, "batch_size": 48} if metric == "inheritance" else {"batch_size": 16}
    assert kw == {opt[1]: 3, "seed": 2, "teacher_fingerprint": ctx.teacher().fingerprint, **extra}
    from scipy.stats import binomtest

    ci = binomtest(3, 4).proportion_ci(method="wilson")
    assert ctx.extra[f"{metric}/ci_low"] == pytest.approx(ci.low) and ctx.extra[f"{metric}/ci_high"] == pytest.approx(ci.high)
    assert ctx.details[metric]["size"]["used"] == 4 and ctx.details[metric]["size"]["spec"] == (
        300 if metric == "inheritance" else 5000)


def test_sentence_logprobs_match_packed_scorer_and_float64(tiny_model_factory, tiny_tokenizer):
    from distillgate.evaluate.scoring import encode_pair, score_requests

    model = tiny_model_factory(num_layers=2).eval()
    sents = ["The cat sat on the mat.", "A dog barked.", "Call the function with a list of integers please."]
    lp = probes.sentence_logprobs(model, tiny_tokenizer, sents, batch_tokens=24)   # forces several batches
    reqs = [encode_pair(tiny_tokenizer, "", " " + s) for s in sents]                 # lm-eval's blimp request
    packed = score_requests(model, [(ctx, [cont]) for ctx, cont in reqs])
    assert lp == pytest.approx([p[0].logprob for p in packed], abs=1e-4)
    ids = sum(reqs[2], [])
    with torch.no_grad():
        ref = torch.log_softmax(model.double()(torch.tensor([ids])).logits[0, :-1], -1)
    assert lp[2] == pytest.approx(ref.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-3)
    # pinned (seed-0 tiny model); without the leading space they were -132.259 / -87.855 / -280.287
    assert lp == pytest.approx([-146.9417, -102.3400, -290.9148], abs=1e-3)


def test_pair_logprobs_equal_the_lm_eval_blimp_scorer(tiny_model_factory, tiny_tokenizer, tmp_path):
    """G-C2 scores a pair exactly as eval's BLiMP task (test_eval_parity pins that one to lm-eval's blimp)."""
    from distillgate.evaluate.formats import load_format
    from distillgate.evaluate.lm import score_minimal_pairs

    model = tiny_model_factory(num_layers=2).eval()
    pairs = [("The cats sleep.", "The cats sleeps.", "sv"), ("Who did you see?", "Who did you see him?", "wh"),
             ("She has eaten.", "She has ate.", "sv")]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": u}) + "\n" for g, b, u in pairs))
    good, bad = probes.pair_logprobs(model, tiny_tokenizer, pairs)
    lm = score_minimal_pairs(model, tiny_tokenizer, load_format("blimp", f))
    assert [list(x) for x in zip(good, bad)] == [pytest.approx(d["loglikelihoods"], abs=1e-4) for d in lm["per_doc"]]


def test_ridge_layer_search_equals_sklearn_and_picks_the_informative_layer():
    """The layer search's closed-form ridge classifier predicts like sklearn's RidgeClassifier (unpenalised
    intercept, alpha = lam * n_train), and the fast search picks the layer a full fit per layer picks."""
    from sklearn.linear_model import RidgeClassifier

    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(4, 12, generator=g)
    y = torch.arange(300) % 4
    x = centers[y] + 1.5 * torch.randn(300, 12, generator=g)
    pred = probes.ridge_predict(x, y, 200, 4, lam=0.5)
    ref = RidgeClassifier(alpha=0.5 * 200).fit(x[:200].double().numpy(), y[:200].numpy()).predict(x.double().numpy())
    assert pred.tolist() == ref.tolist()
    noise = torch.randn(300, 12, generator=g)
    tags = [str(v) for v in y.tolist()]
    sents = [probes.Sentence([f"w{i}" for i in range(10)], tags[j:j + 10]) for j in range(0, 300, 10)]
    split = {"train": sents[:20], "dev": sents[20:25], "test": sents[25:]}
    feats = {1: noise, 2: x}
    fast = probes.token_task(feats, split, "pos", l2=1e-3, max_iter=30, selection="fast")
    full = probes.token_task(feats, split, "pos", l2=1e-3, max_iter=30, selection="full")
    assert fast["layer"] == full["layer"] == 2 and fast["test"] == full["test"]


def test_head_probe_continued_fit_equals_one_fit():
    """The fast head-probe search (short fits, the winner continued from its parameters) ends where the
    informative layer's fit ends, and a continued fit keeps what the short one learnt."""
    h, mask, heads = _tree_features(40, seed=0)
    p1 = train_head_probe(h, mask, heads, rank=8, l2=1e-4, max_iter=10, seed=0)
    p2 = train_head_probe(h, mask, heads, rank=8, l2=1e-4, max_iter=40, seed=0, init=p1)
    acc = lambda p: (predict_heads(p, h, mask) == heads)[mask].float().mean().item()  # noqa: E731
    assert acc(p2) >= acc(p1) and acc(p2) > 0.9
    assert all(p1[k].requires_grad is False for k in p1)   # the init is copied, not trained in place
