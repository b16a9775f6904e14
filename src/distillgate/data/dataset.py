"""Tokenised distillation datasets: split by prompt, length-bucketed batches, cached by content hash.

On disk (``kind="dataset"``, :data:`DATASET_FORMAT_VERSION`), one atomic folder per generation key::

    <DISTILLGATE_HOME>/datasets/<key[:16]>/
        prompts.jsonl    one PromptRecord per line
        examples.jsonl   one Example per line (full length: seq_len and the split are applied on load)
        MANIFEST.json    sha256 of both + meta {key, key_parts, pad_id, tokenizer, counts}

The key hashes (teacher fingerprint, tokenizer fingerprint, prompts, generation settings), so a second run
with the same inputs reuses the answers, and any change regenerates them. ``seq_len``, ``heldout_fraction``
and the split seed are not in the key: they are applied when the dataset is opened.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Sequence

from ..errors import ArtifactError, ConfigError, InputError
from ..io import atomic_dir, distillgate_home, sha256_bytes, sha256_json, verify_manifest
from .generate import Example, generate_responses
from .prompts import PromptRecord

log = logging.getLogger(__name__)

DATASET_FORMAT_VERSION = 1
SPLITS = ("train", "heldout", "all")


def split_prompts(prompt_ids: Sequence[str], heldout_fraction: float, seed: int) -> set[str]:
    """The held-out prompt ids: ``round(fraction * n)`` prompts (at least 1 when fraction > 0 and n >= 2,
    at most n - 1), chosen by a seeded hash of each id, so a prompt's side does not depend on list order."""
    ids = sorted(set(prompt_ids), key=lambda p: sha256_bytes(f"{seed}:{p}".encode()))
    n_held = round(heldout_fraction * len(ids))
    if heldout_fraction > 0 and len(ids) >= 2:
        n_held = min(max(n_held, 1), len(ids) - 1)
    return set(ids[:n_held])


def truncate(ex: Example, seq_len: int) -> Example | None:
    """The first ``seq_len`` tokens of ``ex`` (None when no target token survives)."""
    if len(ex.input_ids) <= seq_len:
        return ex
    mask = ex.loss_mask[:seq_len]
    if not any(mask):
        return None
    return Example(**{**ex.to_json(), "input_ids": ex.input_ids[:seq_len], "loss_mask": mask, "finished": False})


def collate(examples: Sequence[Example], pad_id: int, hard_weights: dict[str, float] | None = None) -> dict:
    """Right-padded Batch dict (architecture.md): input_ids/attention_mask/loss_mask [B,T] long,
    example_ids/domains list[str], complexity [B] float32, sample_weight [B] float32."""
    import torch

    B, T = len(examples), max(len(e.input_ids) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    lm = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        att[b, :n] = 1
        lm[b, :n] = torch.tensor(e.loss_mask)
    hw = hard_weights or {}
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm,
            "example_ids": [e.id for e in examples], "domains": [e.domain for e in examples],
            "complexity": torch.tensor([e.complexity for e in examples], dtype=torch.float32),
            "sample_weight": torch.tensor([float(hw.get(e.id, 1.0)) for e in examples], dtype=torch.float32)}


def examples_hash(examples: Sequence[Example]) -> str:
    """sha256 of what a teacher sees: ids, tokens and masks (the data part of a targets key)."""
    return sha256_json([[e.id, e.input_ids, e.loss_mask] for e in examples])


class DistillDataset:
    """Teacher-answered examples with a by-prompt train/held-out split (all samples of a prompt on one side)."""

    def __init__(self, examples: Sequence[Example], *, pad_id: int, seq_len: int, heldout_fraction: float = 0.125,
                 seed: int = 0, tokenizer_fingerprint: str = "", prompts: Sequence[PromptRecord] = (),
                 path: Path | None = None, key: str = ""):
        if seq_len < 2:
            raise ConfigError("data.seq_len", seq_len, "an integer >= 2")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ConfigError("data.heldout_fraction", heldout_fraction, "a number in [0, 1)")
        kept = [t for t in (truncate(e, seq_len) for e in examples) if t is not None]
        self.dropped = len(examples) - len(kept)
        if self.dropped:
            log.warning("%d example(s) have no answer token within seq_len=%d and were dropped", self.dropped, seq_len)
        if not kept:
            raise InputError(f"no example keeps an answer token within seq_len={seq_len}; raise data.seq_len")
        self.pad_id, self.seq_len, self.seed, self.heldout_fraction = pad_id, seq_len, seed, heldout_fraction
        self.tokenizer_fingerprint, self.prompts, self.path, self.key = tokenizer_fingerprint, list(prompts), path, key
        held = split_prompts([e.prompt_id for e in kept], heldout_fraction, seed)
        self._split = {"train": [e for e in kept if e.prompt_id not in held],
                       "heldout": [e for e in kept if e.prompt_id in held], "all": kept}

    def examples(self, split: str = "train") -> list[Example]:
        if split not in SPLITS:
            raise ConfigError("split", split, f"one of {list(SPLITS)}")
        return list(self._split[split])

    def data_hash(self, split: str = "all") -> str:
        return examples_hash(self._split[split])

    def counts(self) -> dict:
        """Per split: examples, prompts, tokens, target tokens, and examples per domain."""
        out = {}
        for s in ("train", "heldout"):
            ex = self._split[s]
            domains: dict[str, int] = {}
            for e in ex:
                domains[e.domain] = domains.get(e.domain, 0) + 1
            out[s] = {"examples": len(ex), "prompts": len({e.prompt_id for e in ex}),
                      "tokens": sum(len(e.input_ids) for e in ex), "target_tokens": sum(e.n_targets for e in ex),
                      "domains": dict(sorted(domains.items()))}
        return out

    def batches(self, split: str = "train", batch_size: int = 4, epoch: int = 0, seed: int = 0,
                shuffle: bool = True, hard_weights: dict[str, float] | None = None) -> list[dict]:
        """All batches of one epoch, deterministic in (split, batch_size, epoch, seed).

        Examples are sorted by length (ties broken by a (seed, epoch) random key when shuffling, by id
        otherwise) and cut into batches of similar length, which keeps padding low; with ``shuffle`` the
        batch order is then permuted by (seed, epoch). A trainer resumes at (epoch, index) by recomputing
        the list and skipping ``index`` batches.
        """
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "an integer >= 1")
        ex = self.examples(split)
        if not ex:
            return []
        rng = random.Random(f"{seed}:{epoch}")
        tie = {e.id: rng.random() for e in ex} if shuffle else {e.id: 0.0 for e in ex}
        ex.sort(key=lambda e: (-len(e.input_ids), tie[e.id], e.id))
        groups = [ex[i:i + batch_size] for i in range(0, len(ex), batch_size)]
        if shuffle:
            rng.shuffle(groups)
        return [collate(g, self.pad_id, hard_weights) for g in groups]

    # --------------------------------------------------------------------------------------- persistence

    def save(self, out: str | os.PathLike, meta: dict | None = None, overwrite: bool = False,
             exist_ok: bool = False) -> Path:
        """Write prompts + (truncated) examples as a committed artifact (``exist_ok``: see ``io.atomic_dir``)."""
        meta = {"key": self.key, "pad_id": self.pad_id, "tokenizer": self.tokenizer_fingerprint,
                "counts": self.counts(), **(meta or {})}
        with atomic_dir(out, kind="dataset", format_version=DATASET_FORMAT_VERSION, meta=meta,
                        overwrite=overwrite, exist_ok=exist_ok) as tmp:
            _write_jsonl(tmp / "prompts.jsonl", [p.to_json() for p in self.prompts])
            _write_jsonl(tmp / "examples.jsonl", [e.to_json() for e in self._split["all"]])
        return Path(out)

    @classmethod
    def load(cls, path: str | os.PathLike, *, seq_len: int, heldout_fraction: float = 0.125,
             seed: int = 0) -> "DistillDataset":
        path = Path(path)
        m = verify_manifest(path, kind="dataset", format_version=DATASET_FORMAT_VERSION)
        prompts = [PromptRecord(**r) for r in _read_jsonl(path / "prompts.jsonl")]
        examples = [Example(**r) for r in _read_jsonl(path / "examples.jsonl")]
        meta = m["meta"]
        return cls(examples, pad_id=meta["pad_id"], seq_len=seq_len, heldout_fraction=heldout_fraction, seed=seed,
                   tokenizer_fingerprint=meta.get("tokenizer", ""), prompts=prompts, path=path,
                   key=meta.get("key", ""))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    from ..io import iter_utf8_lines

    return [json.loads(line) for _, line in iter_utf8_lines(path) if line.strip()]


def dataset_key(teacher_fp: str, tokenizer_fp: str, prompts: Sequence[PromptRecord], gen: dict) -> tuple[str, dict]:
    """(sha256 key, its parts) identifying a generated dataset."""
    parts = {"teacher": teacher_fp, "tokenizer": tokenizer_fp,
             "prompts": sha256_json([[p.id, p.messages, p.domain] for p in prompts]),
             "generation": gen, "format_version": DATASET_FORMAT_VERSION}
    return sha256_json(parts), parts


def get_or_generate_dataset(teacher, prompts: Sequence[PromptRecord], spec, *, root: str | os.PathLike | None = None,
                            progress: bool = True) -> DistillDataset:
    """Open the cached dataset for (teacher, tokenizer, prompts, generation settings) or generate and save it.

    ``teacher`` is a :class:`~distillgate.models.LoadedModel`; ``spec`` a :class:`~distillgate.config.DataSpec`
    (max_new_tokens, samples_per_prompt, gen_temperature, gen_top_p, gen_batch_size, seed, seq_len,
    heldout_fraction). The folder is ``<root or $DISTILLGATE_HOME/datasets>/<key[:16]>``; ``ds.path`` says where.
    """
    from ..models import fingerprint_tokenizer

    if not prompts:
        raise InputError("no prompts to answer")
    tok = teacher.tokenizer
    tok_fp = fingerprint_tokenizer(tok)
    gen = {"max_new_tokens": spec.max_new_tokens, "samples_per_prompt": spec.samples_per_prompt,
           "temperature": spec.gen_temperature, "top_p": spec.gen_top_p, "batch_size": spec.gen_batch_size,
           "seed": spec.seed}
    key, parts = dataset_key(teacher.fingerprint, tok_fp, prompts, gen)
    folder = Path(root) if root else distillgate_home() / "datasets"
    folder = folder / key[:16]
    opts = {"seq_len": spec.seq_len, "heldout_fraction": spec.heldout_fraction, "seed": spec.seed}
    from ..train import distributed as dist

    found = None
    if folder.exists() and dist.is_main():  # under torchrun rank 0 decides, so every rank generates or none
        try:
            found = DistillDataset.load(folder, **opts)
        except ArtifactError as e:
            log.warning("%s: cached dataset unusable (%s); regenerating", folder, e)
    if dist.broadcast_object(found is not None):
        dist.committed_by_rank0(folder)
        return found if found is not None else DistillDataset.load(folder, **opts)
    examples = generate_responses(teacher.model, tok, prompts, max_new_tokens=spec.max_new_tokens,
                                  samples_per_prompt=spec.samples_per_prompt, temperature=spec.gen_temperature,
                                  top_p=spec.gen_top_p, batch_size=spec.gen_batch_size, seed=spec.seed,
                                  progress=progress)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # Saved at full length (seq_len is applied on load), so a later run with a longer seq_len reuses it.
    full = DistillDataset(examples, pad_id=pad, seq_len=1 << 30, heldout_fraction=0.0, tokenizer_fingerprint=tok_fp,
                          prompts=prompts, key=key)
    # exist_ok: a concurrent run that committed this key first wins (same inputs); an unusable folder is replaced
    if dist.is_main():
        full.save(folder, meta={"key_parts": parts}, exist_ok=True)
    dist.barrier()  # the other ranks read only what rank 0 committed
    dist.committed_by_rank0(folder)
    return DistillDataset.load(folder, **opts)


def text_file_examples(path: str | os.PathLike, tokenizer, seq_len: int, max_tokens: int) -> list[Example]:
    """Plain text cut into windows of ``seq_len`` tokens (at most ``max_tokens`` in all) where every token but
    a window's first is a target (``loss_mask = [0, 1, 1, ...]``): perplexity and calibration input."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: text file not found")
    if seq_len < 2 or max_tokens < 2:
        raise ConfigError("seq_len/max_tokens", (seq_len, max_tokens), "integers >= 2")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise InputError(f"{path}: fewer than 2 tokens of text")
    out = []
    for i, start in enumerate(range(0, len(ids), seq_len)):
        win = ids[start:start + seq_len]
        if len(win) < 2:
            break
        out.append(Example(id=f"text:{path.name}:{i}", prompt_id=f"text:{path.name}:{i}", sample_idx=0,
                           domain="general", complexity=0.0, input_ids=win, loss_mask=[0] + [1] * (len(win) - 1),
                           response="", finished=False))
    return out
