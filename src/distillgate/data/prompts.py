"""Prompt sources: the built-in instruction generator, JSONL files and Hugging Face datasets.

Every source yields :class:`PromptRecord` s. ``complexity`` is always computed from the prompt's structure by
:func:`complexity_score` (conditionals, clauses, parts, length), never copied from a template label, so
prompts from any source are scored on the same scale; the dynamic temperature policy (SPEC S2.1) reads it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DOMAINS
from ..errors import ConfigError, InputError
from ..io import sha256_json
from .vocab import TEMPLATES, VOCAB

GENERAL = "general"  # domain of external prompts that name none; weighting treats it as weight 1
_ROLES = ("system", "user", "assistant")


@dataclass
class PromptRecord:
    """One instruction. ``messages`` is a chat (``[{"role", "content"}]``) ending with a user turn."""

    id: str
    messages: list[dict]
    domain: str
    complexity: float
    level: int
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------- complexity scoring

_COND = re.compile(r"\b(if|unless|otherwise|when|whether|provided|except|but|neither|suppose|given)\b", re.I)
_CLAUSE = re.compile(r"[,;:]|\b(and|then|or|also|instead)\b", re.I)
_PARTS = re.compile(r"\?|\b(first|then|list|compare|explain|describe|justify|walk through)\b", re.I)


def complexity_score(text: str) -> float:
    """Structural complexity in [0, 1): ``1 - exp(-s)`` with
    ``s = 0.35 * conditionals + 0.08 * clause markers + 0.06 * request parts + 0.012 * words``.

    Weights were set so a one-line definition scores ~0.05-0.22, a two-part explanation ~0.25-0.45 and a
    three-level nested conditional ~0.75-0.95 (tests pin the ordering of the built-in levels).
    """
    words = len(text.split())
    s = (0.35 * len(_COND.findall(text)) + 0.08 * len(_CLAUSE.findall(text))
         + 0.06 * len(_PARTS.findall(text)) + 0.012 * words)
    return round(1.0 - math.exp(-s), 4)


def level_of(score: float) -> int:
    """Map a complexity score to the three levels of SPEC S2.1 (1 simple, 2 multi-part, 3 nested)."""
    return 1 if score < 0.24 else 2 if score < 0.6 else 3


def _prompt_id(domain: str, messages: list[dict]) -> str:
    return f"{domain}-{sha256_json(messages)[:12]}"


def make_record(messages: list[dict], domain: str, source: str, level: int | None = None,
                meta: dict | None = None) -> PromptRecord:
    """A PromptRecord with a content-derived id (stable across runs) and a structural complexity score."""
    score = complexity_score(" ".join(m["content"] for m in messages if m["role"] == "user"))
    return PromptRecord(id=_prompt_id(domain, messages), messages=messages, domain=domain, complexity=score,
                        level=level if level is not None else level_of(score), source=source, meta=meta or {})


# ----------------------------------------------------------------------------------------- built-in source

_SLOT = re.compile(r"\{(\w+?)(\d?)\}")


def _fill(template: str, vocab: dict[str, list[str]], rng: random.Random) -> str:
    """Fill ``{slot}``/``{slot2}`` placeholders with distinct values of the same slot."""
    used: dict[str, set[str]] = {}
    values: dict[str, str] = {}
    for m in _SLOT.finditer(template):
        key, slot = m.group(0)[1:-1], m.group(1)
        if key in values:
            continue
        pool = [v for v in vocab[slot] if v not in used.get(slot, set())]
        values[key] = rng.choice(pool)
        used.setdefault(slot, set()).add(values[key])
    text = template.format(**values)
    return text[0].upper() + text[1:]


def _capacity(domain: str, level: int) -> int:
    """Upper bound on distinct prompts a (domain, level) cell can produce (product over template slots)."""
    total = 0
    for t in TEMPLATES[level]:
        n = 1
        counts: dict[str, int] = {}
        for m in _SLOT.finditer(t):
            slot = m.group(1)
            n *= max(len(VOCAB[domain][slot]) - counts.get(slot, 0), 1)
            counts[slot] = counts.get(slot, 0) + 1
        total += n
    return total


def builtin_prompts(n: int, domains: list[str] | tuple[str, ...] = DOMAINS, seed: int = 0) -> list[PromptRecord]:
    """``n`` distinct instructions, balanced across ``domains`` (counts differ by at most 1) and, within a
    domain, across complexity levels 1/2/3 (cycled). Deterministic for (n, domains, seed) and prefix-stable: the first
    ``n`` prompts are the same whatever larger count is asked for. Prompt ids are content hashes (with the
    domain), so a prompt keeps its id whatever else is generated with it.
    """
    if n < 1:
        raise ConfigError("data.num_prompts", n, "an integer >= 1")
    domains = list(domains)
    bad = [d for d in domains if d not in VOCAB]
    if not domains or bad:
        raise ConfigError("data.domains", domains, f"a non-empty subset of {list(DOMAINS)}")
    per_domain = [n // len(domains) + (1 if i < n % len(domains) else 0) for i in range(len(domains))]
    out: list[PromptRecord] = []
    for domain, count in zip(domains, per_domain):
        # One generator per domain (and a domain's own duplicate check): a domain's prompts do not depend on how
        # many the other domains drew, so the list for n is a prefix of the list for any larger n (a run's
        # held-out set does not change with its length).
        rng = random.Random(f"distillgate-prompts-{seed}-{domain}")
        seen: set[str] = set()
        for j in range(count):
            level = j % 3 + 1
            cap = _capacity(domain, level)
            for _attempt in range(50 * cap):
                text = _fill(rng.choice(TEMPLATES[level]), VOCAB[domain], rng)
                if text not in seen:
                    break
            else:
                raise ConfigError("data.num_prompts", n, f"at most about {3 * cap * len(domains)} distinct "
                                  f"built-in prompts for {len(domains)} domain(s)")
            seen.add(text)
            out.append(make_record([{"role": "user", "content": text}], domain, "builtin", level=level,
                                   meta={"seed": seed}))
    # Interleave domains round-robin so any prefix of the list stays balanced.
    by_domain = [[r for r in out if r.domain == d] for d in domains]
    return [group[i] for i in range(max(per_domain)) for group in by_domain if i < len(group)]


# ---------------------------------------------------------------------------------------------- JSONL source

_JSONL_ALLOWED = ('{"prompt": "<text>", "domain": "<domain>"} or {"messages": [{"role": "user", '
                  '"content": "..."}], "domain": "<domain>"}; domain optional, one of '
                  f"{list(DOMAINS) + [GENERAL]}")


def _bad(path, lineno: int, what: str) -> InputError:
    return InputError(f"{path}:{lineno}: {what}; each line must be {_JSONL_ALLOWED}")


def _parse_messages(obj: dict, path, lineno: int) -> list[dict]:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(path, lineno, "'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str)):
                raise _bad(path, lineno, f"messages[{i}] must be {{'role': one of {list(_ROLES)}, 'content': str}}")
        if msgs[-1]["role"] != "user":
            raise _bad(path, lineno, f"the last message must be a user turn, got role {msgs[-1]['role']!r}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise _bad(path, lineno, "'prompt' must be a non-empty string")
        return [{"role": "user", "content": obj["prompt"]}]
    raise _bad(path, lineno, f"no 'prompt' or 'messages' key (keys: {sorted(obj)})")


def load_jsonl_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    """Read prompts from a JSONL file (blank lines skipped; duplicates of an earlier line dropped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    from ..io import MAX_INPUT_FILE_BYTES, iter_utf8_lines

    if path.stat().st_size > MAX_INPUT_FILE_BYTES:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes, over the prompt file limit of "
                         f"{MAX_INPUT_FILE_BYTES:,}")
    out, seen = [], set()
    for lineno, line in iter_utf8_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise _bad(path, lineno, f"invalid JSON ({why})") from None
        if not isinstance(obj, dict):
            raise _bad(path, lineno, f"a JSON {type(obj).__name__}, expected an object")
        messages = _parse_messages(obj, path, lineno)
        domain = obj.get("domain", GENERAL)
        if not isinstance(domain, str) or (domain not in DOMAINS and domain != GENERAL):
            raise _bad(path, lineno, f"unknown domain {domain!r}")
        rec = make_record(messages, domain, f"jsonl:{path.name}", meta={"line": lineno})
        if rec.id not in seen:
            seen.add(rec.id)
            out.append(rec)
    if not out:
        raise InputError(f"{path}: no prompts (empty file); each line must be {_JSONL_ALLOWED}")
    return out


# ------------------------------------------------------------------------------------------------- HF source

def load_hf_prompts(name: str, split: str = "train", field: str = "prompt", n: int | None = None) -> list[PromptRecord]:
    """Prompts from a Hugging Face dataset column (online only). A ``domain`` column is used when present
    and valid; otherwise the domain is ``general``."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(f"data.hf_name={name!r}: Hugging Face datasets need network access, but "
                         "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set; use data.source=jsonl with a local file")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset or split: one clean message
        raise InputError(f"data.hf_name={name!r} split={split!r}: could not load ({type(e).__name__}: {e})") from e
    if field not in ds.column_names:
        raise ConfigError("data.hf_field", field, f"a column of {name}: {ds.column_names}")
    out, seen = [], set()
    for i, row in enumerate(ds):
        text = row[field]
        if not isinstance(text, str) or not text.strip():
            continue
        domain = row.get("domain") if row.get("domain") in DOMAINS else GENERAL
        rec = make_record([{"role": "user", "content": text}], domain, f"hf:{name}/{split}", meta={"row": i})
        if rec.id not in seen:
            seen.add(rec.id)
            out.append(rec)
        if n is not None and len(out) >= n:
            break
    if not out:
        raise InputError(f"data.hf_name={name!r}: column {field!r} of split {split!r} holds no non-empty strings")
    return out


def prompts_from_spec(spec) -> list[PromptRecord]:
    """The prompts a :class:`~distillgate.config.DataSpec` asks for (builtin / jsonl / hf, capped at num_prompts)."""
    if spec.source == "builtin":
        return builtin_prompts(spec.num_prompts, spec.domains, spec.seed)
    if spec.source == "jsonl":
        return load_jsonl_prompts(spec.path)[: spec.num_prompts]
    return load_hf_prompts(spec.hf_name, spec.hf_split, spec.hf_field, spec.num_prompts)
