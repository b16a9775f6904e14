"""S4.2.2 logical consistency: a rule engine for time contradictions, quantity conflicts and reversed causality.

Parsing uses maintained parsers: ``dateparser`` finds and reads dates and clock times, ``quantulum3`` finds
quantities with their units (its rule-based unit disambiguation: the bundled scikit-learn classifier is a
pickle of another scikit-learn version), ``pint`` converts between units. Regular expressions only find the
cue words that relate two parsed spans ("before", "lasts", "in total", "because").

Rules (every :class:`Hit` names the spans it compared):

* ``weekday_date``: a weekday next to a full date that falls on another weekday;
* ``date_order``: "X before/after Y" where both sides hold dates in the other order;
* ``start_duration_end``: a start time / date plus a stated duration that does not give the stated end;
* ``parts_total``: amounts followed by "in total / altogether / a total of" whose parts do not sum to the total
  (relative tolerance ``tolerance``), including "N items at P each";
* ``unit_conversion``: "X (Y)", "X, i.e. Y", "X = Y" where pint says X != Y (same tolerance);
* ``amount_changed`` (answer vs request): the answer names the request's thing ("$1,200 invoice") with another
  amount and never the request's;
* ``reversed_causality`` / ``reversed_order``: "A causes B" (because, leads to, results in, due to, so) or
  "A before B" against "B causes A" / "B before A", inside the answer, against the request or against the
  teacher's answer (content-word overlap of each side >= ``overlap``).

:func:`check` fails a student answer with any hit inside it, against the request or against the teacher; the
teacher's own hits are reported, not counted against the student.
"""

from __future__ import annotations

import datetime as _dt
import re
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

from . import CheckResult

BASE = _dt.datetime(2025, 1, 1)  # relative dates ("today") resolve against a fixed day: results are reproducible
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
STOP = frozenset("a an the of to in on at for and or is are was were be been it its this that these those with "
                 "by as from into your you we our their they can will would should may might not no more less "
                 "very also than then so because due leads lead led causes cause caused result results resulted "
                 "before after".split())


@dataclass
class Hit:
    rule: str
    where: str          # "answer", "answer_vs_request", "answer_vs_teacher"
    spans: list[str]    # the spans compared
    message: str

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ parsers

@lru_cache(maxsize=1)
def _quantulum():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from quantulum3 import classifier

        classifier.USE_CLF = False  # its pickled classifier needs the scikit-learn version it was made with
        from quantulum3 import parser
    return parser


@lru_cache(maxsize=1)
def _ureg():
    import pint

    return pint.UnitRegistry()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+|\n+", text) if s.strip()]


@dataclass
class Quantity:
    value: float
    unit: str
    entity: str
    span: tuple[int, int]
    surface: str


def quantities(text: str) -> list[Quantity]:
    out = []
    for q in _quantulum().parse(text):
        unit = q.unit.name
        if unit == "minute of arc" and "min" in q.surface.lower():
            unit, entity = "minute", "time"  # quantulum's rule-based fallback reads "90 minutes" as an angle
        else:
            entity = q.unit.entity.name
        out.append(Quantity(float(q.value), unit, entity, tuple(q.span), q.surface.strip()))
    return out


def _pint(q: Quantity):
    if q.entity in ("dimensionless", "currency", "unknown"):
        return None
    try:
        return _ureg().Quantity(q.value, q.unit.replace(" ", "_"))
    except Exception:
        return None


def dates(text: str) -> list[tuple[str, _dt.datetime]]:
    """Full dates (with a year) dateparser finds in ``text``: ``[(matched text, datetime)]``."""
    from dateparser.search import search_dates

    found = search_dates(text, languages=["en"], settings={"RELATIVE_BASE": BASE}) or []
    return [(s, d) for s, d in found if re.search(r"\b\d{4}\b", s)]


def clock(text: str) -> _dt.datetime | None:
    import dateparser

    return dateparser.parse(text, languages=["en"], settings={"RELATIVE_BASE": BASE})


def _words(phrase: str) -> frozenset[str]:
    out = set()
    for w in re.findall(r"[a-z]+", phrase.lower()):
        if w in STOP or len(w) < 3:
            continue
        for suf in ("ing", "ed", "es", "s"):
            if w.endswith(suf) and len(w) - len(suf) >= 3:
                w = w[: -len(suf)]
                break
        out.add(w)
    return frozenset(out)


def _overlap(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(1, min(len(a), len(b))) if a and b else 0.0


# ------------------------------------------------------------------------------------------ time rules

def weekday_date(text: str) -> list[Hit]:
    hits = []
    for s, d in dates(text):
        i = text.find(s)
        window = (text[max(0, i - 14):i] + s + text[i + len(s):i + len(s) + 14]).lower()
        named = [w for w in WEEKDAYS if re.search(rf"\b{w}\b", window)]
        if named and WEEKDAYS[d.weekday()] not in named:
            hits.append(Hit("weekday_date", "answer", [named[0].capitalize(), s.strip()],
                            f"{s.strip()!r} is a {WEEKDAYS[d.weekday()].capitalize()}, not a {named[0].capitalize()}"))
    return hits


_ORDER = re.compile(r"\b(before|after|earlier than|later than|prior to)\b", re.I)


def date_order(text: str) -> list[Hit]:
    hits = []
    for sent in _sentences(text):
        m = _ORDER.search(sent)
        if not m:
            continue
        left, right = dates(sent[:m.start()]), dates(sent[m.end():])
        if not left or not right:
            continue
        (ls, ld), (rs, rd) = left[-1], right[0]
        first = m.group(1).lower() in ("before", "earlier than", "prior to")
        if (first and ld > rd) or (not first and ld < rd):
            hits.append(Hit("date_order", "answer", [ls.strip(), m.group(1), rs.strip()],
                            f"{ls.strip()!r} is not {m.group(1)} {rs.strip()!r}"))
    return hits


_START = re.compile(r"\b(?:starts?|starting|begins?|beginning|departs?|leaves?|opens?|from)\s+(?:at|on)?\s*"
                    r"(\d{1,2}(?::\d{2})?\s*(?:[ap]\.?m\.?)?)", re.I)
_END = re.compile(r"\b(?:ends?|ending|finish(?:es)?|finishing|arrives?|arriving|closes?|until|till|to)\s+"
                  r"(?:at|on)?\s*(\d{1,2}(?::\d{2})?\s*(?:[ap]\.?m\.?)?)", re.I)


def start_duration_end(text: str) -> list[Hit]:
    hits = []
    for sent in _sentences(text):
        s, e = _START.search(sent), _END.search(sent)
        if not s or not e or s.start() == e.start():
            continue
        durs = [q for q in quantities(sent) if q.entity == "time" and q.unit in ("hour", "minute", "second")
                and not (s.start(1) <= q.span[0] < s.end(1) or e.start(1) <= q.span[0] < e.end(1))]
        t0, t1 = clock(s.group(1)), clock(e.group(1))
        if not durs or t0 is None or t1 is None:
            continue
        secs = sum(_ureg().Quantity(q.value, q.unit).to("second").magnitude for q in durs)
        want = t0 + _dt.timedelta(seconds=secs)
        got = t1 if t1 >= t0 else t1 + _dt.timedelta(days=1)
        if abs((want - got).total_seconds()) > 60:
            hits.append(Hit("start_duration_end", "answer", [s.group(1).strip(), *[q.surface for q in durs],
                                                             e.group(1).strip()],
                            f"{s.group(1).strip()} + {' + '.join(q.surface for q in durs)} is "
                            f"{want:%H:%M}, not {e.group(1).strip()}"))
    return hits


# ------------------------------------------------------------------------------------------ quantity rules

_TOTAL = re.compile(r"\b(in total|a total of|total of|totals?|totalling|altogether|overall|sum of|adds up to|"
                    r"comes to|for a total)\b", re.I)
_EACH = re.compile(r"\b(\d+)\s+(?:[a-z]+\s+){0,3}?(?:at|of|costing|for)\s+$", re.I)


def parts_total(text: str, tolerance: float = 0.01) -> list[Hit]:
    hits = []
    qs = quantities(text)
    for m in _TOTAL.finditer(text):
        after = [q for q in qs if q.span[0] >= m.start() and q.span[0] - m.end() <= 24]
        if not after:
            continue
        total = after[0]
        sent_start = max(text.rfind(c, 0, m.start()) for c in ".!?\n") + 1
        parts = [q for q in qs if sent_start <= q.span[0] < m.start() and q.unit == total.unit]
        if total.unit == "dimensionless" or not parts:
            continue
        value, used = 0.0, []
        for q in parts:
            each = re.search(r"\beach\b|\bper\b|\bapiece\b", text[q.span[1]:q.span[1] + 14], re.I)
            count = _EACH.search(text[sent_start:q.span[0]]) if each else None
            if count:
                value += int(count.group(1)) * q.value
                used.append(f"{count.group(1)} x {q.surface}")
            else:
                value += q.value
                used.append(q.surface)
        if len(used) < 2 and "x" not in " ".join(used):
            continue
        if abs(value - total.value) > tolerance * max(abs(total.value), 1e-9):
            hits.append(Hit("parts_total", "answer", used + [total.surface],
                            f"{' + '.join(used)} = {value:g}, not the stated total {total.surface}"))
    return hits


_SAME = re.compile(r"^\s*(?:\(|,?\s*(?:i\.e\.|ie|which is|that is|or about|or|about|=|equals?|equal to)"
                   r"\s*,?\s*\(?)\s*$",
                   re.I)


def unit_conversion(text: str, tolerance: float = 0.02) -> list[Hit]:
    hits = []
    qs = quantities(text)
    for a, b in zip(qs, qs[1:]):
        if not _SAME.match(text[a.span[1]:b.span[0]]):
            continue
        pa, pb = _pint(a), _pint(b)
        if pa is None or pb is None or pa.dimensionality != pb.dimensionality or a.unit == b.unit:
            continue
        conv = pa.to(pb.units).magnitude
        if abs(conv - pb.magnitude) > tolerance * max(abs(pb.magnitude), 1e-9):
            hits.append(Hit("unit_conversion", "answer", [a.surface, b.surface],
                            f"{a.surface} is {conv:.4g} {pb.units}, not {b.surface}"))
    return hits


def _thing(text: str, q: Quantity) -> str | None:
    m = re.match(r"\s*([a-z]{3,})", text[q.span[1]:])
    return m.group(1).lower() if m else None


def amount_changed(request: str, answer: str, tolerance: float = 0.01) -> list[Hit]:
    hits = []
    req = [(q, _thing(request, q)) for q in quantities(request)]
    ans = [(q, _thing(answer, q)) for q in quantities(answer)]
    for rq, rthing in req:
        if rthing is None or rthing in STOP:
            continue
        same = [aq for aq, athing in ans if athing == rthing and aq.unit == rq.unit]
        kept = any(abs(aq.value - rq.value) <= tolerance * max(abs(rq.value), 1e-9) for aq in same)
        changed = [aq for aq in same if abs(aq.value - rq.value) > tolerance * max(abs(rq.value), 1e-9)]
        if changed and not kept:
            hits.append(Hit("amount_changed", "answer_vs_request", [f"{rq.surface} {rthing}",
                                                                   f"{changed[0].surface} {rthing}"],
                            f"the request's {rq.surface} {rthing} became {changed[0].surface} {rthing}"))
    return hits


# ------------------------------------------------------------------------------------------ causality / order

_CAUSAL = [  # (pattern, which group is the cause)
    (re.compile(r"(?P<a>[^.;:!?]+?)\s+(?:because of|because|due to|as a result of|owing to)\s+"
                r"(?P<b>[^.;!?]+)", re.I), "b"),
    (re.compile(r"(?P<a>[^.;:!?]+?)\s+(?:causes?|caused|leads? to|led to|results? in|resulted in|triggers?|"
                r"produces?)\s+"
                r"(?P<b>[^.;!?]+)", re.I), "a"),
    (re.compile(r"(?P<a>[^.;:!?]+?)\s+(?:is|are|was|were)\s+(?:caused by|the result of|triggered by)\s+"
                r"(?P<b>[^.;!?]+)", re.I), "b"),
    (re.compile(r"(?P<a>[^.;:!?]+?),?\s+(?:so|therefore|thus|hence)\s+(?P<b>[^.;!?]+)", re.I), "a"),
]
_BEFORE = re.compile(r"(?P<a>[^.;:!?]+?)\s+(?P<rel>before|after|prior to)\s+(?P<b>[^.;!?]+)", re.I)


def claims(text: str) -> list[tuple[str, str, str, str]]:
    """``[(relation, first, second, sentence)]``: cause -> effect ("cause") and earlier -> later ("order")."""
    out = []
    for sent in _sentences(text):
        for pat, cause in _CAUSAL:
            m = pat.search(sent)
            if m:
                c, e = (m.group("a"), m.group("b")) if cause == "a" else (m.group("b"), m.group("a"))
                out.append(("cause", c.strip(), e.strip(), sent.strip()))
                break
        m = _BEFORE.search(sent)
        if m and not dates(sent):
            a, b = m.group("a").strip(), m.group("b").strip()
            out.append(("order", *((a, b) if m.group("rel").lower() != "after" else (b, a)), sent.strip()))
    return out


def reversed_claims(mine: list, other: list, where: str, overlap: float = 0.5) -> list[Hit]:
    hits = []
    for i, (rel, c1, e1, s1) in enumerate(mine):
        w1c, w1e = _words(c1), _words(e1)
        for rel2, c2, e2, s2 in (other[i + 1:] if other is mine else other):
            if rel2 != rel or s2 == s1:
                continue
            w2c, w2e = _words(c2), _words(e2)
            rev = _overlap(w1c, w2e) >= overlap and _overlap(w1e, w2c) >= overlap
            fwd = _overlap(w1c, w2c) >= overlap and _overlap(w1e, w2e) >= overlap
            if rev and not fwd:
                rule = "reversed_causality" if rel == "cause" else "reversed_order"
                hits.append(Hit(rule, where, [s1, s2], f"{s1!r} reverses {s2!r}"))
                break
    return hits


# ------------------------------------------------------------------------------------------ the check

def find(text: str, *, tolerance: float = 0.01) -> list[Hit]:
    """Every contradiction inside one text."""
    if not text.strip():
        return []
    hits = weekday_date(text) + date_order(text) + start_duration_end(text) + parts_total(text, tolerance)
    hits += unit_conversion(text, 2 * tolerance)
    cl = claims(text)
    hits += reversed_claims(cl, cl, "answer")
    return hits


def check(request: str, teacher: str, student: str, *, tolerance: float = 0.01, overlap: float = 0.5) -> CheckResult:
    inside = find(student, tolerance=tolerance)
    vs_request = amount_changed(request, student, tolerance)
    sc = claims(student)
    vs_request += reversed_claims(sc, claims(request), "answer_vs_request", overlap)
    vs_teacher = reversed_claims(sc, claims(teacher), "answer_vs_teacher", overlap)
    hits = inside + vs_request + vs_teacher
    teacher_hits = find(teacher, tolerance=tolerance)
    reason = "; ".join(f"{h.rule} ({h.where}): {h.message}" for h in hits[:3])
    return CheckResult("logic", not hits, float(len(hits)), reason,
                       {"hits": [h.to_json() for h in hits], "teacher_hits": [h.to_json() for h in teacher_hits]})
