"""Style of the student against the teacher on held-out prompts (what S2.4's cloning channel is for):

* ``length_ratio``: mean student answer length / mean teacher answer length (tokens);
* ``similarity``: MiniLM cosine of each student answer to the teacher's answers of the same prompt (mean over
  the teacher's samples, then over prompts), next to ``teacher_self_similarity`` (the teacher's samples to
  each other: how close two teacher answers are, the reference the student is read against);
* marker rates (share of answers with at least one marker), student vs teacher: ``politeness`` (the
  courtesy markers of the consistency quality check), ``hedging`` (may, might, it depends, ...),
  ``assertive`` (definitely, always, must, ...), ``follow_up`` (offers a next step or asks back);
* ``refusal`` rate: answers that decline ("I can't help with", "I'm unable to", "As an AI", ...).

Student answers are decoded like the teacher's (same temperature and top-p, one answer per prompt, seeded).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..consistency.checks.quality import FOLLOW_UP, POLITE

HEDGES = ("may ", "might ", "perhaps", "possibly", "it depends", "generally", "typically", "usually", "likely",
          "could be", "in some cases", "not always")
ASSERTIVE = ("definitely", "certainly", "always", "never", "must ", "clearly", "absolutely", "without doubt",
             "guaranteed")
REFUSAL = re.compile(r"(i can(?:no|')t (?:help|assist|provide|do)|i(?: am|'m) (?:unable|not able) to|"
                     r"i (?:won't|will not) |as an ai|i(?: am|'m) sorry,? but|i must decline|cannot comply|"
                     r"i(?: do not|don't) (?:have access|provide))", re.I)


def markers(text: str) -> dict[str, bool]:
    """Which style markers ``text`` carries."""
    low = " " + text.lower() + " "
    return {"politeness": any(p in low for p in POLITE), "hedging": any(h in low for h in HEDGES),
            "assertive": any(a in low for a in ASSERTIVE), "follow_up": bool(FOLLOW_UP.search(text)),
            "refusal": bool(REFUSAL.search(text))}


def marker_rates(texts: Sequence[str]) -> dict[str, float]:
    """Share of ``texts`` with each marker (0.0 for no texts)."""
    if not texts:
        return {k: 0.0 for k in markers("")}
    rows = [markers(t) for t in texts]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def style_scores(teacher_sets: Sequence[Sequence[str]], teacher_lengths: Sequence[Sequence[int]],
                 student: Sequence[str], student_lengths: Sequence[int], encode) -> dict[str, float]:
    """The style comparison from texts: ``teacher_sets[i]`` the teacher's answers to prompt i (several),
    ``student[i]`` the student's; lengths in tokens; ``encode(texts) -> [n, d]`` the sentence encoder."""
    if not student or len(student) != len(teacher_sets):
        raise ValueError(f"style: {len(student)} student answers for {len(teacher_sets)} prompts")
    flat = [t for ts in teacher_sets for t in ts] + list(student)
    emb = np.asarray(encode(flat), dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    at, sims, selfs = 0, [], []
    s_emb = emb[len(flat) - len(student):]
    for i, ts in enumerate(teacher_sets):
        te = emb[at:at + len(ts)]
        at += len(ts)
        sims.append(float((te @ s_emb[i]).mean()))
        if len(ts) > 1:
            c = te @ te.T
            selfs.append(float((c.sum() - np.trace(c)) / (len(ts) * (len(ts) - 1))))
    t_len = float(np.mean([n for ls in teacher_lengths for n in ls]))
    out = {"length_ratio": float(np.mean(student_lengths)) / max(t_len, 1e-9),
           "student_length": float(np.mean(student_lengths)), "teacher_length": t_len,
           "similarity": float(np.mean(sims)),
           "teacher_self_similarity": float(np.mean(selfs)) if selfs else float("nan")}
    t_rates, s_rates = marker_rates(flat[:len(flat) - len(student)]), marker_rates(student)
    for k in t_rates:
        out[f"{k}/teacher"], out[f"{k}/student"] = t_rates[k], s_rates[k]
    return out


def style_report(student_model, tokenizer, heldout_examples, prompts: dict, *, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, seed: int = 0, batch_size: int = 16, encode=None) -> dict:
    """:func:`style_scores` of ``student_model`` on the prompts of ``heldout_examples`` (the teacher's sampled
    answers), ``prompts`` ``{prompt_id: PromptRecord}``. The student answers once per prompt, decoded like
    the teacher (``temperature`` / ``top_p``, seeded)."""
    from ..data.generate import generate_responses

    groups: dict[str, list] = {}
    for e in heldout_examples:
        groups.setdefault(e.prompt_id, []).append(e)
    pids = sorted(groups)
    recs = [prompts[p] for p in pids]
    was = student_model.training
    student_model.eval()
    try:
        answers = generate_responses(student_model, tokenizer, recs, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                                     progress=False)
    finally:
        student_model.train(was)
    if encode is None:
        from ..data.samples import minilm_encode

        encode = minilm_encode()
    return style_scores([[e.response for e in groups[p]] for p in pids],
                        [[e.n_targets for e in groups[p]] for p in pids],
                        [a.response for a in answers], [a.n_targets for a in answers], encode)
