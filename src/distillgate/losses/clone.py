"""S2.4 response behaviour cloning (``loss.channels.clone``): the student reproduces the teacher's sampled
answers, knowledge over style, and stays concise.

Per teacher answer ``y`` (one example; its prompt has several sampled answers, :mod:`distillgate.data.samples`):

    clone(y) = c_y * sum_t m_t * (-log q(y_t | y_<t))  +  lambda * relu(E_y - rho * L) / L

* ``m_t``: the diversity mask (lower where the prompt's samples disagree: style, not knowledge);
* ``c_y``: the coherence weight (0 for an incoherent sample, dropped; else its MiniLM coherence, mean 1);
* the first term is the answer's masked sequence log-likelihood; it is computed inside the fused lm-head
  loss (closed-form gradient, chunked) as the teacher-token NLL with ``m_t * c_y`` as the clone channel's
  per-token weight, so it costs no extra pass over the vocabulary;
* the conciseness term: along the teacher's answer the student stops at position t with hazard
  ``h_t = q(<end-of-turn> | y_<t)``; ``S_t = prod_{u<t} (1 - h_u)`` is its probability of still talking at t
  and ``E_y = sum_{t<=n} S_t`` its expected answer length (truncated at the sample's n tokens). ``L`` is the
  median length of the prompt's kept samples, ``rho = loss.clone.concise_ratio``, ``lambda =
  loss.clone.concise_weight``. ``E_y <= n``, so only samples longer than ``rho * L`` can be penalised: the
  logits for this term are formed (with autograd) for those samples' rows only.

The per-token report of the channel is ``m_t * c_y * NLL_t``; the conciseness penalty is reported as
``clone_concise`` spread over the sample's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import InputError
from .divergence import log1mexp


@dataclass
class CloneBatch:
    """The clone channel's teacher side for one batch: ``mask`` ``[N]`` (diversity mask times coherence
    weight, in prediction-position order), ``ref_len`` ``[B]`` and ``counts`` ``[B]`` (prediction positions
    per sample)."""

    mask: torch.Tensor
    ref_len: torch.Tensor
    counts: torch.Tensor


class CloneProvider:
    """``provider(batch) -> CloneBatch`` from ``{example_id: CloneRow}`` (``data.samples.build_clone_rows``)."""

    def __init__(self, rows: dict, eot_id: int):
        self.rows, self.eot_id = rows, int(eot_id)

    def __call__(self, batch: Mapping[str, Any]) -> CloneBatch:
        counts = (batch["loss_mask"][:, 1:] != 0).sum(1).tolist()
        masks, refs = [], []
        for ex_id, c in zip(batch["example_ids"], counts):
            row = self.rows.get(ex_id)
            if row is None:
                raise InputError(f"loss.channels.clone: no teacher-sample data for example {ex_id!r} (its prompt's "
                                 f"samples were not prepared)")
            if len(row.mask) < c:
                raise InputError(f"loss.channels.clone: example {ex_id!r} has {c} target tokens in the batch but "
                                 f"its diversity mask has {len(row.mask)} (different data)")
            masks.append(torch.tensor(row.mask[:c], dtype=torch.float32) * float(row.weight))
            refs.append(float(row.ref_len))
        mask = torch.cat(masks) if masks else torch.zeros(0)
        return CloneBatch(mask=mask, ref_len=torch.tensor(refs, dtype=torch.float32),
                          counts=torch.tensor(counts, dtype=torch.long))


def expected_length(log_hazard: torch.Tensor) -> torch.Tensor:
    """``E = sum_t S_t`` with ``S_1 = 1``, ``S_t = prod_{u<t} (1 - h_u)`` from ``log h`` ``[n]`` (float32 or 64)."""
    log_go = log1mexp(log_hazard.clamp_max(-1e-6))                # log(1 - h_u); h -> 1 stays finite
    excl = torch.cat([log_go.new_zeros(1), torch.cumsum(log_go, 0)[:-1]])
    return excl.exp().sum()


def concise_penalty(hidden: torch.Tensor, weight: torch.Tensor, eot_id: int, counts: torch.Tensor,
                    ref_len: torch.Tensor, ratio: float, chunk_size: int = 256) -> torch.Tensor:
    """Per-sample conciseness penalty ``relu(E - ratio * L) / L`` ``[B]`` (differentiable w.r.t. ``hidden`` and
    ``weight``). ``hidden`` ``[N, H]`` the student's final hidden states at the prediction positions (samples
    one after another, ``counts[b]`` each), ``weight`` ``[V, H]`` its lm-head. Only samples with
    ``counts[b] > ratio * L_b`` can be penalised; only their rows are put through the lm-head."""
    bsz = counts.shape[0]
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32      # float32 at least
    out = hidden.new_zeros(bsz, dtype=dt)
    starts = torch.cumsum(counts, 0) - counts
    for b in range(bsz):
        n, ref = int(counts[b]), float(ref_len[b])
        if n == 0 or ref <= 0 or n <= ratio * ref:
            continue
        s = int(starts[b])
        parts = []
        for c in range(s, s + n, chunk_size):
            z = (hidden[c:min(c + chunk_size, s + n)] @ weight.T).to(dt)        # [c, V]
            parts.append(z[:, eot_id] - torch.logsumexp(z, dim=-1))
        e = expected_length(torch.cat(parts))
        out = out.index_put((torch.tensor([b], device=out.device),), (torch.relu(e - ratio * ref) / ref).reshape(1))
    return out
