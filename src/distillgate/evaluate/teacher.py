"""Student vs teacher on held-out tokens: forward/reverse KL, top-1 agreement and both models' NLL, teacher
side cached. This is the ONE held-out teacher comparison: the loop's validate phase, ``distillgate distill`` and
the eval suite's ``teacher_kl`` task all call :func:`compare_to_teacher`.

Positions are the architecture's *prediction positions* (``distillgate.targets.prediction_positions``):
``(b, t-1)`` wherever ``loss_mask[b, t] == 1``, row-major. Plain token sequences get
``loss_mask = [0, 1, 1, ...]`` (every next token is a target).

Teacher cache: the teacher's top-k log-probs (``k=256`` by default) over all positions are stored under
``distillgate_home()/eval_cache/teacher-<key>`` as one safetensors file in an atomic, checksummed
folder, keyed by sha256(teacher fingerprint, data hash, k). A second student evaluated on the same data
does no teacher forward.

Approximation (documented, conservative): with top-k the vocabulary is coarse-grained into the teacher's k
tokens plus one *tail bucket* holding the remaining mass of each distribution, with exactly the bucket math the
training losses use (:func:`distillgate.losses.divergence.topk_teacher_buckets` /
:func:`~distillgate.losses.divergence.topk_student_buckets`: the student's tail is the exact logsumexp of its
other logits). KL on these k+1 buckets is a lower bound on the exact KL (data-processing inequality) and equals
it when the tail is empty; on SmolLM2 real text k=256 covers ~96% of the teacher's mass. ``top_k=None`` computes
the exact KL from full teacher distributions; its teacher side can be kept in memory between calls
(``teacher_cache``, a dict the caller owns, bounded by ``teacher_cache_bytes``), so a fixed held-out set costs one
teacher forward per run. Top-1 agreement is exact either way (the teacher's argmax is its first top-k index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CacheMismatchError, InputError
from ..io import atomic_dir, distillgate_home, sha256_json, verify_manifest
from ..targets import prediction_positions
from .scoring import in_eval_mode

CACHE_KIND, CACHE_VERSION = "eval_teacher_topk", 1
_EPS = 1e-12


def normalize_examples(examples) -> list[tuple[str, list[int], list[int]]]:
    """Accepts Batch dicts (``input_ids``/``attention_mask``/``loss_mask`` [B,T], ``example_ids``), rows
    ``{"input_ids", "loss_mask"?, "example_id"?}`` or plain token lists; returns ``(id, ids, loss_mask)``."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict) and torch.is_tensor(ex.get("input_ids")) and ex["input_ids"].dim() == 2:
            ids, lm = ex["input_ids"], ex["loss_mask"]
            att = ex.get("attention_mask", torch.ones_like(ids))
            names = ex.get("example_ids") or [f"{i}.{b}" for b in range(ids.shape[0])]
            for b in range(ids.shape[0]):
                n = int(att[b].sum())
                out.append((str(names[b]), ids[b, :n].tolist(), lm[b, :n].tolist()))
        elif hasattr(ex, "input_ids") and hasattr(ex, "loss_mask"):  # a data.dataset.Example
            out.append((str(ex.id), list(ex.input_ids), list(ex.loss_mask)))
        elif isinstance(ex, dict):
            ids = list(map(int, ex["input_ids"]))
            lm = list(map(int, ex.get("loss_mask") or [0] + [1] * (len(ids) - 1)))
            out.append((str(ex.get("example_id", i)), ids, lm))
        else:
            ids = list(map(int, ex))
            out.append((str(i), ids, [0] + [1] * (len(ids) - 1)))
        if len(out[-1][1]) != len(out[-1][2]):
            raise InputError(f"example {out[-1][0]}: input_ids and loss_mask lengths differ")
    if not out:
        raise InputError("compare_to_teacher: no examples")
    return out


def text_examples(tokenizer, text: str, seq_len: int = 256, max_tokens: int | None = 4096) -> list[list[int]]:
    """Cut a held-out text into consecutive token sequences of ``seq_len`` for :func:`compare_to_teacher`."""
    from .lm import tokenize_text

    ids, _ = tokenize_text(tokenizer, text, max_tokens)
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]


def _batches(exs, batch_size: int, pad_id: int):
    """Yield (example indices, batch dict) with right padding, in input order (cache order = input order)."""
    for s in range(0, len(exs), batch_size):
        chunk = exs[s:s + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att, lm = torch.zeros_like(ids), torch.zeros_like(ids)
        for r, (_, x, m) in enumerate(chunk):
            ids[r, :len(x)], att[r, :len(x)], lm[r, :len(x)] = torch.tensor(x), 1, torch.tensor(m)
        yield list(range(s, s + len(chunk))), {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


def _logprobs_at_positions(model, batch, *, full_logits: bool = False) -> torch.Tensor:
    """[N, V] float32 log-probs at the prediction positions (row-major). ``full_logits``: run the lm-head on
    every position and index afterwards (bit-identical to a plain forward; the exact path uses it), else only
    on the kept positions (``logits_to_keep``: less memory)."""
    device = next(model.parameters()).device
    b, t = prediction_positions(batch)
    if full_logits:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return torch.log_softmax(out.logits[b.to(device), t.to(device)].float(), dim=-1)
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    keep[b, t] = True
    logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=keep.to(device)).logits
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)


def _cache_key(teacher, exs, top_k: int) -> str:
    from ..models import fingerprint_model

    h = sha256_json([[e[0] for e in exs], [np.asarray(e[1], np.int64).tobytes().hex() for e in exs],
                     [np.asarray(e[2], np.int8).tobytes().hex() for e in exs]])
    return sha256_json({"teacher": fingerprint_model(teacher), "data": h, "k": top_k, "v": CACHE_VERSION})


@torch.no_grad()
def teacher_topk(teacher, exs, *, top_k: int, batch_size: int, pad_id: int, cache: bool = True,
                 cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k ``(indices [N,k] long, logprobs [N,k] float32)`` over all examples' prediction
    positions, read from the on-disk cache when present."""
    key = _cache_key(teacher, exs, top_k)
    folder = Path(cache_dir or distillgate_home() / "eval_cache") / f"teacher-{key[:24]}"
    if cache and folder.exists():
        from safetensors.torch import load_file

        m = verify_manifest(folder, kind=CACHE_KIND, format_version=CACHE_VERSION)
        if m["meta"].get("key") != key:
            raise CacheMismatchError(f"{folder}: cache key {m['meta'].get('key')} != expected {key}")
        t = load_file(str(folder / "topk.safetensors"))
        return t["indices"].long(), t["logprobs"]
    idx, lps = [], []
    for _, batch in _batches(exs, batch_size, pad_id):
        lp = _logprobs_at_positions(teacher, batch)
        v, i = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        idx.append(i)
        lps.append(v)
    indices, logprobs = torch.cat(idx), torch.cat(lps)
    if cache:
        from safetensors.torch import save_file

        with atomic_dir(folder, kind=CACHE_KIND, format_version=CACHE_VERSION, overwrite=True,
                        meta={"key": key, "k": top_k, "n_positions": len(indices)}) as tmp:
            save_file({"indices": indices.to(torch.int32).contiguous(), "logprobs": logprobs.contiguous()},
                      str(tmp / "topk.safetensors"))
    return indices, logprobs


def bucket_kl(t_idx: torch.Tensor, t_lp: torch.Tensor, s_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL(T||S) and reverse KL(S||T) per position [N] on the teacher's top-k + one tail bucket, with the
    training losses' bucket math (see the module docstring).

    t_idx, t_lp: [N, k] teacher top-k log-probs at T = 1; s_lp: [N, V] student log-probs (or logits: the buckets
    are shift-invariant). Exact when k == V.
    """
    from ..losses.divergence import kl_logprobs, topk_student_buckets, topk_teacher_buckets

    p = topk_teacher_buckets(t_lp, s_lp.shape[-1])
    q = topk_student_buckets(s_lp, t_idx.long())
    return kl_logprobs(p, q).clamp_min(0), kl_logprobs(q, p).clamp_min(0)


def _teacher_exact(teacher, batch, teacher_cache, budget: int) -> torch.Tensor:
    """The teacher's [n, V] log-probs of one batch (exact path), from/into ``teacher_cache``."""
    if teacher_cache is None:
        return _logprobs_at_positions(teacher, batch, full_logits=True)
    key = sha256_json([batch["input_ids"].tolist(), batch["loss_mask"].tolist()])
    hit = teacher_cache.get(key)
    if hit is not None:
        return hit
    t_lp = _logprobs_at_positions(teacher, batch, full_logits=True)
    used = teacher_cache.get("__bytes__", 0)
    if used + t_lp.numel() * t_lp.element_size() <= budget:
        teacher_cache[key] = t_lp
        teacher_cache["__bytes__"] = used + t_lp.numel() * t_lp.element_size()
    return t_lp


@in_eval_mode
@torch.no_grad()
def compare_to_teacher(student, teacher, examples, *, batch_size: int = 8, top_k: int | None = 256,
                       pad_id: int = 0, cache: bool = True, cache_dir: str | Path | None = None,
                       teacher_cache: dict | None = None, teacher_cache_bytes: int = 1 << 30,
                       per_position: bool = False) -> dict:
    """Forward/reverse KL and top-1 agreement of ``student`` against ``teacher`` (same vocabulary); on the exact
    path (``top_k=None``) also both models' NLL of the data's tokens.

    Returns ``{kl_forward_mean, kl_reverse_mean, top1_agreement, n_tokens, per_example, exact, top_k}`` and, when
    exact, ``{student_nll_mean, teacher_nll_mean}``; means are over prediction positions;
    ``per_example[i] = {example_id, kl_forward, kl_reverse, top1, n_tokens}`` (+ ``kl_by_position`` with
    ``per_position``).
    """
    exs = normalize_examples(examples)
    exact = top_k is None
    if not exact:
        t_idx_all, t_lp_all = teacher_topk(teacher, exs, top_k=top_k, batch_size=batch_size, pad_id=pad_id,
                                           cache=cache, cache_dir=cache_dir)
    from ..train import distributed as dist

    split = exact and dist.world_size() > 1  # under torchrun: rank r compares batches r, r+N, ... (exact path)
    per_example, fwd_all, rev_all, top1_all, nll_s_all, nll_t_all = [], [], [], [], [], []
    parts: dict[int, tuple] = {}
    offset = 0
    for bi, (rows, batch) in enumerate(_batches(exs, batch_size, pad_id)):
        if split and bi % dist.world_size() != dist.rank():
            continue
        first = len(per_example)
        s_lp = _logprobs_at_positions(student, batch, full_logits=exact)        # [n, V]
        n = s_lp.shape[0]
        b, t = prediction_positions(batch)
        if exact:
            t_lp = _teacher_exact(teacher, batch, teacher_cache, teacher_cache_bytes).to(s_lp.device)
            if t_lp.shape[-1] != s_lp.shape[-1]:
                raise InputError(f"teacher vocab {t_lp.shape[-1]} != student vocab {s_lp.shape[-1]}")
            p, q = t_lp.exp(), s_lp.exp()
            fwd, rev = (p * (t_lp - s_lp)).sum(-1).clamp_min(0), (q * (s_lp - t_lp)).sum(-1).clamp_min(0)
            t_top1 = t_lp.argmax(-1)
            tgt = batch["input_ids"][b, t + 1].to(s_lp.device)[:, None]
            nll_s_all.append(-s_lp.gather(1, tgt).squeeze(1).double())
            nll_t_all.append(-t_lp.gather(1, tgt).squeeze(1).double())
        else:
            t_idx, t_lp = t_idx_all[offset:offset + n].to(s_lp.device), t_lp_all[offset:offset + n].to(s_lp.device)
            if t_idx.numel() and int(t_idx.max()) >= s_lp.shape[-1]:
                raise InputError(f"teacher token ids reach {int(t_idx.max())}, student vocab is {s_lp.shape[-1]}")
            fwd, rev = bucket_kl(t_idx, t_lp, s_lp)
            t_top1 = t_idx[:, 0]
        top1 = (s_lp.argmax(-1) == t_top1).float()
        offset += n
        for r, i in enumerate(rows):
            sel = b == r
            k = int(sel.sum())
            row = {"example_id": exs[i][0], "n_tokens": k,
                   "kl_forward": float(fwd[sel].double().mean()) if k else float("nan"),
                   "kl_reverse": float(rev[sel].double().mean()) if k else float("nan"),
                   "top1": float(top1[sel].double().mean()) if k else float("nan")}
            if per_position:
                row["kl_by_position"] = fwd[sel].tolist()
            per_example.append(row)
        fwd_all.append(fwd.double())
        rev_all.append(rev.double())
        top1_all.append(top1.double())
        if split:
            parts[bi] = (per_example[first:], fwd_all[-1], rev_all[-1], top1_all[-1], nll_s_all[-1], nll_t_all[-1])
    if split:  # every rank gets every batch's results, in batch order: the same means as one process
        merged = [v for _, v in sorted(dist.merge_shards(parts, everywhere=True).items())]
        per_example = [row for m in merged for row in m[0]]
        fwd_all, rev_all, top1_all, nll_s_all, nll_t_all = ([m[j] for m in merged] for j in range(1, 6))
    if not exact and offset != len(t_idx_all):
        raise CacheMismatchError(f"teacher cache holds {len(t_idx_all)} positions, data has {offset}")
    fwd, rev, top1 = torch.cat(fwd_all), torch.cat(rev_all), torch.cat(top1_all)
    if len(fwd) == 0:
        raise InputError("compare_to_teacher: no prediction positions (every loss_mask is 0)")
    out = {"kl_forward_mean": float(fwd.mean()), "kl_reverse_mean": float(rev.mean()),
           "top1_agreement": float(top1.mean()), "n_tokens": len(fwd), "per_example": per_example,
           "exact": exact, "top_k": top_k}
    if exact:
        out["student_nll_mean"] = float(torch.cat(nll_s_all).mean())
        out["teacher_nll_mean"] = float(torch.cat(nll_t_all).mean())
    return out
