"""G-C2 probes: what the frozen hidden states encode (NER, POS, dependency parsing) and grammaticality.

Protocol (identical for teacher and student, so their F1s can be compared point for point):

* Data: WNUT-17 (CoNLL ``token<TAB>BIO-tag``), UD English EWT (CoNLL-U: UPOS, HEAD, DEPREL; multiword ranges
  ``1-2`` and empty nodes ``1.1`` are skipped) and BLiMP minimal pairs, all from ``data_dir``. These are
  *evaluation* files; as usual for probing, the probes are trained on a train split **of these same files**:
  sentences with at most ``max_words`` words are sampled with ``seed`` (``limit_sentences`` of them) and split
  deterministically by sentence 60/20/20 into train/dev/test. A probe measures what a frozen representation
  encodes; it never updates the model.
* Features: one forward pass per batch (``output_hidden_states=True``) over the words joined by single spaces,
  after the BOS (else EOS) token. A word is represented by its **last** token (found via the tokenizer's
  offset mapping): a causal model has seen the whole word only there, and nothing to its right anywhere.
  ``hidden_states[l]`` (0 = embeddings) of the candidate layers (default :func:`default_layers`: every k-th
  layer plus the last, at most 10) are kept in memory as float32 and standardised with train-split statistics.
* Probes (fixed hyper-parameters: L2 1e-3 linear, 1e-2 bilinear at rank 64, picked on the EWT dev split of
  SmolLM2-135M; full-batch L-BFGS, <= 100 iterations, seeded init): a linear softmax classifier for
  NER BIO tags (span F1 by ``seqeval``), UPOS (macro/micro F1) and universal dependency relations (subtypes
  ``nmod:poss`` -> ``nmod``; macro/micro F1); a low-rank **bilinear head probe** for unlabeled attachment,
  ``score(i, j) = (U h_i) . (V h_j) + b . h_j`` over the words j != i of the sentence and
  ``score(i, ROOT) = (U h_i) . r`` with a learned root vector ``r``, softmax over candidate heads, trained by
  cross-entropy; UAS = accuracy of the argmax head (rank ``head_rank`` keeps it fast and regularised).
* Layer selection: per task, the candidate layer with the best dev score; the test score of that layer is
  reported (``layers[task]``, ``dev[task]``). ``selection="fast"`` (default) scores the candidates cheaply:
  a closed-form ridge classifier for the linear probes, a quarter of the L-BFGS budget for the head probe
  (the winner's fit then continues); only the chosen layer gets the full fit. ``"full"``: a full fit per
  candidate (the teacher and the student always use the same rule: it is part of the settings).
* Grammaticality: each BLiMP sentence is scored by its total log-probability (lm-eval's ``blimp`` tokenisation,
  :mod:`.scoring`); in each pair the member that scores strictly higher is classified "good", the other
  "bad" (a tie classifies both as wrongly swapped). F1 of the "good" class and accuracy, overall and per
  paradigm. With exactly one "good" prediction per pair, precision = recall = accuracy, so F1 = accuracy.

G-C2 (:func:`f1_gap`): ``teacher - student`` in F1 points (x100) per family; the dependency-parsing family is
the worse of UAS and relation micro-F1 (attachment and labelling); the gate value is the max over
grammaticality, NER and dependency parsing. POS is reported, not gated. Everything is word-level, so teacher
and student may even use different tokenizers. Sampling noise of a small preset
(80 test sentences) is several points: use large ``limit_sentences`` for a decision near 1.2 points.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..io import atomic_write_json, distillgate_home, sha256_file, sha256_json

PROBE_VERSION = 4      # 2: sentences scored with lm-eval's leading space; 3: test entity counts (for the CI);
                       # 4: layer search by closed-form ridge (linear) / short fits (head), one full fit per task
SPLITS = (0.6, 0.2, 0.2)
GATED = {"grammaticality": ("grammaticality_f1",), "ner": ("ner_f1",), "dependency": ("uas", "deprel_micro_f1")}


@dataclass
class Sentence:
    words: list[str]
    tags: list[str] = field(default_factory=list)      # NER BIO tags or UPOS
    heads: list[int] = field(default_factory=list)     # 0 = root, else 1-based word index
    deprels: list[str] = field(default_factory=list)   # universal relation (subtype stripped)


# ------------------------------------------------------------------------------------------------ readers

def _lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read as UTF-8 text ({e})") from e


def read_conll(path: str | Path) -> list[Sentence]:
    """WNUT-style CoNLL: ``token<TAB>tag`` per line, blank line between sentences; tags are BIO."""
    out, cur = [], Sentence([])
    for n, line in enumerate(_lines(path) + [""], 1):
        if not line.strip():
            if cur.words:
                out.append(cur)
            cur = Sentence([])
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not (parts[1] == "O" or parts[1][:2] in ("B-", "I-")):
            raise InputError(f"{path}:{n}: expected 'token<TAB>BIO-tag' (O, B-x, I-x), got {line!r}")
        cur.words.append(parts[0])
        cur.tags.append(parts[1])
    return out


def read_conllu(path: str | Path) -> list[Sentence]:
    """CoNLL-U: 10 tab-separated columns; UPOS -> tags, HEAD -> heads, DEPREL (universal part) -> deprels."""
    out, cur, start = [], Sentence([]), 0
    for n, line in enumerate(_lines(path) + [""], 1):
        if not line.strip():
            if cur.words:
                bad = [h for h in cur.heads if h > len(cur.words)]
                if bad:
                    raise InputError(f"{path}:{start}: sentence has HEAD {bad[0]} beyond its {len(cur.words)} words")
                out.append(cur)
            cur = Sentence([])
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise InputError(f"{path}:{n}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}: {line!r}")
        if "-" in cols[0] or "." in cols[0]:   # multiword token range or empty node: not a syntactic word
            continue
        if not cur.words:
            start = n
        if not cols[0].isdigit() or int(cols[0]) != len(cur.words) + 1 or not cols[6].isdigit():
            raise InputError(f"{path}:{n}: expected ID {len(cur.words) + 1} and an integer HEAD, got "
                             f"ID {cols[0]!r} HEAD {cols[6]!r}")
        cur.words.append(cols[1])
        cur.tags.append(cols[3])
        cur.heads.append(int(cols[6]))
        cur.deprels.append(cols[7].split(":")[0])
    return out


def read_minimal_pairs(paths: list[str | Path], limit: int | None = None) -> list[tuple[str, str, str]]:
    """``[(good, bad, paradigm)]`` from BLiMP JSONL files (``limit`` pairs per file; paradigm = UID or stem)."""
    out = []
    for path in map(Path, paths):
        rows = [(n, ln) for n, ln in enumerate(_lines(path), 1) if ln.strip()]
        for n, line in rows[:limit] if limit is not None else rows:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                    for k in ("sentence_good", "sentence_bad")):
                raise InputError(f"{path}:{n}: needs non-empty string fields 'sentence_good' and 'sentence_bad'")
            out.append((row["sentence_good"], row["sentence_bad"], str(row.get("UID") or path.stem)))
    return out


def sample_split(sentences: list[Sentence], limit: int | None, seed: int, max_words: int = 64) -> dict[str, list]:
    """Seeded sample of ``limit`` sentences with 1..``max_words`` words, split by sentence 60/20/20."""
    pool = [s for s in sentences if 0 < len(s.words) <= max_words]
    idx = list(range(len(pool)))
    random.Random(seed).shuffle(idx)
    idx = idx[:limit] if limit is not None else idx
    a, b = round(SPLITS[0] * len(idx)), round((SPLITS[0] + SPLITS[1]) * len(idx))
    parts = {"train": idx[:a], "dev": idx[a:b], "test": idx[b:]}
    if any(not v for v in parts.values()):
        raise InputError(f"probe data: {len(idx)} usable sentences cannot be split 60/20/20 (need >= 5)")
    return {k: [pool[i] for i in v] for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------ features

def word_last_tokens(tokenizer, words: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of ``BOS + ' '.join(words)`` and, per word, the position of its last token.

    Returns ``(ids [T], last [n_words])`` with positions into ``ids`` (BOS is position 0).
    """
    from .scoring import prefix_token_id

    text, spans, pos = " ".join(words), [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    last, t = [], 0
    for ws, we in spans:
        hit = None
        while t < len(offs) and offs[t][0] < we:
            if offs[t][1] > ws:
                hit = t
            t += 1
        if hit is None:
            raise InputError(f"word {text[ws:we]!r} of {text!r} maps to no token of the tokenizer")
        last.append(hit + 1)
        if offs[hit][1] > we:   # the token runs into the next word: let that word see it too
            t = hit
    return [prefix_token_id(tokenizer)] + list(enc["input_ids"]), last


def default_layers(n_layers: int, max_layers: int = 10) -> list[int]:
    """Candidate ``hidden_states`` indices: every k-th layer plus the last, at most ``max_layers`` (30 -> 3..30)."""
    k = max(1, math.ceil(n_layers / max_layers))
    return sorted(set(range(k, n_layers + 1, k)) | {n_layers})


@torch.inference_mode()
def word_features(model, tokenizer, sentences: list[list[str]], layers: list[int], *,
                  batch_tokens: int = 256) -> dict[int, torch.Tensor]:
    """``{layer: [sum of words, H] float32}``: each word's last-token hidden state, sentences concatenated.

    Sentences sorted by length in right-padded batches of about ``batch_tokens`` tokens: small batches pad
    little (UD/WNUT lengths are long-tailed: 4,096-token batches computed 2x the real tokens, 256 ~1.1x)."""
    enc = [word_last_tokens(tokenizer, w) for w in sentences]
    n_layers = model.config.num_hidden_layers
    if any(not 0 <= l <= n_layers for l in layers):
        raise InputError(f"probe layers {layers}: allowed 0..{n_layers} (hidden_states indices)")
    starts = [0]
    for _, last in enc:
        starts.append(starts[-1] + len(last))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {l: torch.empty(starts[-1], model.config.hidden_size) for l in layers}
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))   # similar lengths share a batch
    i = 0
    while i < len(order):
        T = len(enc[order[i]][0])
        batch = order[i:i + max(1, batch_tokens // T)]
        i += len(batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, s in enumerate(batch):
            ids[r, :len(enc[s][0])] = torch.tensor(enc[s][0])
            att[r, :len(enc[s][0])] = 1
        hs = model(ids.to(device), attention_mask=att.to(device), output_hidden_states=True,
                   use_cache=False, logits_to_keep=1).hidden_states
        for r, s in enumerate(batch):
            pos = torch.tensor(enc[s][1], device=device)
            for l in layers:
                out[l][starts[s]:starts[s + 1]] = hs[l][r, pos].float().cpu()
    return out


# ------------------------------------------------------------------------------------------------ probes

def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int) -> None:
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    opt.step(closure)


def train_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, l2: float = 1e-3,
                       max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression on x [N, H] (standardised), y [N] long -> (W [H, C], b [C]).

    Minimises mean cross-entropy + ``l2 * ||W||^2`` by full-batch L-BFGS from zero (convex: deterministic).
    """
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    _lbfgs([w, b], lambda: torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.square().sum(), max_iter)
    return w.detach(), b.detach()


def _pad(h: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """h [sum(lengths), ...] -> ([S, L, ...] zero-padded, mask [S, L] bool)."""
    from torch.nn.utils.rnn import pad_sequence

    mask = pad_sequence([torch.ones(n, dtype=torch.bool) for n in lengths], batch_first=True)
    return pad_sequence(list(h.split(lengths)), batch_first=True), mask


def head_scores(params: dict[str, torch.Tensor], h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bilinear head scores: h [S, L, H], mask [S, L] -> [S, L, L + 1]; column 0 is ROOT, column j the word j.

    ``score(i, j) = (U h_i).(V h_j) + b.h_j``, ``score(i, ROOT) = (U h_i).r``; self and padding are -inf.
    """
    def proj(w: torch.Tensor) -> torch.Tensor:   # project real words only: padding is ~3/4 of [S, L] on UD
        out = h.new_zeros(*mask.shape, *w.shape[1:])
        out[mask] = h[mask] @ w
        return out
    dep, head = proj(params["U"]), proj(params["V"])                     # [S, L, R]
    words = dep @ head.transpose(1, 2) + proj(params["b"])[:, None, :]   # [S, L, L]
    root = dep @ params["r"]                                             # [S, L]
    s = torch.cat([root[..., None], words], dim=-1)
    L = h.shape[1]
    bad = torch.cat([torch.zeros(L, 1, dtype=torch.bool), torch.eye(L, dtype=torch.bool)], 1)[None] \
        | ~torch.cat([torch.ones_like(mask[:, :1]), mask], 1)[:, None, :]
    return s.masked_fill(bad, float("-inf"))


def train_head_probe(h: torch.Tensor, mask: torch.Tensor, heads: torch.Tensor, *, rank: int = 64,
                     l2: float = 1e-2, max_iter: int = 100, seed: int = 0,
                     init: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fit the bilinear head probe: h [S, L, H], mask [S, L], heads [S, L] long (0 = ROOT; padding ignored).

    Mean cross-entropy over real words + ``l2 * (|U|^2 + |V|^2 + |b|^2 + |r|^2)``; seeded small random init
    (the factorised objective has a saddle at zero), full-batch L-BFGS.
    """
    g = torch.Generator().manual_seed(seed)
    H = h.shape[-1]
    p = {"U": torch.randn(H, rank, generator=g) / H ** 0.5, "V": torch.randn(H, rank, generator=g) / H ** 0.5,
         "b": torch.zeros(H), "r": torch.randn(rank, generator=g) / rank ** 0.5}
    if init is not None:   # continue an earlier fit (layer search: short fits, then the winner goes on)
        p = {k: v.detach().clone() for k, v in init.items()}
    for v in p.values():
        v.requires_grad_(True)
    tgt = heads.masked_fill(~mask, -100)

    def loss():
        s = head_scores(p, h, mask)
        ce = torch.nn.functional.cross_entropy(s.flatten(0, 1).masked_fill(~mask.flatten()[:, None], 0.0),
                                               tgt.flatten(), ignore_index=-100)
        return ce + l2 * sum(v.square().sum() for v in p.values())
    _lbfgs(list(p.values()), loss, max_iter)
    return {k: v.detach() for k, v in p.items()}


def predict_heads(params: dict[str, torch.Tensor], h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Argmax head per word: [S, L] long (0 = ROOT); padding positions hold 0."""
    return head_scores(params, h, mask).argmax(-1).masked_fill(~mask, 0)


# ------------------------------------------------------------------------------------------------ metrics

def label_f1(gold: list[str], pred: list[str]) -> dict[str, float]:
    """Macro F1 over the labels seen in gold or pred (sklearn's default) and micro F1 (= accuracy here)."""
    if len(gold) != len(pred) or not gold:
        raise InputError(f"label_f1: need equal non-empty label lists, got {len(gold)} and {len(pred)}")
    f1s = []
    for lab in sorted(set(gold) | set(pred)):
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"macro_f1": sum(f1s) / len(f1s), "micro_f1": sum(g == p for g, p in zip(gold, pred)) / len(gold)}


def grammaticality_f1(lp_good: list[float], lp_bad: list[float], paradigms: list[str]) -> dict:
    """Classify both members of each pair ("good" = the strictly higher log-prob); F1 of "good", accuracy."""
    def score(idx):
        right = sum(lp_good[i] > lp_bad[i] for i in idx)
        tp, fp, fn = right, len(idx) - right, len(idx) - right   # a wrong pair swaps both members
        return {"f1": 2 * tp / (2 * tp + fp + fn), "accuracy": right / len(idx), "n": len(idx)}
    if not lp_good or len(lp_good) != len(lp_bad) or len(lp_good) != len(paradigms):
        raise InputError("grammaticality_f1: need equal non-empty lists of log-probs and paradigms")
    by: dict[str, list[int]] = {}
    for i, p in enumerate(paradigms):
        by.setdefault(p, []).append(i)
    return {**score(range(len(paradigms))), "per_paradigm": {p: score(ix) for p, ix in sorted(by.items())}}


@torch.no_grad()
def sentence_logprobs(model, tokenizer, sentences: list[str], *, batch_tokens: int = 1024) -> list[float]:
    """Total log-prob of each sentence after the prefix token, tokenised like lm-eval (:func:`.scoring.encode_pair`).

    lm-eval's ``blimp`` scores a choice as its default target delimiter plus the sentence, ``" " + sentence``,
    after the prefix token; so does this (the same request as :func:`.lm.score_minimal_pairs`).

    Plain right-padded batches of similar length: for ~10-token sentences this was ~5x faster here than the
    packed scorer (:func:`.scoring.score_requests`), which pays for long shared contexts BLiMP does not have.
    """
    from .scoring import encode_pair

    seqs = [sum(encode_pair(tokenizer, "", " " + s), []) for s in sentences]
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    i = 0
    while i < len(order):
        T = len(seqs[order[i]])
        batch = order[i:i + max(1, batch_tokens // T)]
        i += len(batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, k in enumerate(batch):
            ids[r, :len(seqs[k])], att[r, :len(seqs[k])] = torch.tensor(seqs[k]), 1
        logp = torch.log_softmax(model(ids.to(device), attention_mask=att.to(device)).logits[:, :-1].float(), -1)
        tok = logp.gather(-1, ids[:, 1:, None].to(device))[..., 0] * att[:, 1:].to(device)   # [B, T-1]
        for r, k in enumerate(batch):
            out[k] = float(tok[r].double().sum())
    return out


def pair_logprobs(model, tokenizer, pairs: list[tuple[str, str, str]]) -> tuple[list[float], list[float]]:
    """Total log-prob of each pair's good and bad sentence -> (good [P], bad [P])."""
    lp = sentence_logprobs(model, tokenizer, [s for g, b, _ in pairs for s in (g, b)])
    return lp[0::2], lp[1::2]


# ------------------------------------------------------------------------------------------------ tasks

def _standardise(x: torch.Tensor, n_train: int) -> torch.Tensor:
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    return (x - mu) / sd


def ridge_predict(x: torch.Tensor, y: torch.Tensor, n_train: int, n_classes: int, lam: float = 1.0) -> torch.Tensor:
    """Closed-form ridge classifier (one-hot least squares + ``lam * N`` ridge, float64) fitted on the first
    ``n_train`` rows of x [N, H]; argmax predictions for every row. The layer search's cheap stand-in for
    the softmax probe: one [H, H] solve instead of an L-BFGS fit per candidate layer."""
    xt = x[:n_train].double()
    xt1 = torch.cat([xt, torch.ones(n_train, 1, dtype=xt.dtype)], 1)
    yt = torch.nn.functional.one_hot(y[:n_train], n_classes).double()
    a = xt1.T @ xt1 + lam * n_train * torch.eye(xt1.shape[1], dtype=xt.dtype)
    a[-1, -1] -= lam * n_train                                   # the bias is not penalised
    w = torch.linalg.solve(a, xt1.T @ yt)
    return (torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) @ w).argmax(-1)


def _best(dev: dict[int, float]) -> int:
    """The best dev score's layer (ties: the lower layer)."""
    return min(dev, key=lambda l: (-dev[l], l))


def _select(layers: list[int], fit_eval) -> tuple[int, dict[int, float], dict]:
    """Fit on train for each layer, keep the best dev score (ties: the lower layer); test metrics of it."""
    dev, best = {}, None
    for l in layers:
        d, test = fit_eval(l)
        dev[l] = d
        if best is None or d > dev[best[0]]:
            best = (l, test)
    return best[0], dev, best[1]


def token_task(feats: dict[int, torch.Tensor], split: dict[str, list[Sentence]], kind: str, *,
               l2: float, max_iter: int, selection: str = "fast") -> dict:
    """Linear probe for ``kind`` in ner | pos | deprel over word features ordered train, dev, test.

    ``selection="fast"``: the candidate layer with the best dev score of a closed-form ridge classifier
    (:func:`ridge_predict`) gets the one L-BFGS softmax fit whose test score is reported; ``"full"``: every
    candidate layer gets the full fit and the best dev score of those wins (4x the fits at 4 layers)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    labs = {k: [s.deprels if kind == "deprel" else s.tags for s in v] for k, v in split.items()}
    vocab = sorted({t for v in labs.values() for s in v for t in s})
    y = torch.tensor([vocab.index(t) for k in ("train", "dev", "test") for s in labs[k] for t in s])
    n = [sum(map(len, labs[k])) for k in ("train", "dev", "test")]
    cut = {"train": (0, n[0]), "dev": (n[0], n[0] + n[1]), "test": (n[0] + n[1], sum(n))}

    def metrics(pred: torch.Tensor, part: str) -> dict:
        gold, flat, out, i = labs[part], [vocab[j] for j in pred.tolist()], [], 0
        for s in gold:
            out.append(flat[i:i + len(s)])
            i += len(s)
        if kind == "ner":
            return {"f1": f1_score(gold, out), "precision": precision_score(gold, out),
                    "recall": recall_score(gold, out)}
        return label_f1([t for s in gold for t in s], flat)

    def fit_eval(layer):
        x = _standardise(feats[layer], n[0])
        w, b = train_linear_probe(x[:n[0]], y[:n[0]], len(vocab), l2=l2, max_iter=max_iter)
        pred = (x @ w + b).argmax(-1)
        primary = "f1" if kind == "ner" else "micro_f1"
        return metrics(pred[slice(*cut["dev"])], "dev")[primary], metrics(pred[slice(*cut["test"])], "test")

    primary = "f1" if kind == "ner" else "micro_f1"
    if selection == "fast":
        dev = {}
        for l in sorted(feats):
            pred = ridge_predict(_standardise(feats[l], n[0]), y, n[0], len(vocab))
            dev[l] = metrics(pred[slice(*cut["dev"])], "dev")[primary]
        layer = _best(dev)
        test = fit_eval(layer)[1]
    elif selection == "full":
        layer, dev, test = _select(sorted(feats), fit_eval)
    else:
        raise InputError(f"probe selection {selection!r}: allowed 'fast' or 'full'")
    out = {"layer": layer, "dev": dev, "test": test, "n_labels": len(vocab), "n_test_words": n[2],
           "selection": selection}
    if kind == "ner":
        from seqeval.metrics.sequence_labeling import get_entities

        out["n_test_entities"] = sum(len(get_entities(s)) for s in labs["test"])
    return out


def head_task(feats: dict[int, torch.Tensor], split: dict[str, list[Sentence]], *, rank: int, l2: float,
              max_iter: int, seed: int, selection: str = "fast") -> dict:
    """Bilinear head probe (UAS) with layer selection on dev.

    ``selection="fast"`` (the suite's default; no closed form exists for this probe): every candidate layer
    gets a short fit of ``max_iter // 4`` L-BFGS iterations, the best dev UAS wins and its fit continues to
    ``max_iter`` iterations in all; ``"full"``: a full fit per layer."""
    lens = {k: [len(s.words) for s in v] for k, v in split.items()}
    heads = {k: _pad(torch.tensor([h for s in v for h in s.heads]), lens[k])[0] for k, v in split.items()}
    n_train, n_dev = sum(lens["train"]), sum(lens["dev"])

    def fit_eval(layer, iters=max_iter, init=None):
        x = _standardise(feats[layer], n_train)
        parts = {"train": x[:n_train], "dev": x[n_train:n_train + n_dev], "test": x[n_train + n_dev:]}
        hm = {k: _pad(v, lens[k]) for k, v in parts.items()}
        p = train_head_probe(*hm["train"], heads["train"], rank=rank, l2=l2, max_iter=iters, seed=seed, init=init)
        uas = {k: float((predict_heads(p, *hm[k]) == heads[k])[hm[k][1]].float().mean()) for k in ("dev", "test")}
        return uas["dev"], {"uas": uas["test"]}, p

    if selection == "full":
        layer, dev, test = _select(sorted(feats), lambda l: fit_eval(l)[:2])
    elif selection == "fast":
        short = max(1, max_iter // 4)
        runs = {l: fit_eval(l, short) for l in sorted(feats)}
        dev = {l: r[0] for l, r in runs.items()}
        layer = _best(dev)
        test = fit_eval(layer, max(1, max_iter - short), runs[layer][2])[1] if max_iter > short else runs[layer][1]
    else:
        raise InputError(f"probe selection {selection!r}: allowed 'fast' or 'full'")
    return {"layer": layer, "dev": dev, "test": test, "n_test_words": sum(lens["test"]), "selection": selection}


# ------------------------------------------------------------------------------------------------ suite

def data_files(data_dir: str | Path) -> dict[str, list[Path]]:
    """The probe files under ``data_dir``: wnut17/emerging.dev.conll, ud_english_ewt/*.conllu, blimp/*.jsonl."""
    d = Path(data_dir)
    files = {"ner": [d / "wnut17" / "emerging.dev.conll"], "ud": sorted((d / "ud_english_ewt").glob("*.conllu")),
             "blimp": sorted((d / "blimp").glob("*.jsonl"))}
    missing = [k for k, v in files.items() if not v or not all(p.is_file() for p in v)]
    if missing:
        raise InputError(f"probe data dir {d}: missing {missing}; needs wnut17/emerging.dev.conll, "
                         "ud_english_ewt/*.conllu and blimp/*.jsonl")
    return files


def probe_suite(model, tokenizer, data_dir: str | Path, *, limit_sentences: int | None = 400, blimp_pairs: int = 300,
                seed: int = 0, layers: list[int] | None = None, max_layers: int = 10, max_words: int = 64,
                l2: float = 1e-3,
                head_rank: int = 64, head_l2: float = 1e-2, max_iter: int = 100, batch_tokens: int = 256,
                probe_threads: int | None = 1, cache: bool = False, fingerprint: str | None = None,
                selection: str = "fast") -> dict:
    """All G-C2 probes of one frozen model (module docstring). Returns JSON-able
    ``{scores: {ner_f1, pos_micro_f1, pos_macro_f1, deprel_micro_f1, deprel_macro_f1, uas, grammaticality_f1,
    grammaticality_accuracy, ...}, layers: {task: layer}, dev: {task: {layer: dev score}}, n: {...}, ...}``.

    ``limit_sentences`` caps the NER and the UD sample each; ``blimp_pairs`` is spread evenly over the files.
    ``cache=True`` (the teacher) stores/reuses the result under ``$DISTILLGATE_HOME/eval_cache`` keyed by the
    model ``fingerprint`` (default :func:`fingerprint_model`), tokenizer, data sha256 and settings.
    Probes are fitted on ``probe_threads`` intra-op threads: they are small (<= 5k x 576), and on a busy
    CPU two spinning threads made one L-BFGS fit ~30 s instead of 0.6 s on one (load 15, 2 cores).
    """
    import time

    from ..perf import torch_threads
    from ..models import fingerprint_model, fingerprint_tokenizer

    if selection not in ("fast", "full"):
        raise InputError(f"probe selection {selection!r}: allowed 'fast' or 'full'")
    files = data_files(data_dir)
    layers = sorted(set(layers)) if layers else default_layers(model.config.num_hidden_layers, max_layers)
    settings = {"version": PROBE_VERSION, "limit_sentences": limit_sentences, "blimp_pairs": blimp_pairs,
                "seed": seed, "layers": layers, "max_words": max_words, "l2": l2, "head_rank": head_rank,
                "head_l2": head_l2,
                "max_iter": max_iter, "splits": list(SPLITS), "selection": selection}
    data_sha = {str(p.relative_to(data_dir)): sha256_file(p) for v in files.values() for p in v}
    path = key = None
    if cache:
        key = sha256_json([fingerprint or fingerprint_model(model), fingerprint_tokenizer(tokenizer), data_sha,
                           settings])
        path = distillgate_home() / "eval_cache" / f"probes-{key[:16]}.json"
        if path.is_file():
            hit = json.loads(path.read_text())
            if hit.get("key") == key:
                return {**hit["result"], "cached": True}
    t0, res = time.perf_counter(), {"settings": settings, "data_sha256": data_sha, "scores": {}, "layers": {},
                                    "dev": {}, "n": {}, "seconds": {}}
    ner = sample_split(read_conll(files["ner"][0]), limit_sentences, seed, max_words)
    ud = sample_split([s for p in files["ud"] for s in read_conllu(p)], limit_sentences, seed, max_words)
    for name, split in (("ner", ner), ("ud", ud)):
        sents = [s.words for k in ("train", "dev", "test") for s in split[k]]
        feats = word_features(model, tokenizer, sents, layers, batch_tokens=batch_tokens)
        res["seconds"][f"features_{name}"] = time.perf_counter() - t0
        with torch_threads(probe_threads):
            sel = {"l2": l2, "max_iter": max_iter, "selection": selection}
            tasks = {"ner": token_task(feats, split, "ner", **sel)} if name == "ner" else {
                "pos": token_task(feats, split, "pos", **sel),
                "deprel": token_task(feats, split, "deprel", **sel),
                "uas": head_task(feats, split, rank=head_rank, l2=head_l2, max_iter=max_iter, seed=seed,
                                 selection=selection)}
        for task, r in tasks.items():
            res["layers"][task], res["dev"][task] = r["layer"], {str(k): v for k, v in r["dev"].items()}
            res["scores"].update({m if task == "uas" else f"{task}_{m}": v for m, v in r["test"].items()})
            res["n"][task] = {**{k: len(v) for k, v in split.items()}, "test_words": r["n_test_words"],
                              **({"test_entities": r["n_test_entities"]} if "n_test_entities" in r else {})}
        res["seconds"][f"probes_{name}"] = time.perf_counter() - t0
    per_file = math.ceil(blimp_pairs / len(files["blimp"]))
    pairs = read_minimal_pairs(files["blimp"], per_file)[:blimp_pairs]
    g = grammaticality_f1(*pair_logprobs(model, tokenizer, pairs), [p for _, _, p in pairs])
    res["scores"].update({"grammaticality_f1": g["f1"], "grammaticality_accuracy": g["accuracy"]})
    res["n"]["grammaticality"] = {"pairs": g["n"]}
    res["per_paradigm"] = g["per_paradigm"]
    res["seconds"]["total"] = time.perf_counter() - t0
    bad = {k: v for k, v in res["scores"].items() if not math.isfinite(v)}
    if bad:
        raise InputError(f"probe scores are not finite: {bad}")
    if path is not None:
        atomic_write_json(path, {"key": key, "result": res})
    return {**res, "cached": False}


def f1_gap(teacher: dict, student: dict) -> dict:
    """Teacher-minus-student gaps in F1 points (x100) from two :func:`probe_suite` results.

    ``per_task_gap_points`` covers every shared score; ``family_gap_points``: grammaticality (F1), NER (span
    F1), dependency parsing (worse of UAS and relation micro-F1); ``f1_gap_points`` = max over the families
    (G-C2: <= 1.2). Positive = the student is worse. Raises when the two runs used other data or settings.
    """
    for k in ("data_sha256", "settings"):
        a, b = teacher.get(k), student.get(k)
        if k == "settings" and a and b:
            a, b = ({x: y for x, y in d.items() if x != "layers"} for d in (a, b))
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):   # a cached result went through JSON
            raise InputError(f"f1_gap: teacher and student probes used different {k}: {a} vs {b}")
    ts, ss = teacher["scores"], student["scores"]
    per = {k: 100.0 * (ts[k] - ss[k]) for k in sorted(ts) if k in ss}
    missing = [m for ms in GATED.values() for m in ms if m not in per]
    if missing:
        raise InputError(f"f1_gap: scores {missing} missing from the probe results")
    fam = {f: max(per[m] for m in ms) for f, ms in GATED.items()}
    worst = max(fam, key=fam.get)
    ci, n = gap_ci(teacher, student)
    lo, hi = max(c[0] for c in ci.values()), max(c[1] for c in ci.values())
    return {"per_task_gap_points": per, "family_gap_points": fam, "f1_gap_points": fam[worst], "worst_family": worst,
            "family_ci95": ci, "ci95": [lo, hi], "family_n": n}


def gap_ci(teacher: dict, student: dict, confidence: float = 0.95) -> tuple[dict, dict]:
    """95% CI (points) of each gated family's gap and the test size behind it: normal approximation of the
    difference of two independent proportions ``100 * z * sqrt(pt(1-pt)/n + ps(1-ps)/n)`` (conservative: the
    two models are scored on the same items), ``n`` = pairs (grammaticality), gold test entities (NER; span F1
    treated as a proportion), test words (dependency; words of one sentence are not independent, so this is
    optimistic there). A family that is the worse of two scores gets the bounds of the worse; the gate value
    (max over families) lies in [max of the lows, max of the highs] when every family's interval holds."""
    from scipy.stats import norm

    z, tn = float(norm.ppf(0.5 + confidence / 2)), teacher.get("n", {})
    n_of = {"grammaticality_f1": (tn.get("grammaticality") or {}).get("pairs"),
            "ner_f1": (tn.get("ner") or {}).get("test_entities") or (tn.get("ner") or {}).get("test_words"),
            "uas": (tn.get("uas") or {}).get("test_words"), "deprel_micro_f1": (tn.get("deprel") or {}).get("test_words")}
    ci, ns = {}, {}
    for fam, ms in GATED.items():
        lo = hi = -math.inf
        for m in ms:
            n, pt, ps = n_of.get(m), teacher["scores"][m], student["scores"][m]
            if not n:
                raise InputError(f"probe results carry no test size for {m} (cached by an older version?)")
            gap, se = 100.0 * (pt - ps), 100.0 * math.sqrt((pt * (1 - pt) + ps * (1 - ps)) / n)
            lo, hi = max(lo, gap - z * se), max(hi, gap + z * se)
            ns[fam] = min(ns.get(fam, n), n)
        ci[fam] = [lo, hi]
    return ci, ns


# ------------------------------------------------------------------------------------------------ gate

def f1_gap_provider(ctx) -> float | None:
    """G-C2 metric provider: teacher and student probes on ``options['data_dir']`` (else $DISTILLGATE_DATA);
    sizes from ``options['probe_sentences']`` (200), ``options['blimp_pairs']`` (150), ``probe_layers``
    (candidate layers searched per model, 4) and ``probe_max_iter`` (60). The teacher's result is cached on
    disk (by fingerprint, tokenizer, data sha256 and settings) and in ``ctx.teacher_cache``, so a loop
    iteration pays only the student's side; the details carry the size used and the gap's 95% CI."""
    from .harness import default_data_dir
    from .providers import report_size

    data_dir = default_data_dir(ctx.options.get("data_dir"))
    if not data_dir:
        ctx.details["f1_gap_points"] = {"note": "no probe data: pass --data-dir DIR (or set DISTILLGATE_DATA) "
                                                "holding wnut17/, ud_english_ewt/ and blimp/"}
        return None
    kw = {"limit_sentences": int(ctx.opt("probe_sentences")), "blimp_pairs": int(ctx.opt("blimp_pairs")),
          "seed": int(ctx.opt("seed")), "max_layers": int(ctx.opt("probe_layers")),
          "max_iter": int(ctx.opt("probe_max_iter")), "selection": str(ctx.opt("probe_selection"))}
    t, s = ctx.teacher(), ctx.student()
    key = json.dumps(["probes", PROBE_VERSION, str(Path(data_dir).resolve()), kw], sort_keys=True)
    fresh = key not in ctx.teacher_cache
    if fresh:
        ctx.teacher_cache[key] = probe_suite(t.model, t.tokenizer, data_dir, cache=True, fingerprint=t.fingerprint,
                                             **kw)
    tr = ctx.teacher_cache[key]
    sr = probe_suite(s.model, s.tokenizer, data_dir, **kw)
    gap = f1_gap(tr, sr)
    ctx.details["f1_gap_points"] = {**gap, "teacher": tr, "student": sr,
                                    "seconds": {"teacher": tr["seconds"]["total"] if fresh and not tr.get("cached") else 0.0,
                                                "student": sr["seconds"]["total"]}}
    report_size(ctx, "f1_gap_points", min(gap["family_n"].values()), gap["ci95"],
                "max over families of a normal-approximation CI of each F1 gap (see probes.gap_ci)")
    return gap["f1_gap_points"]


def _register() -> None:
    from ..gates import register_metric_provider

    register_metric_provider("f1_gap_points", f1_gap_provider, higher_is_better=False,
                             description="largest teacher-minus-student F1 gap in points over grammaticality, "
                                         "NER and dependency-parsing probes (G-C2)")


_register()
