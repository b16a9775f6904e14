"""Teacher targets (SPEC L1 *extract*, S2.1): the top-k cache and the online teacher.

Alignment (architecture.md): a token t with ``loss_mask[b, t] == 1`` is predicted from position t-1; the
prediction positions of a batch are the (b, t-1), flattened row-major; :func:`prediction_positions` is the
one implementation. Every ``[N, ...]`` tensor here is in that order.

On-disk format (``kind="teacher_targets"``, :data:`FORMAT_VERSION` = 2; format 1 is format 2 without tail
samples and is still read), one atomic folder::

    shard_00000.safetensors   "indices"  [n, k]  int16 (uint16 bit pattern, vocab <= 65536) or int32
                              "logprobs" [n, k]  float16 or float32, log-softmax at temperature 1, sorted
                                                 descending per row
                              "tail_indices"  [n, m]  (only when tail_samples m > 0) tokens drawn with
                                                 replacement from the teacher's distribution outside the top k
                              "tail_logprobs" [n, m]  their teacher log-probs (same dtypes as above)
                              "offsets"  [E+1]   int64, rows of the shard's e-th example: offsets[e]:offsets[e+1]
    index.json                {"shards": [[example ids of shard 0], [ids of shard 1], ...]}
    MANIFEST.json             sha256 of every file + meta {key, key_parts {teacher, tokenizer, data, k,
                              tail_samples, format_version}, vocab_size, index_dtype, logprob_dtype,
                              n_positions, bytes_per_position, ...}

An example's rows are its prediction positions in time order; examples never straddle shards. Indices
0..65535 are stored as int16 two's complement and restored exactly with ``& 0xFFFF``. The tail mass of row
n is ``1 - exp(logprobs[n]).sum()``.

Measured on SmolLM2-135M-Instruct answering 24 built-in prompts (1,327 answer tokens, k=256):
bytes per position = k * 4 with float16 (1,024 at k=256, 256 at k=64; float32: k * 6); float16 vs float32
log-probs: max |d logp| 7.8e-3 (relative <= 2^-11), max |d p| 1.7e-4, max |d top-64 mass| 4.0e-4.
Mean teacher mass captured by the top k: k=1 0.56, k=8 0.83, k=64 0.94, k=256 0.98 (float64 check of the
top-64 mass: |diff| <= 1.2e-5). On human text (wikitext2 valid, 1,020 positions) it is lower: 0.44, 0.73,
0.88, 0.94 (DESIGN: 0.47/0.76/0.90/0.96), so k=64 leaves ~6-12% of the mass to the tail term.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import CacheMismatchError, ConfigError, InputError
from .io import atomic_dir, distillgate_home, sha256_json, verify_manifest

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
"""Format 2 added the optional tail samples; format 1 caches (no tail samples) are still read."""
KIND = "teacher_targets"
_LP_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class TopKTargets:
    """Teacher top-k over N prediction positions: ``indices`` [N,k] long, ``logprobs`` [N,k] float32.

    Optional ``tail_indices`` [N,m] long / ``tail_logprobs`` [N,m] float32: m tokens drawn (with replacement)
    from the teacher's distribution *outside* the top k, with their log-probs. They make the forward-KL
    training loss an unbiased estimate of the dense one (see ``losses.fused``); None: the tail is one bucket.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_indices: torch.Tensor | None = None
    tail_logprobs: torch.Tensor | None = None
    log_tail: torch.Tensor | None = None
    """[N] exact log tail mass when known (else it is derived as log(1 - sum exp(logprobs)))."""

    def select(self, index) -> "TopKTargets":
        """The rows ``index`` (a slice or an index tensor) of every field that is present."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})

    @classmethod
    def cat(cls, parts: Sequence["TopKTargets"], k: int) -> "TopKTargets":
        """Rows of ``parts`` one after another (``[0, k]`` when there are none). An optional field is kept only
        when every part has it with the same width (e.g. tail samples: caches of one run agree; else the tail
        falls back to one bucket)."""
        if not parts:
            return cls(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
        out = {}
        for f in dataclasses.fields(cls):
            vals = [getattr(p, f.name) for p in parts]
            if all(v is not None for v in vals) and len({v.shape[1:] for v in vals}) == 1:
                out[f.name] = torch.cat(vals)
        return cls(**out)

    def tail_mass(self) -> torch.Tensor:
        """[N] probability mass outside the top k, clamped to >= 0."""
        return (1.0 - self.logprobs.exp().sum(-1)).clamp_min(0.0)


@dataclass
class TeacherHidden:
    """Online teacher: final (post-norm) hidden states ``hidden`` [N,H] and the lm-head ``weight`` [V,H];
    logits are ``hidden @ weight.T``, formed chunk by chunk inside the fused loss."""

    hidden: torch.Tensor
    weight: torch.Tensor


def prediction_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_idx [N], t_idx [N]) long: positions (b, t-1) with ``loss_mask[b, t] == 1``, row-major.

    ``batch["input_ids"][b_idx, t_idx + 1]`` are the target tokens; ``loss_mask[:, 0]`` is never a target
    (nothing predicts it).
    """
    lm = batch["loss_mask"]
    return (lm[:, 1:] != 0).nonzero(as_tuple=True)


def prediction_targets(batch: dict) -> torch.Tensor:
    """[N] long: the token predicted at each prediction position."""
    b, t = prediction_positions(batch)
    return batch["input_ids"][b, t + 1]


# ------------------------------------------------------------------------------------------- teacher math

def _unwrap(teacher):
    """(model, tokenizer or None, fingerprint) from a LoadedModel or a bare model."""
    if hasattr(teacher, "model") and hasattr(teacher, "fingerprint"):
        return teacher.model, teacher.tokenizer, teacher.fingerprint
    from .models import fingerprint_model

    return teacher, None, fingerprint_model(teacher)


def _check_plain_head(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise InputError(f"{type(model).__name__}: teacher targets need a bias-free linear lm head")
    if getattr(model.config, "final_logit_softcapping", None):
        raise InputError(f"{type(model).__name__}: logit soft-capping is not supported for teacher targets")
    return head.weight


@torch.no_grad()
def teacher_hidden(model, batch: dict) -> torch.Tensor:
    """[N, H] final hidden states (what the lm head reads) at the batch's prediction positions."""
    b, t = prediction_positions(batch)
    dev = model.get_output_embeddings().weight.device  # an offloaded teacher (W3) runs where its weights are
    out = model.base_model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                           use_cache=False)
    return out.last_hidden_state[b.to(dev), t.to(dev)]


@torch.no_grad()
def topk_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk: int = 256, tail_samples: int = 0,
                     generator: torch.Generator | None = None) -> TopKTargets:
    """Top-k of ``log_softmax(hidden @ weight.T)`` in float32, ``chunk`` positions at a time so the
    [N, V] logits never exist (chunk 256 x V 49,152 x 4 B = 50 MB). hidden [N,H], weight [V,H].

    ``tail_samples`` m > 0 (and k < V): also draw m tokens per position from the teacher's distribution
    restricted to the other V - k tokens (with replacement, ``generator``), returned with their log-probs.
    """
    v_size = weight.shape[0]
    if not 1 <= k <= v_size:
        raise ConfigError("targets.top_k", k, f"an integer in [1, vocab size {v_size}]")
    m = tail_samples if k < v_size else 0
    w = weight.float()
    idx, lps, t_idx, t_lps = [], [], [], []
    for s in range(0, hidden.shape[0], chunk):
        lp = torch.log_softmax(hidden[s:s + chunk].float() @ w.T, dim=-1)
        v, i = lp.topk(k, dim=-1)
        idx.append(i)
        lps.append(v)
        if m:
            p = lp.exp().scatter_(1, i, 0.0)
            empty = p.sum(1) <= 0                           # all mass in the top k: draw anything (weight 0)
            p[empty] = 1.0
            p[empty.nonzero().squeeze(1)[:, None], i[empty]] = 0.0
            j = torch.multinomial(p, m, replacement=True, generator=generator)
            t_idx.append(j)
            t_lps.append(lp.gather(1, j))
    if not idx:
        z = torch.zeros(0, m, dtype=torch.long) if m else None
        return TopKTargets(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), z,
                           torch.zeros(0, m) if m else None)
    return TopKTargets(torch.cat(idx), torch.cat(lps), torch.cat(t_idx) if m else None,
                       torch.cat(t_lps) if m else None)


class OnlineTeacher:
    """TeacherProvider for online mode: ``provider(batch) -> TeacherHidden`` (teacher forward, no grad)."""

    def __init__(self, teacher):
        self.model = teacher.model if hasattr(teacher, "fingerprint") else teacher  # LoadedModel or module
        self.weight = _check_plain_head(self.model).detach()
        self.model.eval()

    def __call__(self, batch: dict) -> TeacherHidden:
        dev = batch["input_ids"].device  # the student's: an offloaded teacher's output moves there
        return TeacherHidden(hidden=teacher_hidden(self.model, batch).to(dev), weight=self.weight.to(dev))


# ------------------------------------------------------------------------------------------------- cache

@dataclass(frozen=True)
class TargetKey:
    """What a cache was computed from; ``digest`` is the sha256 cache key."""

    teacher: str
    tokenizer: str
    data: str
    k: int
    tail_samples: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def digest(self) -> str:
        return sha256_json(asdict(self))


def targets_key(teacher, examples: Sequence, k: int, tail_samples: int = 0) -> TargetKey:
    """The cache key; ``tail_samples`` counts as 0 when k covers the whole vocabulary (there is no tail)."""
    from .data.dataset import examples_hash
    from .models import fingerprint_tokenizer

    model, tok, fp = _unwrap(teacher)
    if k >= _check_plain_head(model).shape[0]:
        tail_samples = 0
    return TargetKey(teacher=fp, tokenizer=fingerprint_tokenizer(tok) if tok is not None else "",
                     data=examples_hash(examples), k=k, tail_samples=tail_samples)


def _encode_indices(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    if vocab <= 65536:
        return torch.where(idx >= 32768, idx - 65536, idx).to(torch.int16)
    return idx.to(torch.int32)


def _decode_indices(idx: torch.Tensor) -> torch.Tensor:
    return (idx.to(torch.int32) & 0xFFFF).long() if idx.dtype == torch.int16 else idx.long()


def compute_targets(teacher, examples: Sequence, *, k: int, batch_size: int, out_dir: str | os.PathLike,
                    pad_id: int, logprob_dtype: str = "float16", shard_rows: int = 1 << 16,
                    progress: bool = False, overwrite: bool = False, tail_samples: int = 0) -> "TargetCache":
    """Run the teacher over ``examples`` (data.generate.Example) and write their top-k cache to ``out_dir``.

    Batches are length-sorted (less padding); rows are stored per example in the given order. Tail samples
    are drawn from one generator seeded with the cache key, so the same inputs give the same cache.
    """
    import time

    from .data.dataset import collate
    from .data.generate import progress_bar

    if logprob_dtype not in _LP_DTYPES:
        raise ConfigError("logprob_dtype", logprob_dtype, f"one of {list(_LP_DTYPES)}")
    if batch_size < 1:
        raise ConfigError("targets.batch_size", batch_size, "an integer >= 1")
    if not examples:
        raise InputError("no examples to compute teacher targets for")
    model, _, _ = _unwrap(teacher)
    weight = _check_plain_head(model)
    vocab = weight.shape[0]
    if tail_samples < 0:
        raise ConfigError("targets.tail_samples", tail_samples, "an integer >= 0")
    if not 1 <= k <= vocab:
        raise ConfigError("targets.top_k", k, f"an integer in [1, vocab size {vocab}]")
    from .train import distributed as dist

    key = targets_key(teacher, examples, k, tail_samples)
    tail_samples = key.tail_samples
    seed = int(key.digest[:15], 16)
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bar, task = progress_bar(progress and dist.is_main(), len(examples), "teacher targets")
    t0, n_tok = time.perf_counter(), 0
    try:
        # Under torchrun each rank takes every world-th batch; batches and their tail-sample generators (seeded
        # from the key and the batch index) do not depend on the world size, so the merged cache is
        # byte-identical to a single process's (tested).
        for b in dist.mine(len(batches)):
            idx = batches[b]
            batch = collate([examples[i] for i in idx], pad_id)
            tk = topk_from_hidden(teacher_hidden(model, batch), weight, k, tail_samples=tail_samples,
                                  generator=torch.Generator(weight.device).manual_seed(seed + b))
            if weight.device.type != "cpu":  # the cache is written from host memory
                tk = dataclasses.replace(tk, **{f.name: getattr(tk, f.name).cpu() for f in dataclasses.fields(tk)
                                                if getattr(tk, f.name) is not None})
            counts = (batch["loss_mask"][:, 1:] != 0).sum(1).tolist()
            start = 0
            lp_min, lp_dtype = torch.finfo(_LP_DTYPES[logprob_dtype]).min, _LP_DTYPES[logprob_dtype]
            for i, c in zip(idx, counts):
                sl = slice(start, start + c)
                rows[i] = (_encode_indices(tk.indices[sl], vocab), tk.logprobs[sl].clamp_min(lp_min).to(lp_dtype))
                if tail_samples:
                    rows[i] += (_encode_indices(tk.tail_indices[sl], vocab),
                                tk.tail_logprobs[sl].clamp_min(lp_min).to(lp_dtype))
                start += c
            n_tok += int(batch["attention_mask"].sum())
            if bar is not None:
                bar.update(task, advance=len(idx) * dist.world_size(),
                           tps=f"{n_tok / (time.perf_counter() - t0):,.0f} tok/s"
                           + (" on rank 0" if dist.world_size() > 1 else ""))
    finally:
        if bar is not None:
            bar.stop()
    rows = dist.merge_shards(rows)
    cache = _write_cache(out_dir, examples, rows, key, vocab, logprob_dtype, shard_rows, overwrite) \
        if dist.is_main() else None
    dist.barrier()  # the other ranks read only what rank 0 committed
    dist.committed_by_rank0(out_dir)
    return cache if cache is not None else TargetCache.open(out_dir, key)


def _write_cache(out_dir, examples, rows, key: TargetKey, vocab, logprob_dtype, shard_rows, overwrite):
    from safetensors.torch import save_file

    shards: list[list[int]] = [[]]
    n_rows = 0
    for i in range(len(examples)):
        c = rows[i][0].shape[0]
        if shards[-1] and n_rows + c > shard_rows:
            shards.append([])
            n_rows = 0
        shards[-1].append(i)
        n_rows += c
    n_pos = sum(r[0].shape[0] for r in rows.values())
    per_entry = (2 if vocab <= 65536 else 4) + (2 if logprob_dtype == "float16" else 4)
    meta = {"key": key.digest, "key_parts": asdict(key), "vocab_size": vocab, "k": key.k,
            "tail_samples": key.tail_samples,
            "index_dtype": "uint16-as-int16" if vocab <= 65536 else "int32", "logprob_dtype": logprob_dtype,
            "n_positions": n_pos, "n_examples": len(examples),
            "bytes_per_position": (key.k + key.tail_samples) * per_entry}
    # exist_ok: a concurrent run that committed this key first wins (same inputs); ours is dropped
    with atomic_dir(out_dir, kind=KIND, format_version=FORMAT_VERSION, meta=meta, overwrite=overwrite,
                    exist_ok=True) as tmp:
        for s, members in enumerate(shards):
            counts = torch.tensor([0] + [rows[i][0].shape[0] for i in members], dtype=torch.int64)
            tensors = {"indices": torch.cat([rows[i][0] for i in members]).contiguous(),
                       "logprobs": torch.cat([rows[i][1] for i in members]).contiguous(),
                       "offsets": counts.cumsum(0)}
            if key.tail_samples:
                tensors["tail_indices"] = torch.cat([rows[i][2] for i in members]).contiguous()
                tensors["tail_logprobs"] = torch.cat([rows[i][3] for i in members]).contiguous()
            save_file(tensors, str(tmp / f"shard_{s:05d}.safetensors"))
        (tmp / "index.json").write_text(json.dumps({"shards": [[examples[i].id for i in m] for m in shards]}))
    return TargetCache.open(out_dir, key)


def gather_topk(rows, batch: dict, k: int, where: str = "targets") -> TopKTargets:
    """Concatenate per-example targets ``rows(example_id) -> TopKTargets [n_e, k]`` in the batch's
    :func:`prediction_positions` order, checking each example's target count against the batch."""
    counts = (batch["loss_mask"][:, 1:] != 0).sum(1).tolist()
    parts = []
    for ex_id, c in zip(batch["example_ids"], counts):
        r = rows(ex_id)
        if r.indices.shape[0] != c:
            raise CacheMismatchError(f"{where}: example {ex_id!r} has {c} target tokens in the batch but "
                                     f"{r.indices.shape[0]} cached (different data or seq_len)")
        parts.append(r)
    return TopKTargets.cat(parts, k)


class TargetCache:
    """A committed top-k cache; ``cache(batch)`` / ``cache.topk_for(batch)`` -> :class:`TopKTargets`."""

    def __init__(self, path: Path, meta: dict, shards: list[dict[str, torch.Tensor]], where: dict[str, tuple]):
        self.path, self.meta, self._shards, self._where = path, meta, shards, where
        self.k: int = meta["k"]

    @classmethod
    def open(cls, path: str | os.PathLike, expected_key: TargetKey | None = None) -> "TargetCache":
        """Open and verify a cache; with ``expected_key``, raise CacheMismatchError naming which input
        (teacher / tokenizer / data / k / format_version) differs."""
        from safetensors.torch import load_file

        path = Path(path)
        m = verify_manifest(path, kind=KIND)
        meta = m["meta"]
        stored = meta.get("key_parts", {})
        if m.get("format_version") not in READABLE_FORMATS:
            raise CacheMismatchError(f"{path}: targets format_version {m.get('format_version')}, "
                                     f"this distillgate reads {list(READABLE_FORMATS)}; recompute the targets")
        if expected_key is not None and meta.get("key") != expected_key.digest:
            want = asdict(expected_key)
            diff = [f for f in ("teacher", "tokenizer", "data", "k", "tail_samples", "format_version")
                    if stored.get(f, 0 if f == "tail_samples" else None) != want[f]]
            detail = "; ".join(f"{f}: cached {str(stored.get(f))[:12]} vs expected {str(want[f])[:12]}" for f in diff)
            raise CacheMismatchError(f"{path}: teacher targets were computed for a different "
                                     f"{' and '.join(diff) or 'key'} ({detail}); recompute them")
        index = json.loads((path / "index.json").read_text())
        shards, where = [], {}
        for s, ids in enumerate(index["shards"]):
            t = load_file(str(path / f"shard_{s:05d}.safetensors"))
            off = t["offsets"].tolist()
            for e, ex_id in enumerate(ids):
                where[ex_id] = (s, off[e], off[e + 1] - off[e])
            shards.append(t)
        return cls(path, meta, shards, where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._where

    @property
    def bytes_per_position(self) -> int:
        return self.meta["bytes_per_position"]

    def rows(self, example_id: str) -> TopKTargets:
        """[n_e, k] targets of one example, in time order."""
        if example_id not in self._where:
            raise CacheMismatchError(f"{self.path}: no targets for example {example_id!r} (data differs)")
        s, a, n = self._where[example_id]
        sh = self._shards[s]
        tails = "tail_indices" in sh
        return TopKTargets(_decode_indices(sh["indices"][a:a + n]), sh["logprobs"][a:a + n].float(),
                           _decode_indices(sh["tail_indices"][a:a + n]) if tails else None,
                           sh["tail_logprobs"][a:a + n].float() if tails else None)

    def topk_for(self, batch: dict) -> TopKTargets:
        """[N, k] targets of ``batch`` in :func:`prediction_positions` order."""
        return gather_topk(self.rows, batch, self.k, where=str(self.path))

    __call__ = topk_for


def get_or_compute_targets(teacher, examples: Sequence, *, k: int, batch_size: int, pad_id: int,
                           root: str | os.PathLike | None = None, logprob_dtype: str = "float16",
                           progress: bool = True, tail_samples: int = 0) -> TargetCache:
    """The cache for (teacher, tokenizer, examples, k) under ``<root or $DISTILLGATE_HOME/targets>/<key[:16]>``,
    computed on first use and reused while none of them changes."""
    from .train import distributed as dist

    key = targets_key(teacher, examples, k, tail_samples)
    folder = (Path(root) if root else distillgate_home() / "targets") / key.digest[:16]
    found = None
    if folder.exists() and dist.is_main():  # under torchrun rank 0 decides, so every rank computes or none
        try:
            found = TargetCache.open(folder, key)
        except CacheMismatchError:
            raise
        except Exception as e:  # uncommitted or corrupted: recompute
            log.warning("%s: unusable targets cache (%s); recomputing", folder, e)
    if dist.broadcast_object(found is not None):
        dist.committed_by_rank0(folder)
        return found if found is not None else TargetCache.open(folder, key)
    return compute_targets(teacher, examples, k=k, batch_size=batch_size, out_dir=folder, pad_id=pad_id,
                           logprob_dtype=logprob_dtype, progress=progress, overwrite=False,
                           tail_samples=tail_samples)
