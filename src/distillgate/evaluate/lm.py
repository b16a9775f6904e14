"""Language-modelling metrics: rolling-window perplexity, minimal pairs (BLiMP), and student-vs-teacher
divergence on held-out tokens.

Perplexity follows the Hugging Face perplexity recipe ("Perplexity of fixed-length models"): windows of
``window`` tokens start every ``stride`` tokens; each window scores only the tokens no earlier window
scored, so every token but the first is scored exactly once, with up to ``window - stride`` tokens of
context. Windows are batched (right padding) and the vocabulary projection is only computed at scored
positions. Sums are accumulated in float64.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import InputError
from .scoring import encode_pair, in_eval_mode, score_requests
from .teacher import compare_to_teacher, text_examples  # noqa: F401  (public API lives here too)


def _is_file(s: str) -> bool:
    try:
        return "\n" not in s and Path(s).is_file()
    except (OSError, ValueError):      # too long / not a valid path: it is text
        return False


def _read_text(text_or_file: str | Path) -> str:
    """A ``Path`` or a string naming an existing file is read; any other string is the text itself."""
    if isinstance(text_or_file, Path) or _is_file(text_or_file):
        p = Path(text_or_file)
        try:
            return p.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"{p}: cannot read text ({e})") from e
    return str(text_or_file)


def count_words(text: str) -> int:
    """Whitespace-separated words (lm-eval's word_perplexity denominator)."""
    return len(re.findall(r"\S+", text))


def tokenize_text(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], str]:
    """Token ids of ``text`` (no special tokens), cut to ``max_tokens``; returns (ids, the text they cover)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = text[: enc["offset_mapping"][max_tokens - 1][1]]
    return ids, text


def window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window, HF recipe: the last ``n_scored`` tokens of ``[begin, end)``
    are scored. Over all windows, tokens ``1..n_tokens-1`` are each scored exactly once."""
    if window < 2 or not 1 <= stride <= window:
        raise InputError(f"window={window}, stride={stride}; allowed: window >= 2 and 1 <= stride <= window")
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        n_scored = end - max(prev_end, begin + 1)   # the first token of the text has no context
        plan.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@in_eval_mode
@torch.no_grad()
def perplexity(model, tokenizer, text_or_file: str | Path, *, max_tokens: int | None = 4096, window: int = 512,
               stride: int = 256, batch_size: int = 4) -> dict:
    """Rolling-window perplexity of a text (or a text file).

    Returns ``{ppl_token, ppl_word, nll_sum, n_tokens, n_words}``: ``nll_sum`` is the summed negative
    log-likelihood (nats) of the ``n_tokens`` scored tokens; ``ppl_word = exp(nll_sum / n_words)``.
    """
    text = _read_text(text_or_file)
    ids, covered = tokenize_text(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise InputError(f"perplexity needs >= 2 tokens of text, got {len(ids)}")
    plan = window_plan(len(ids), window, stride)
    device = next(model.parameters()).device
    nll_sum, n_scored = 0.0, 0
    for b in range(0, len(plan), batch_size):
        chunk = plan[b:b + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        inp = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros_like(inp)
        keep = torch.zeros(len(chunk), width, dtype=torch.bool)   # positions whose next token is scored
        for r, (begin, end, k) in enumerate(chunk):
            inp[r, :end - begin] = torch.tensor(ids[begin:end])
            att[r, :end - begin] = 1
            keep[r, end - begin - k - 1:end - begin - 1] = True
        tgt = torch.roll(inp, -1, dims=1)[keep].to(device)                         # [K]
        keep_d = keep.to(device)
        logits = model(inp.to(device), attention_mask=att.to(device), logits_to_keep=keep_d).logits
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)  # [K, V]
        nll_sum -= logp.gather(1, tgt[:, None]).double().sum().item()
        n_scored += int(keep.sum())
    n_words = count_words(covered)
    return {"ppl_token": math.exp(nll_sum / n_scored), "ppl_word": math.exp(nll_sum / max(n_words, 1)),
            "nll_sum": nll_sum, "n_tokens": n_scored, "n_words": n_words}


def minimal_pairs(model, tokenizer, jsonl_paths: list[str | Path], limit: int | None = None, *,
                  batch_size: int = 16) -> dict:
    """BLiMP-style accuracy of JSONL files (``limit`` caps pairs per file); see :func:`score_minimal_pairs`."""
    from .formats import load_format

    if not jsonl_paths:
        raise InputError("minimal_pairs: no JSONL files given")
    rows = [r for p in jsonl_paths for r in load_format("blimp", p, limit)]
    return score_minimal_pairs(model, tokenizer, rows, batch_size=batch_size)


def score_minimal_pairs(model, tokenizer, rows: list[tuple[str, dict]], *, batch_size: int = 16) -> dict:
    """A pair is right when log P(sentence_good) >= log P(sentence_bad), as lm-eval's ``blimp`` task scores it.

    lm-eval's task is multiple choice with an empty context, choices ``[sentence_good, sentence_bad]`` and
    gold 0: each choice is scored as ``" " + sentence`` (its default target delimiter) after the prefix token,
    and ``argmax`` picks the first of tied scores, so a tie counts as right. ``rows`` are
    :func:`~distillgate.evaluate.formats.load_format` ``("blimp", ...)`` rows (``UID`` is the paradigm).
    Returns ``{accuracy, per_paradigm: {uid: accuracy}, n, per_paradigm_n, per_doc}``.
    """
    reqs, meta = [], []
    for where, row in rows:
        good = encode_pair(tokenizer, "", " " + row["sentence_good"])
        bad = encode_pair(tokenizer, "", " " + row["sentence_bad"])
        split = good[0] != bad[0]      # the prefix token was swallowed by one sentence: score separately
        reqs += [(good[0], [good[1]]), (bad[0], [bad[1]])] if split else [(good[0], [good[1], bad[1]])]
        meta.append((where, row["UID"], split))
    scores = iter(score_requests(model, reqs, batch_size=batch_size))
    correct: dict[str, list[int]] = {}
    per_doc = []
    for where, uid, split in meta:
        first = next(scores)
        lp_good, lp_bad = (first[0].logprob, next(scores)[0].logprob) if split else (first[0].logprob, first[1].logprob)
        ok = lp_good >= lp_bad
        correct.setdefault(uid, []).append(int(ok))
        per_doc.append({"doc_id": where, "gold": 0, "pred": 0 if ok else 1, "loglikelihoods": [lp_good, lp_bad],
                        "correct": ok, "tags": [f"paradigm:{uid}"]})
    total = [c for v in correct.values() for c in v]
    if not total:
        raise InputError("minimal_pairs: no pairs to score")
    return {"accuracy": sum(total) / len(total), "n": len(total),
            "per_paradigm": {k: sum(v) / len(v) for k, v in correct.items()},
            "per_paradigm_n": {k: len(v) for k, v in correct.items()}, "per_doc": per_doc}


def score_last_word(model, tokenizer, rows: list[tuple[str, dict]], *, batch_size: int = 16) -> dict:
    """LAMBADA as lm-eval's ``lambada_openai``: context = all but the last space-separated word, target =
    ``" " + last word``; ``acc`` = greedy decoding reproduces the target, ``perplexity`` = exp(-mean log p).
    Returns ``{acc, acc_stderr, perplexity, n, per_doc}``."""
    reqs = []
    for _, row in rows:
        words = row["text"].split(" ")
        ctx, cont = encode_pair(tokenizer, " ".join(words[:-1]), " " + words[-1])
        reqs.append((ctx, [cont]))
    scores = score_requests(model, reqs, batch_size=batch_size)
    per_doc = [{"doc_id": w, "pred": int(s[0].is_greedy), "loglikelihoods": [s[0].logprob], "correct": s[0].is_greedy}
               for (w, _), s in zip(rows, scores)]
    acc = [float(d["correct"]) for d in per_doc]
    n = len(acc)
    mean = sum(acc) / n
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1) / n) if n > 1 else float("nan")
    return {"acc": mean, "acc_stderr": se, "n": n,
            "perplexity": math.exp(-sum(d["loglikelihoods"][0] for d in per_doc) / n), "per_doc": per_doc}


def wikitext_detokenize(page: str) -> str:
    """lm-eval's ``wikitext_detokenizer`` (its wikitext task scores the detokenized page)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer({"page": page})


def document_perplexity(model, tokenizer, pages: list[str], *, detokenize: bool = True, max_length: int | None = None,
                        batch_size: int = 8) -> dict:
    """lm-eval's ``wikitext`` task, natively: each document is scored on its own with ``loglikelihood_rolling``
    (disjoint windows of ``max_length`` tokens - the model's window by default - the first token conditioned
    on the prefix token, every token scored once, each window as much context as fits); words are counted in
    the page *before* detokenization (``re.split(r"\\s+")``), bytes as UTF-8 of the scored text.
    Returns ``{word_perplexity, byte_perplexity, bits_per_byte, nll_sum, n_words, n_bytes, n_tokens, per_doc}``."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from .scoring import prefix_token_id

    max_len = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    reqs, owner, per_doc = [], [], []
    for i, page in enumerate(pages):
        text = wikitext_detokenize(page) if detokenize else page
        ids = tokenizer.encode(text, add_special_tokens=False)
        wins = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix_token_id(tokenizer), max_len, 1)]
        reqs += [(ctx, [cont]) for ctx, cont in wins]
        owner += [i] * len(wins)
        per_doc.append({"doc_id": f"doc-{i}", "n_words": len(re.split(r"\s+", page)),
                        "n_bytes": len(page.encode("utf-8")), "n_tokens": len(ids), "loglikelihood": 0.0})
    for i, sc in zip(owner, score_requests(model, reqs, batch_size=batch_size, max_length=max_len,
                                           max_row_tokens=max(2048, max_len))):
        per_doc[i]["loglikelihood"] += sc[0].logprob
    ll = sum(d["loglikelihood"] for d in per_doc)
    words, nbytes = sum(d["n_words"] for d in per_doc), sum(d["n_bytes"] for d in per_doc)
    return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2), "nll_sum": -ll, "n_words": words, "n_bytes": nbytes,
            "n_tokens": sum(d["n_tokens"] for d in per_doc), "per_doc": per_doc}


def split_documents(text: str) -> list[str]:
    """A WikiText file (one paragraph per line) -> its articles, split before each top-level heading line
    (`` = Title = ``), as the document-level WikiText dataset lm-eval reads groups them."""
    docs, cur = [], []
    for line in text.splitlines(keepends=True):
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")) and any(s.strip() for s in cur):
            docs.append("".join(cur))
            cur = []
        cur.append(line)
    if any(s.strip() for s in cur):
        docs.append("".join(cur))
    return docs
