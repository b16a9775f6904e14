"""G-C4 decision-path consistency: does the student reach the teacher's answer from the same evidence?

Instructions are generated with a known structure: numbered evidence pieces (invoices, contracts, bookings,
loans: dates, amounts, account states, limits), a question with three-level nested conditions that refers
to pieces by number (cross-document references, time constraints), and distractor pieces. The correct
one-word decision and the pieces it depends on are known.

For each instruction and model: the model answers greedily (the first word decides); the **evidence path**
is the ranking of the pieces by gradient x input attribution of the answer's first token log-prob with
respect to the input embeddings, summed (|.|) over each piece's tokens. The path's length ``m`` is the number
of pieces the instruction's conditions reference. An instruction is *consistent* when the student's answer
equals the teacher's and the student's top-``m`` pieces are the teacher's top-``m`` pieces in the same order.
The report also gives the lenient variant (same set, any order), answer agreement alone, and each model's
accuracy against the ground truth. Teacher paths are cached per (teacher fingerprint, instructions).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta

import torch

from ..errors import InputError
from ..io import atomic_write_json, distillgate_home, sha256_json

_COMPANIES = ["Acme", "Borealis", "Cobalt", "Dunmore", "Everly", "Fjord", "Granite", "Helix", "Ivory", "Juniper"]
_DISTRACTORS = ["The office moved to a new building in {y}.", "The team lunch is on Fridays.",
                "{c} changed its logo last spring.", "The printer on floor 2 is out of toner.",
                "The quarterly newsletter goes out in {m}.", "Parking permits are renewed every January."]
_MONTHS = ["March", "June", "September", "December"]


@dataclass
class Instruction:
    id: str
    pieces: list[str]           # evidence texts, shown as [1]..[n]
    question: str
    answer: str                 # ground-truth decision word
    relevant: list[int]         # 0-based piece indices the conditions reference, in reasoning order
    meta: dict = field(default_factory=dict)

    def prompt(self) -> str:
        ev = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(self.pieces))
        return f"Evidence:\n{ev}\n\nQuestion: {self.question} Reply with one word."


def _d(x: date) -> str:
    return x.isoformat()


def _invoice(rng: random.Random) -> tuple[list[str], list[str], str, list[str]]:
    c = rng.choice(_COMPANIES)
    issued = date(2026, rng.randint(1, 11), rng.randint(1, 28))
    deadline = issued + timedelta(days=rng.choice([-6, -2, 3, 9]))
    amount, limit = rng.choice([400, 900, 1200, 2500]), rng.choice([1000, 2000])
    frozen = rng.random() < 0.3
    pieces = {"inv": f"Invoice from {c} was issued on {_d(issued)} for {amount} EUR.",
              "ddl": f"The contract with {c} sets the payment deadline to {_d(deadline)}.",
              "acc": f"{c}'s account status is {'frozen' if frozen else 'active'}.",
              "lim": f"The team's approval limit is {limit} EUR."}
    q = ("If the invoice in {inv} was issued on or before the deadline in {ddl}, and unless the account in {acc} "
         "is frozen, answer APPROVE when the amount is within the limit in {lim} and ESCALATE when it exceeds it; "
         "otherwise answer REJECT.")
    if issued > deadline or frozen:
        ans = "REJECT"
        rel = ["inv", "ddl"] if issued > deadline else ["inv", "ddl", "acc"]
    else:
        ans = "APPROVE" if amount <= limit else "ESCALATE"
        rel = ["inv", "ddl", "acc", "lim"]
    return list(pieces), [pieces[k] for k in pieces], q, ans, rel


def _booking(rng):
    c = rng.choice(_COMPANIES)
    travel = date(2026, rng.randint(1, 11), rng.randint(1, 28))
    booked = travel - timedelta(days=rng.choice([3, 10, 20, 40]))
    cutoff = rng.choice([7, 14])
    price, budget = rng.choice([300, 700, 1500]), rng.choice([800, 1600])
    pieces = {"trip": f"The trip to the {c} site is on {_d(travel)}.",
              "book": f"The flight was booked on {_d(booked)} for {price} EUR.",
              "pol": f"Travel policy: flights must be booked at least {cutoff} days ahead.",
              "bud": f"The remaining travel budget is {budget} EUR."}
    q = ("If the booking date in {book} is at least as many days before the trip in {trip} as the policy in {pol} "
         "requires, answer ACCEPT when the price fits the budget in {bud}, else answer REVIEW; if the booking "
         "was too late, answer DECLINE.")
    ahead = (travel - booked).days
    if ahead < cutoff:
        ans, rel = "DECLINE", ["book", "trip", "pol"]
    else:
        ans, rel = ("ACCEPT" if price <= budget else "REVIEW"), ["book", "trip", "pol", "bud"]
    return list(pieces), [pieces[k] for k in pieces], q, ans, rel


def _loan(rng):
    c = rng.choice(_COMPANIES)
    score, need = rng.choice([580, 640, 710, 780]), rng.choice([620, 700])
    debt, cap = rng.choice([20, 35, 45]), rng.choice([30, 40])
    pieces = {"score": f"{c}'s applicant has a credit score of {score}.",
              "rule": f"The bank requires a credit score of at least {need}.",
              "debt": f"The applicant's debt-to-income ratio is {debt}%.",
              "cap": f"Loans are capped at a debt-to-income ratio of {cap}%."}
    q = ("If the score in {score} meets the requirement in {rule}, answer GRANT unless the ratio in {debt} is above "
         "the cap in {cap}, in which case answer REFER; if the score is too low, answer DENY.")
    if score < need:
        ans, rel = "DENY", ["score", "rule"]
    else:
        ans, rel = ("GRANT" if debt <= cap else "REFER"), ["score", "rule", "debt", "cap"]
    return list(pieces), [pieces[k] for k in pieces], q, ans, rel


_KINDS = {"invoice": _invoice, "booking": _booking, "loan": _loan}


def generate_instructions(n: int, seed: int = 0, distractors: int = 2) -> list[Instruction]:
    """``n`` instructions, kinds in rotation, evidence order shuffled, ``distractors`` unrelated pieces added."""
    if n < 1:
        raise InputError(f"decision path: n must be >= 1, got {n}")
    rng = random.Random(seed)
    out = []
    kinds = sorted(_KINDS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        keys, texts, q, ans, rel = _KINDS[kind](rng)
        c = rng.choice(_COMPANIES)
        extra = [t.format(y=rng.randint(2015, 2025), c=c, m=rng.choice(_MONTHS))
                 for t in rng.sample(_DISTRACTORS, distractors)]
        items = list(zip(keys, texts)) + [(f"x{j}", t) for j, t in enumerate(extra)]
        rng.shuffle(items)
        pos = {k: j for j, (k, _) in enumerate(items)}
        question = q.format(**{k: f"[{pos[k] + 1}]" for k in keys})
        out.append(Instruction(id=f"{kind}-{i}", pieces=[t for _, t in items], question=question, answer=ans,
                               relevant=[pos[k] for k in rel], meta={"kind": kind}))
    return out


def _encode(tokenizer, inst: Instruction):
    """Chat-templated prompt ids [1, T] and each piece's token span (start, end) in them."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": inst.prompt()}], tokenize=False,
                                         add_generation_prompt=True)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    spans, cursor = [], 0
    for i, p in enumerate(inst.pieces):
        marker = f"[{i + 1}] {p}"
        start = text.index(marker, cursor)
        end = start + len(marker)
        cursor = end
        toks = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
        if not toks:
            raise InputError(f"instruction {inst.id}: piece {i + 1} has no tokens")
        spans.append((toks[0], toks[-1] + 1))
    return torch.tensor([enc["input_ids"]]), spans


PATH_VERSION = 2   # 2: batched (left padding, position ids from the mask), logits of the last position only


def _answer_word(tokenizer, new: list[int], stops: set[int]) -> tuple[str, int]:
    """The first word of a greedy continuation (cut at the first stop token) and its first token."""
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    words = tokenizer.decode(new[:cut], skip_special_tokens=True).strip().split()
    answer = words[0].strip(".,:;!\"'").upper() if words else ""
    return answer, int(new[0]) if new else int(tokenizer.eos_token_id)


def evidence_paths(model, tokenizer, insts: list[Instruction], max_new_tokens: int = 4,
                   batch_size: int = 16) -> list[dict]:
    """Each instruction's answer word and evidence ranking (gradient x input per piece, descending).

    Batched: ``batch_size`` prompts left-padded into one greedy ``generate`` (KV cache, stop at eos, under
    ``inference_mode``), then one forward/backward for the batch with position ids from the attention mask
    (as ``generate`` uses them) and the logits of the last position only; rows are independent, so the
    gradient of the summed first-token log-probs is each row's own. Equal to ``batch_size=1`` up to float
    rounding (tested)."""
    enc = [_encode(tokenizer, i) for i in insts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tokenizer.eos_token_id}
    stops.discard(None)
    was = model.training
    model.eval()
    # only the input embeddings need a gradient: the weights' gradients would double the backward's cost
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: (-enc[i][0].shape[1], i))   # similar lengths share a batch
    out: list[dict | None] = [None] * len(enc)
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(enc[i][0].shape[1] for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for r, i in enumerate(idx):   # left padding: every prompt ends at the last column
                n = enc[i][0].shape[1]
                ids[r, width - n:], att[r, width - n:] = enc[i][0][0], 1
            ids, att = ids.to(device), att.to(device)
            with torch.inference_mode():
                gen = model.generate(ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad)
            words = [_answer_word(tokenizer, gen[r, width:].tolist(), stops) for r in range(len(idx))]
            first = torch.tensor([f for _, f in words], device=device)
            pos = (att.cumsum(-1) - 1).clamp_min(0)
            emb = model.get_input_embeddings()(ids).detach().float().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=emb.to(dtype), attention_mask=att, position_ids=pos,
                               use_cache=False, logits_to_keep=1).logits[:, -1].float()
                torch.log_softmax(logits, -1).gather(1, first[:, None]).sum().backward()
            per_tok = (emb.grad * emb).sum(-1).abs().detach().cpu()
            for r, i in enumerate(idx):
                shift = width - enc[i][0].shape[1]
                scores = [float(per_tok[r, shift + a:shift + e].sum()) for a, e in enc[i][1]]
                out[i] = {"answer": words[r][0], "scores": scores,
                          "ranking": sorted(range(len(scores)), key=lambda k: -scores[k])}
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was)
    return out


def evidence_path(model, tokenizer, inst: Instruction, max_new_tokens: int = 4) -> dict:
    """The model's answer word and its evidence ranking for one instruction (:func:`evidence_paths`)."""
    return evidence_paths(model, tokenizer, [inst], max_new_tokens, batch_size=1)[0]


def compare_paths(t: dict, s: dict, m: int) -> dict:
    same_answer = t["answer"] == s["answer"]
    top_t, top_s = t["ranking"][:m], s["ranking"][:m]
    return {"same_answer": same_answer, "same_set": set(top_t) == set(top_s), "same_order": top_t == top_s,
            "consistent": same_answer and top_t == top_s, "consistent_lenient": same_answer and set(top_t) == set(top_s)}


def decision_path_consistency(student, teacher, tokenizer, *, n: int = 60, seed: int = 0,
                              teacher_fingerprint: str | None = None, memo: dict | None = None,
                              batch_size: int = 16) -> dict:
    """G-C4 over ``n`` generated instructions (SPEC default 5,000; the CPU preset is small): see module doc.
    ``memo``: an in-memory cache of teacher paths (by the same key as the disk cache) that outlives one call."""
    import time

    insts = generate_instructions(n, seed)
    key = sha256_json([teacher_fingerprint, [asdict(i) for i in insts], PATH_VERSION]) if teacher_fingerprint else None
    cache = distillgate_home() / "eval_cache" / f"decision-path-{key[:16]}.json" if key else None
    t0 = time.perf_counter()
    if memo is not None and key is not None and key in memo:
        t_paths = memo[key]
    elif cache is not None and cache.is_file():
        t_paths = json.loads(cache.read_text())["paths"]
    else:
        t_paths = evidence_paths(teacher, tokenizer, insts, batch_size=batch_size)
        if cache is not None:
            atomic_write_json(cache, {"paths": t_paths, "key": key})
    if memo is not None and key is not None:
        memo[key] = t_paths
    t1 = time.perf_counter()
    rows = []
    for inst, tp, sp in zip(insts, t_paths, evidence_paths(student, tokenizer, insts, batch_size=batch_size)):
        c = compare_paths(tp, sp, m=len(inst.relevant))
        rows.append({"id": inst.id, "kind": inst.meta["kind"], "truth": inst.answer, "teacher": tp["answer"],
                     "student": sp["answer"], "teacher_path": tp["ranking"][:len(inst.relevant)],
                     "student_path": sp["ranking"][:len(inst.relevant)], "relevant": inst.relevant, **c})
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"path_consistency": mean("consistent"), "path_consistency_lenient": mean("consistent_lenient"),
            "answer_agreement": mean("same_answer"),
            "teacher_accuracy": sum(r["teacher"] == r["truth"] for r in rows) / len(rows),
            "student_accuracy": sum(r["student"] == r["truth"] for r in rows) / len(rows),
            "n": len(rows), "rows": rows,
            "seconds": {"teacher": t1 - t0, "student": time.perf_counter() - t1}}


# ------------------------------------------------------------------------------------------------ gate

def path_consistency_provider(ctx) -> float | None:
    """G-C4 metric provider: :func:`decision_path_consistency` over ``options['path_instructions']`` (30)
    instructions; teacher paths cached on disk by the teacher's fingerprint and in ``ctx.teacher_cache``
    (a loop iteration pays only the student's side). Needs one tokenizer for both models. The details carry
    the size used, the SPEC's (5,000) and the Wilson 95% CI of the consistent share."""
    from .providers import report_size, wilson_ci

    t, s = ctx.same_tokenizer_pair("path_consistency", "one tokenizer must serve both")
    n, seed = int(ctx.opt("path_instructions")), int(ctx.opt("seed"))
    tc = ctx.teacher_cache.setdefault("decision_path_teacher", {})
    res = decision_path_consistency(s.model, t.model, s.tokenizer, n=n, seed=seed,
                                    teacher_fingerprint=t.fingerprint, memo=tc,
                                    batch_size=int(ctx.opt("path_batch_size")))
    ctx.details["path_consistency"] = res
    ctx.extra.update({k: res[k] for k in ("path_consistency_lenient", "answer_agreement") if k in res})
    report_size(ctx, "path_consistency", res["n"], wilson_ci(sum(r["consistent"] for r in res["rows"]), res["n"]),
                "Wilson score interval (scipy)")
    return res["path_consistency"]


def _register() -> None:
    from ..gates import register_metric_provider

    register_metric_provider("path_consistency", path_consistency_provider, higher_is_better=True,
                             description="share of structured instructions where the student uses the teacher's "
                                         "evidence in the same order (G-C4)")


_register()
