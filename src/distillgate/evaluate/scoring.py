"""Batched log-likelihood of continuations given contexts, with shared-prefix packing.

This is the engine under every likelihood metric (multiple choice, minimal pairs). Semantics follow
lm-evaluation-harness (``HFLM.loglikelihood``) so scores are comparable:

* a request is ``(context, continuation)``; trailing whitespace of the context moves to the continuation,
  the pair is tokenised as ``enc(context + continuation)`` split at ``len(enc(context))``
  (:func:`encode_pair`); an empty context is replaced by the prefix token (BOS, else EOS);
* the score is the sum of the continuation tokens' log-probs, plus whether greedy decoding reproduces it.

What makes it faster than lm-eval's HF backend without changing a number:

1. **One context, many continuations.** A document's context is encoded once; its continuations are
   packed after it in the same row and attend to it through a tree-shaped attention mask (4D mask, explicit
   position ids). lm-eval re-encodes the context once per choice.
2. **Several documents per row, no padding.** Documents are packed side by side in one row (block-diagonal
   mask), so no compute is spent on pad tokens.
3. **A prefix shared by all documents** (e.g. MMLU's 5-shot header, ~85% of each prompt) is encoded once
   for the whole task and reused through the KV cache.
4. **Vocabulary projection only where a score is needed** (``logits_to_keep``): lm-eval projects and
   log-softmaxes every position (~20% of SmolLM2's FLOPs go to its 49k-wide head).

``batch_size`` counts scored continuations per forward, the same unit as lm-eval's batch size.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..errors import InputError

# (context token ids, [continuation token ids, ...]) for one document.
DocRequest = tuple[list[int], list[list[int]]]


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float      # sum of log p(continuation token | everything before it), float32 math
    is_greedy: bool     # every continuation token is the argmax at its position
    n_tokens: int


def in_eval_mode(fn):
    """Run ``fn(model, ...)`` (and ``teacher=`` / 2nd model arg when it is a module) in eval mode, restoring
    each model's training flag afterwards: a student evaluated mid-training must not see dropout."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        models = [a for a in args[:2] if isinstance(a, torch.nn.Module)]
        with contextlib.ExitStack() as stack:
            for m in models:
                stack.callback(m.train, m.training)
                m.eval()
            return fn(*args, **kwargs)
    return wrapper


def prefix_token_id(tokenizer) -> int:
    """lm-eval's conditioning token for an empty context: BOS when the tokenizer has one, else EOS."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise InputError("tokenizer has neither a BOS nor an EOS token to condition an empty context on")
    return int(tid)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenise a request exactly as lm-eval 0.4 does for causal models (``TemplateLM._encode_pair``)."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        pid = prefix_token_id(tokenizer)
        return ([pid], cont) if cont[:1] != [pid] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def _pack_rows(docs: list[DocRequest], order: list[int], p: int, batch_size: int, max_row_tokens: int):
    """Greedy packing: yield lists of doc indices whose continuations (<= batch_size) and tokens fit a row."""
    row, n_req, n_tok = [], 0, 0
    for i in order:
        ctx, conts = docs[i]
        size = len(ctx) - p + sum(len(c) - 1 for c in conts)
        if row and (n_req + len(conts) > batch_size or n_tok + size > max_row_tokens):
            yield row
            row, n_req, n_tok = [], 0, 0
        row.append(i)
        n_req += len(conts)
        n_tok += size
    if row:
        yield row


def _build_row(docs: list[DocRequest], idxs: list[int], p: int):
    """Token ids, position ids, allowed-attention matrix and score bookkeeping for one packed row.

    Each document contributes a context segment (its tokens after the shared prefix) followed by one
    segment per continuation. A token attends to earlier tokens of its own segment and, for a
    continuation, to its document's context segment: ``allowed[i, j] = j <= i and seg[j] in {seg[i],
    parent[i]}`` (a context always precedes its continuations in the row).
    Returns ``ids [L]``, ``pos [L]``, ``allowed [L, L] bool`` and ``targets``: per doc, per continuation,
    ``(query_positions, target_ids)`` in row coordinates.
    """
    ids, pos, seg, parent, targets = [], [], [], [], []
    n_seg = 0
    for i in idxs:
        ctx, conts = docs[i]
        suffix = ctx[p:]
        ctx_seg, n_seg = n_seg, n_seg + 1
        ids += suffix
        pos += range(p, len(ctx))
        seg += [ctx_seg] * len(suffix)
        parent += [ctx_seg] * len(suffix)
        last_ctx = len(ids) - 1
        doc_t = []
        for cont in conts:
            # A continuation's last token is only ever a target, never an input: it is left out of the row
            # (so a context may keep max_len + 1 - len(cont) tokens, as lm-eval's HFLM does).
            a = len(ids)
            ids += cont[:-1]
            pos += range(len(ctx), len(ctx) + len(cont) - 1)
            seg += [n_seg] * (len(cont) - 1)
            parent += [ctx_seg] * (len(cont) - 1)
            n_seg += 1
            doc_t.append(([last_ctx] + list(range(a, a + len(cont) - 1)), cont))
        targets.append(doc_t)
    seg_t, par_t = torch.tensor(seg), torch.tensor(parent)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril_()
    allowed = causal & ((seg_t[None, :] == seg_t[:, None]) | (seg_t[None, :] == par_t[:, None]))
    return ids, pos, allowed, targets


@in_eval_mode
@torch.no_grad()
def score_requests(model, docs: list[DocRequest], *, batch_size: int = 8, shared_prefix_min: int = 32,
                   max_row_tokens: int = 2048, max_length: int | None = None) -> list[list[ContinuationScore]]:
    """Score every continuation of every document.

    docs: ``[(context_ids, [cont_ids, ...]), ...]``; contexts must be non-empty (use :func:`encode_pair`,
    which substitutes the prefix token) and continuations non-empty.
    Returns ``scores[d][j]`` for continuation j of document d, in input order.
    Contexts longer than the model's window are left-truncated exactly like lm-eval's HFLM (the input is the
    last ``max_len`` tokens of context + continuation without its final token).
    """
    if batch_size < 1:
        raise InputError(f"batch_size: got {batch_size}; allowed: >= 1")
    if not docs:
        return []
    attn = getattr(model.config, "_attn_implementation", "eager")
    if attn not in ("eager", "sdpa"):
        raise InputError(f"packed scoring needs attn_implementation 'eager' or 'sdpa', model uses {attn!r}")
    max_len = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    docs = [_checked(ctx, conts, max_len, d) for d, (ctx, conts) in enumerate(docs)]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    neg = torch.finfo(dtype).min

    # A prefix common to all contexts (leaving >= 1 own context token per doc) is encoded once.
    p = min(_common_prefix_len([c for c, _ in docs]), min(len(c) for c, _ in docs) - 1)
    cache = None
    if p >= shared_prefix_min and len(docs) > 1:
        cache = model(torch.tensor([docs[0][0][:p]], device=device), use_cache=True).cache
    else:
        p = 0

    out: list[list[ContinuationScore] | None] = [None] * len(docs)
    # Longest first (like lm-eval): an out-of-memory error shows up on the first row, not the last.
    order = sorted(range(len(docs)), key=lambda i: -(len(docs[i][0]) + sum(map(len, docs[i][1]))))
    for idxs in _pack_rows(docs, order, p, batch_size, max_row_tokens):
        ids, pos, allowed, targets = _build_row(docs, idxs, p)
        if cache is not None:
            cache.crop(-(cache.get_seq_length() - p))   # drop the previous row's keys, keep the prefix
            allowed = torch.cat([torch.ones(len(ids), p, dtype=torch.bool), allowed], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, neg)[None, None].to(device)
        query = sorted({q for doc_t in targets for qs, _ in doc_t for q in qs})
        where = {q: k for k, q in enumerate(query)}
        logits = model(torch.tensor([ids], device=device), attention_mask=mask,
                       position_ids=torch.tensor([pos], device=device), cache=cache,
                       use_cache=cache is not None, logits_to_keep=torch.tensor(query, device=device)).logits
        logp = torch.log_softmax(logits[0].float(), dim=-1)          # [K, V]
        greedy = logp.argmax(-1)
        for i, doc_t in zip(idxs, targets):
            res = []
            for qs, cont in doc_t:
                rows = torch.tensor([where[q] for q in qs], device=device)
                tgt = torch.tensor(cont, device=device)
                lp = logp[rows, tgt].sum().item()
                res.append(ContinuationScore(lp, bool((greedy[rows] == tgt).all()), len(cont)))
            out[i] = res
    return out  # type: ignore[return-value]


def _checked(ctx: list[int], conts: list[list[int]], max_len: int, d: int) -> DocRequest:
    if not ctx:
        raise InputError(f"request {d}: empty context (encode_pair substitutes the prefix token)")
    if not conts or any(len(c) == 0 for c in conts):
        raise InputError(f"request {d}: every document needs >= 1 non-empty continuation")
    longest = max(len(c) for c in conts)
    if longest > max_len:
        raise InputError(f"request {d}: continuation of {longest} tokens exceeds the model window {max_len}")
    if len(ctx) + longest > max_len + 1:      # lm-eval: (ctx + cont)[-(max_len + 1):][:-1] is the input
        ctx = ctx[-(max_len + 1 - longest):]
    return list(ctx), [list(c) for c in conts]
