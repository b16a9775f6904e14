"""The traffic event log: one JSON object per line, one line per answered turn (format version 1).

The KPI code (:mod:`distillgate.business.kpis`) reads only this schema, so simulated traffic
(:mod:`distillgate.traffic.generator`), a replay and real production logs go through the same code; the
simulator is one producer, never the only input. Fields of a ``turn`` event:

======================  ==========  =====================================================================
field                   type        meaning
======================  ==========  =====================================================================
``format_version``      int         1
``ts``                  float       unix seconds of the request (simulated clock in the simulator)
``session_id``          str         the session (a conversation); a session's turns share it
``user_id``             str         the user (arms are assigned per user, sticky)
``arm``                 str         the A/B arm that answered (e.g. ``control`` / ``candidate``)
``turn``                int >= 1    position of the turn in its session
``domain``              str         business domain of the request (one of the eight, or ``general``)
``traffic_type``        str         what kind of request (:data:`distillgate.traffic.types.TYPES` or any label)
``modules``             [str]       capability modules the request exercises (Shapley attribution, G-B2)
``request``             str         the user's message of this turn
``response``            str         the assistant's answer ("" when it failed)
``latency_ms``          float       request to last token
``ttft_ms``             float|null  request to first token
``correct``             bool|null   the answer judged right (against a reference, else by the S4 checks);
                                    null: not judged
``clicked``             bool        the user clicked a link / suggested action in the answer
``outcome``             str         what the user did next: ``continue`` (another turn), ``resolved`` (left
                                    satisfied), ``escalate`` (hand-off to a human agent), ``abandon`` (left
                                    unsatisfied), ``error`` (the service failed)
``review_pass``         bool|null   human review verdict when the turn was sampled for review, else null
``provenance``          str         ``real`` (production logs), ``replay`` (logged requests answered again)
                                    or ``simulated`` (this package's simulator)
======================  ==========  =====================================================================

:func:`read_events` validates every line (errors name ``file:line: field`` and what is allowed) before any
KPI is computed; :func:`write_events` writes atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_text, iter_utf8_lines

FORMAT_VERSION = 1
OUTCOMES = ("continue", "resolved", "escalate", "abandon", "error")
PROVENANCES = ("real", "replay", "simulated")
PROVENANCE_LABEL = {"real": "real logs", "replay": "replay", "simulated": "simulated"}


@dataclass
class TurnEvent:
    ts: float
    session_id: str
    user_id: str
    arm: str
    turn: int
    domain: str
    traffic_type: str
    request: str
    response: str
    latency_ms: float
    outcome: str
    provenance: str
    modules: list[str] = field(default_factory=list)
    ttft_ms: float | None = None
    correct: bool | None = None
    clicked: bool = False
    review_pass: bool | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)


_REQUIRED = {"ts": (int, float), "session_id": str, "user_id": str, "arm": str, "turn": int, "domain": str,
             "traffic_type": str, "request": str, "response": str, "latency_ms": (int, float), "outcome": str}
_OPTIONAL = {"ttft_ms": (int, float, type(None)), "correct": (bool, type(None)), "clicked": bool,
             "review_pass": (bool, type(None)), "modules": list, "provenance": str, "format_version": int}


def parse_event(obj, where: str, default_provenance: str | None = None) -> TurnEvent:
    """One event from a decoded JSON object; InputError naming ``where: field`` on anything off-schema."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object (a turn event), got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_REQUIRED) + sorted(_OPTIONAL)}")
    for name, typ in {**_REQUIRED, **_OPTIONAL}.items():
        if name not in obj:
            if name in _REQUIRED:
                raise InputError(f"{where}: missing field {name!r} (required: {sorted(_REQUIRED)})")
            continue
        v = obj[name]
        bad_bool = isinstance(v, bool) and typ in (int, (int, float), (int, float, type(None)))
        if bad_bool or not isinstance(v, typ):
            raise InputError(f"{where}: field {name!r} = {v!r} is not of type {_tname(typ)}")
    if obj.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise InputError(f"{where}: format_version {obj['format_version']!r}; this reader knows {FORMAT_VERSION}")
    if obj["outcome"] not in OUTCOMES:
        raise InputError(f"{where}: outcome {obj['outcome']!r}; allowed: {list(OUTCOMES)}")
    if obj["turn"] < 1:
        raise InputError(f"{where}: turn {obj['turn']} must be >= 1")
    if obj["latency_ms"] < 0 or (obj.get("ttft_ms") or 0) < 0:
        raise InputError(f"{where}: latency_ms / ttft_ms must be >= 0")
    if not all(isinstance(m, str) for m in obj.get("modules", [])):
        raise InputError(f"{where}: modules must be a list of strings")
    prov = obj.get("provenance", default_provenance)
    if prov not in PROVENANCES:
        raise InputError(f"{where}: provenance {prov!r}; allowed: {list(PROVENANCES)} (or give the log's "
                         f"provenance when importing it)")
    kw = {k: obj[k] for k in _REQUIRED}
    kw.update({k: obj[k] for k in _OPTIONAL if k in obj and k not in ("provenance", "format_version")})
    kw["ts"], kw["latency_ms"] = float(kw["ts"]), float(kw["latency_ms"])
    if kw.get("ttft_ms") is not None:
        kw["ttft_ms"] = float(kw["ttft_ms"])
    return TurnEvent(**kw, provenance=prov)


def _tname(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


def read_events(path: str | os.PathLike, provenance: str | None = None) -> list[TurnEvent]:
    """Import a JSONL event log. ``provenance``: what the log is (``real`` for production logs) for lines that
    do not say; a line that says wins. Every line is validated before anything is returned."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: traffic event log not found")
    if provenance is not None and provenance not in PROVENANCES:
        raise InputError(f"provenance {provenance!r}; allowed: {list(PROVENANCES)}")
    out = []
    for lineno, line in iter_utf8_lines(p):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
        out.append(parse_event(obj, f"{p}:{lineno}", provenance))
    if not out:
        raise InputError(f"{p}: no events (expected one JSON turn event per line)")
    return out


def write_events(path: str | os.PathLike, events: list[TurnEvent]) -> Path:
    text = "".join(json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for e in events)
    atomic_write_text(path, text)
    return Path(path)


def provenance_of(events: list[TurnEvent]) -> str:
    """The window's provenance label: ``real logs`` / ``replay`` / ``simulated``, or a ``+``-joined mix."""
    kinds = [k for k in PROVENANCES if any(e.provenance == k for e in events)]
    return "+".join(PROVENANCE_LABEL[k] for k in kinds) or "none"
