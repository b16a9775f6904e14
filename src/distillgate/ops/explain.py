"""G-O4 explanations: premises (quoted input spans), a reasoning chain (the answer's steps, each resting on
premises) and a confidence per step, for any (prompt, answer) of a causal LM; and the automatic spot check.

* **Spans.** The prompt (the last user message) is cut into phrases: at punctuation, then into runs of at
  most ``max_span_words`` words. A token belongs to the span holding its last character.
* **Attribution.** The target is log p(answer tokens | prompt) under the model (teacher-forced), per step.
  Captum attributes it to the input embeddings (``ig``: LayerIntegratedGradients from a baseline where every
  prompt token is the pad token, ``n_steps`` points; ``gxi``: LayerGradientXActivation, gradient x input); a
  span's score is the signed sum over its tokens and embedding dimensions. Both are linear in the target, so
  the whole answer's attribution is the sum of its steps' (no extra pass).
* **Premises** are the ``top_k`` spans with the largest positive score (support for the answer), at most a
  third of the prompt's spans so that random spans remain to compare with; **steps** are the answer's
  sentences (long ones cut at ``;`` / ``:``), each with the ``step_premises`` spans its own tokens rest on.
* **Confidence** of a step: the model's mean token probability of that step's tokens, uncalibrated.
* **Automatic spot check** (:func:`spot_check`): every quote occurs verbatim in the prompt at its offsets;
  deleting the premises from the prompt lowers log p(answer) more than deleting random spans with the same
  word lengths, in at least ``beat_share`` of ``random_draws`` draws. Pass/fail with the reasons.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError


class ExplainOptions(BaseModel):
    """How explanations are built and spot-checked."""
    model_config = ConfigDict(extra="forbid")

    method: Literal["ig", "gxi"] = Field("ig", description="attribution: ig = Captum LayerIntegratedGradients on "
                                         "the input embeddings, gxi = gradient x input (LayerGradientXActivation)")
    # 8 points: on SmolLM2-135M, 16 points did not shrink Captum's completeness error (43 vs 55 nats on a 48-token
    # answer) and cost 1.5x the time (150 s vs 102 s an explanation on the loaded 2-core machine)
    n_steps: int = Field(8, ge=2, le=256, description="integration points of ig")
    max_span_words: int = Field(4, ge=1, le=50, description="longest premise span, in words")
    top_k: int = Field(3, ge=1, le=20, description="premises per explanation (at most a third of the spans)")
    step_premises: int = Field(2, ge=1, le=20, description="premises listed per reasoning step")
    max_steps: int = Field(8, ge=1, le=64, description="reasoning steps kept (the answer's first sentences)")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="answer length when the model answers itself")
    random_draws: int = Field(5, ge=1, le=100, description="random same-length deletions per spot check")
    beat_share: float = Field(0.8, gt=0, le=1, description="share of random draws the premises' deletion must "
                              "beat (lower log p(answer) by more) for the spot check to pass")
    seed: int = Field(0, description="seed of the random deletions")


@dataclass
class Span:
    start: int  # character offsets in the text they come from
    end: int
    text: str


@dataclass
class Premise:
    span: int      # index into Explanation.spans
    quote: str
    start: int
    end: int
    score: float   # attribution to log p(answer), nats


@dataclass
class Step:
    text: str
    start: int     # character offsets in the answer
    end: int
    premises: list[int]  # indices into Explanation.spans: the spans this step's tokens rest on, ranked
    weights: list[float]  # each listed span's share of the step's positive attribution
    confidence: float    # mean token probability of the step's tokens
    n_tokens: int


@dataclass
class Explanation:
    id: str
    prompt: str
    answer: str
    spans: list[Span]
    span_scores: list[float]
    premises: list[Premise]
    steps: list[Step]
    answer_logprob: float
    method: str
    confidence_method: str = "mean token probability of the step (uncalibrated)"
    check: dict | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ text

_WORD = re.compile(r"\S+")
_SENT = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")


def split_spans(text: str, max_words: int = 4) -> list[Span]:
    """Phrases of ``text``: cut at , ; : . ! ? ( ) and newlines, then into runs of <= ``max_words`` words."""
    out = []
    for m in re.finditer(r"[^,;:.!?()\n]+[,;:.!?()]*", text):
        words = [w for w in _WORD.finditer(m.group(0)) if re.search(r"\w", w.group(0))]
        for i in range(0, len(words), max_words):
            a = m.start() + words[i].start()
            b = m.start() + words[min(i + max_words, len(words)) - 1].end()
            out.append(Span(a, b, text[a:b]))
    return out


def split_steps(answer: str, max_steps: int = 8, max_words: int = 30) -> list[Span]:
    """The answer's key steps: sentences (and lines), a long one cut at ; or : . The steps partition the
    answer from its first to its last non-space character (every answer token lies in one step)."""
    pieces = []
    for m in _SENT.finditer(answer):
        if not m.group(0).strip():
            continue
        a, s = m.start(), m.group(0)
        if len(s.split()) > max_words:
            cuts = [a] + [a + c.end() for c in re.finditer(r"[;:]\s", s)]
            pieces += [(x, y) for x, y in zip(cuts, cuts[1:] + [m.end()]) if answer[x:y].strip()]
        else:
            pieces.append((a, m.end()))
    if not pieces:
        return []
    if len(pieces) > max_steps:  # the tail joins the last kept step: the tokens still belong to one step
        pieces = pieces[:max_steps - 1] + [(pieces[max_steps - 1][0], pieces[-1][1])]
    bounds = [p[0] for p in pieces] + [len(answer.rstrip())]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        lead = len(answer[a:b]) - len(answer[a:b].lstrip())
        out.append(Span(a + lead, b, answer[a + lead:b].rstrip()))
    return out


def delete_spans(text: str, spans: list[Span]) -> str:
    """``text`` without ``spans`` (runs of spaces left behind collapsed)."""
    keep, pos = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        keep.append(text[pos:max(pos, s.start)])
        pos = max(pos, s.end)
    keep.append(text[pos:])
    return re.sub(r"[ \t]{2,}", " ", "".join(keep)).strip()


# ------------------------------------------------------------------------------------------------ encoding

def _context(tokenizer, prompt: str) -> tuple[str, int]:
    """The text the model sees before the answer (chat-templated when the tokenizer has a template) and the
    prompt's character offset in it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    at = text.rfind(prompt)
    if at < 0:
        raise InputError("explain: the chat template does not contain the prompt verbatim")
    return text, at


def encode(tokenizer, prompt: str, answer: str):
    """(ids [T], n_ctx, prompt token -> char end in prompt, answer token -> char end in answer)."""
    ctx, at = _context(tokenizer, prompt)
    c = tokenizer(ctx, return_offsets_mapping=True, add_special_tokens=False)
    a = tokenizer(answer, return_offsets_mapping=True, add_special_tokens=False)
    if not a["input_ids"]:
        raise InputError("explain: the answer is empty")
    p_end = [(b - at) if at < b <= at + len(prompt) else None for _, b in c["offset_mapping"]]
    return (torch.tensor(c["input_ids"] + a["input_ids"]), len(c["input_ids"]), p_end,
            [b for _, b in a["offset_mapping"]])


def _owner(ends: list, spans: list[Span]) -> list[int | None]:
    """For each token (its last char offset, or None), the span holding that character."""
    out = []
    for e in ends:
        j = None if e is None else next((i for i, s in enumerate(spans) if s.start < e <= s.end), None)
        out.append(j)
    return out


def _dtype(model):
    return next(model.parameters()).dtype


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: list[str], answer: str, batch_size: int = 8) -> list[float]:
    """log p(answer | prompt) for each prompt (teacher-forced, summed over the answer's tokens)."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        enc = [encode(tokenizer, p, answer)[:2] for p in prompts[i:i + batch_size]]
        L = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for r, (x, _) in enumerate(enc):  # right padding: every row's real tokens start at position 0
            ids[r, :len(x)], mask[r, :len(x)] = x, 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, (x, n_ctx) in enumerate(enc):
            tgt = x[n_ctx:]
            out.append(float(logp[r, n_ctx - 1:len(x) - 1].gather(-1, tgt[:, None]).sum()))
    return out


# ------------------------------------------------------------------------------------------------ attribution

def _attribute(model, ids: torch.Tensor, n_ctx: int, step_tokens: list[list[int]], attr_mask: torch.Tensor,
               baseline_id: int, opts: ExplainOptions) -> tuple[torch.Tensor, list[float]]:
    """Per-step attributions [S, T] (signed, summed over the embedding) of sum log p(step's tokens) to the
    input tokens, and Captum's convergence deltas (ig; completeness error in nats)."""
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    tgt = ids[n_ctx:]

    def forward(x, which):
        logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)[:, n_ctx - 1:-1]
        tok = logp.gather(-1, tgt.expand(x.shape[0], -1)[..., None])[..., 0]
        return tok[:, which].sum(-1)

    emb = model.get_input_embeddings()
    x = ids[None]
    rows, deltas = [], []
    for which in step_tokens:
        if opts.method == "ig":
            base = torch.where(attr_mask, torch.tensor(baseline_id), ids)[None]
            a, d = LayerIntegratedGradients(forward, emb).attribute(
                x, baselines=base, additional_forward_args=(which,), n_steps=opts.n_steps,
                internal_batch_size=opts.n_steps, return_convergence_delta=True)
            deltas.append(float(d.abs().max()))
        else:
            a = LayerGradientXActivation(forward, emb).attribute(x, additional_forward_args=(which,))
        rows.append(a[0].float().sum(-1).detach())
    return torch.stack(rows), deltas


def explain(model, tokenizer, prompt: str, answer: str | None = None, *, id: str = "explanation",
            options: ExplainOptions | None = None) -> Explanation:
    """The three-part explanation of ``answer`` (None: the model's greedy answer) to ``prompt``."""
    opts = options or ExplainOptions()
    if not prompt.strip():
        raise InputError(f"explain {id}: the prompt is empty")
    was = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]  # only the input side needs gradients
    for p in frozen:
        p.requires_grad_(False)
    try:
        spans = split_spans(prompt, opts.max_span_words)
        if not spans:
            raise InputError(f"explain {id}: the prompt has no words to quote")
        if answer is None:
            answer = generate_answer(model, tokenizer, prompt, opts.max_new_tokens)
            if not answer.strip():  # nothing to explain: an explanation that fails its spot check, not an error
                return Explanation(id, prompt, answer, spans, [0.0] * len(spans), [], [], float("nan"), opts.method,
                                   meta={"empty_answer": True})
        if not answer.strip():
            raise InputError(f"explain {id}: the answer is empty")
        steps = split_steps(answer, opts.max_steps)
        ids, n_ctx, p_end, a_end = encode(tokenizer, prompt, answer)
        owner = _owner(p_end + [None] * (len(ids) - n_ctx), spans)
        step_of = _owner(a_end, [Span(s.start, steps[i + 1].start if i + 1 < len(steps) else len(answer), "")
                                 for i, s in enumerate(steps)])
        step_of = [0 if j is None and k == 0 else j for k, j in enumerate(step_of)]
        for k in range(1, len(step_of)):  # a token before the first step or between steps: the step before
            if step_of[k] is None:
                step_of[k] = step_of[k - 1]
        step_tokens = [[k for k, j in enumerate(step_of) if j == i] for i in range(len(steps))]
        keep = [i for i, t in enumerate(step_tokens) if t]
        steps, step_tokens = [steps[i] for i in keep], [step_tokens[i] for i in keep]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)[n_ctx - 1:-1]
            tok_lp = logp.gather(-1, ids[n_ctx:, None])[:, 0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        attr_mask = torch.tensor([o is not None for o in owner])
        with torch.enable_grad():
            per_step, deltas = _attribute(model, ids, n_ctx, step_tokens, attr_mask, int(pad), opts)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was)

    def by_span(row):
        v = [0.0] * len(spans)
        for t, j in enumerate(owner):
            if j is not None:
                v[j] += float(row[t])
        return v

    step_scores = [by_span(r) for r in per_step]
    total = [sum(col) for col in zip(*step_scores)]
    k = max(1, min(opts.top_k, len(spans) // 3))
    ranked = [j for j in sorted(range(len(spans)), key=lambda j: -total[j]) if total[j] > 0][:k]
    premises = [Premise(j, spans[j].text, spans[j].start, spans[j].end, total[j]) for j in ranked]
    out_steps = []
    for s, toks, sc in zip(steps, step_tokens, step_scores):
        pos = [j for j in sorted(range(len(spans)), key=lambda j: -sc[j]) if sc[j] > 0][:opts.step_premises]
        norm = sum(x for x in sc if x > 0) or 1.0
        conf = float(tok_lp[toks].exp().mean())
        out_steps.append(Step(s.text, s.start, s.end, pos, [sc[j] / norm for j in pos], conf, len(toks)))
    meta = {"n_tokens": int(len(ids)), "n_answer_tokens": int(len(ids) - n_ctx)}
    if deltas:
        meta["ig_max_convergence_delta"] = max(deltas)
    return Explanation(id, prompt, answer, spans, total, premises, out_steps, float(tok_lp.sum()), opts.method,
                       meta=meta)


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ctx, _ = _context(tokenizer, prompt)
    ids = torch.tensor([tokenizer(ctx, add_special_tokens=False)["input_ids"]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------ spot check

def _random_windows(n_words: int, lengths: list[int], rng) -> list[tuple[int, int]] | None:
    """Non-overlapping word windows [a, a+len) of the given lengths, in random places (None: they do not fit)."""
    for _ in range(50):
        taken, out = set(), []
        for L in lengths:
            starts = [a for a in range(n_words - L + 1) if not taken & set(range(a, a + L))]
            if not starts:
                break
            a = starts[int(rng.integers(len(starts)))]
            taken |= set(range(a, a + L))
            out.append((a, a + L))
        else:
            return out
    return None


def spot_check(model, tokenizer, ex: Explanation, options: ExplainOptions | None = None) -> dict:
    """The automatic spot check of ``ex`` (see module doc): ``{"passed", "reasons", ...}``, also set as
    ``ex.check``."""
    import numpy as np

    opts = options or ExplainOptions()
    reasons = []
    for i, p in enumerate(ex.premises):
        if p.quote not in ex.prompt or ex.prompt[p.start:p.end] != p.quote:
            reasons.append(f"premise {i + 1} {p.quote!r} is not verbatim in the prompt at {p.start}:{p.end}")
    if ex.meta.get("empty_answer"):
        reasons.append("the model's answer is empty: nothing to explain")
    elif not ex.premises:
        reasons.append("no input span supports the answer (no positive attribution)")
    if not ex.steps and not ex.meta.get("empty_answer"):
        reasons.append("the answer has no steps")
    bad_conf = [i + 1 for i, s in enumerate(ex.steps) if not 0.0 <= s.confidence <= 1.0]
    if bad_conf:
        reasons.append(f"step confidences outside [0, 1]: steps {bad_conf}")
    res: dict = {"drop_premises": None, "drop_random": [], "beaten": None}
    if ex.premises:
        words = [m for m in _WORD.finditer(ex.prompt)]
        lengths = [len(p.quote.split()) for p in ex.premises]
        rng = np.random.default_rng([opts.seed, int.from_bytes(ex.id.encode()[:8].ljust(8, b"\0"), "little")])
        prem = {(p.start, p.end) for p in ex.premises}
        draws = []
        for _ in range(opts.random_draws):
            w = _random_windows(len(words), lengths, rng)
            if w is None:
                break
            draws.append([Span(words[a].start(), words[b - 1].end(), "") for a, b in w])
        draws = [d for d in draws if {(s.start, s.end) for s in d} != prem]
        if not draws:
            reasons.append("the prompt has no other spans of the premises' lengths to compare with")
        else:
            variants = [ex.prompt, delete_spans(ex.prompt, [Span(p.start, p.end, "") for p in ex.premises])]
            variants += [delete_spans(ex.prompt, d) for d in draws]
            was = model.training
            model.eval()
            try:
                lp = answer_logprobs(model, tokenizer, variants, ex.answer)
            finally:
                model.train(was)
            drop = lp[0] - lp[1]
            rand = [lp[0] - x for x in lp[2:]]
            beaten = sum(drop > r for r in rand)
            res.update(drop_premises=drop, drop_random=rand, beaten=beaten, n_draws=len(rand))
            if beaten < math.ceil(opts.beat_share * len(rand) - 1e-9):
                reasons.append(f"deleting the premises lowers log p(answer) by {drop:.3g} nats, more than only "
                               f"{beaten} of {len(rand)} random same-length deletions (mean drop "
                               f"{sum(rand) / len(rand):.3g}); needs {math.ceil(opts.beat_share * len(rand) - 1e-9)}")
    res.update(passed=not reasons, reasons=reasons)
    ex.check = res
    return res
