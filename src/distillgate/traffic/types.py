"""Traffic types (SPEC L4: ten-plus kinds of requests) and the capability modules each one exercises.

A type is a function ``make(domain, rng, sources) -> Script``: the user's scripted turns (the first is the
request; later ones are the follow-ups a continuing user sends), a :class:`Reference` per turn where the right
answer is known from the request itself (an amount to extract, a sum, an end time, a department), and the
capability modules the request exercises (:data:`MODULES`; the Shapley attribution of G-B2 splits each KPI
change over them). ``sources`` are built-in prompts of the domain (:func:`distillgate.data.prompts.
builtin_prompts`); the ``s4_*`` types turn them into the S4 challenge kinds of
:mod:`distillgate.consistency.challenge`, so traffic and the S4 stage speak of the same hard inputs.

Requests without a reference are graded by the S4 checks (:mod:`distillgate.traffic.grading`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from ..consistency.challenge import GLOSSARY, make_challenge
from ..data.vocab import VOCAB

MODULES = ("coreference", "time_reasoning", "domain_terms", "arithmetic", "instruction_following", "extraction",
           "summarisation", "robustness")
# one word a department router would answer with, per business domain (the classify type's labels)
DEPARTMENTS = {"finance_risk": "finance", "medical": "medical", "legal": "legal", "education": "education",
               "customer_support": "support", "ecommerce": "sales", "travel": "travel",
               "technical_docs": "engineering"}
NAMES = ("Alice Moreau", "Ben Okafor", "Chen Wei", "Dana Petrov", "Elena Rossi", "Farid Haddad", "Grace Kim")
FOLLOW_UPS = ("Can you give me a concrete example?", "Thanks. What should I do first?",
              "Could you say that more simply?", "Is there anything I should watch out for?")


@dataclass
class Reference:
    """What a right answer contains: ``number`` (a number equal to ``value`` within 1%), ``text`` (one of
    ``value`` / ``alternatives`` as a phrase, case-insensitive) or ``label`` (``value`` is the first of
    ``alternatives`` the answer names)."""

    kind: str
    value: str
    alternatives: tuple[str, ...] = ()


@dataclass
class Script:
    traffic_type: str
    domain: str
    turns: list[str]
    modules: tuple[str, ...]
    references: list[Reference | None] = field(default_factory=list)
    time_constrained: bool = False  # the user has a deadline: the tight latency budget applies

    def reference(self, turn: int) -> Reference | None:
        return self.references[turn - 1] if turn - 1 < len(self.references) else None

    def message(self, turn: int) -> str:
        if turn - 1 < len(self.turns):
            return self.turns[turn - 1]
        return FOLLOW_UPS[(turn - len(self.turns) - 1) % len(FOLLOW_UPS)]


def _v(domain: str, slot: str, rng: random.Random) -> str:
    return rng.choice(VOCAB[domain][slot])


def query(domain, rng, sources) -> Script:
    return Script("query", domain, [rng.choice(sources).text], ("domain_terms",))


def support_dialogue(domain, rng, sources) -> Script:
    item = _v(domain, "item", rng)
    turns = [f"Hello, I need help with {item}. {_v(domain, 'cond', rng).capitalize()}. What happens now?",
             "It got worse since yesterday. Can you handle it for me?",
             "Who exactly should I talk to about it, and what should I tell them?"]
    return Script("support_dialogue", domain, turns, ("coreference", "domain_terms"))


def summarise(domain, rng, sources) -> Script:
    amount = rng.randrange(120, 9800, 10)
    item, topic = _v(domain, "item", rng), _v(domain, "topic", rng)
    doc = (f"Report: the team reviewed {item}. The review concerned {topic}. The total cost came to {amount} "
           f"dollars. The next step is to {_v(domain, 'action', rng)}.")
    return Script("summarise", domain, [f"{doc}\nSummarise this report in one sentence, keeping the cost."],
                  ("summarisation",), [Reference("number", str(amount))])


def extract(domain, rng, sources) -> Script:
    amount, day = rng.randrange(15, 5000), rng.randrange(1, 28)
    name = rng.choice(NAMES)
    text = (f"Note: {name} paid {amount} dollars on March {day} for {_v(domain, 'item', rng)}. "
            f"How many dollars did {name} pay? Answer with the number only.")
    return Script("extract", domain, [text], ("extraction",), [Reference("number", str(amount))])


def classify(domain, rng, sources) -> Script:
    labels = list(DEPARTMENTS.values())
    req = rng.choice(sources).text
    text = (f"Which department should handle this request? Options: {', '.join(labels)}. Request: \"{req}\" "
            f"Answer with one word.")
    return Script("classify", domain, [text], ("domain_terms", "instruction_following"),
                  [Reference("label", DEPARTMENTS[domain], tuple(labels))])


def rewrite(domain, rng, sources) -> Script:
    action = _v(domain, "action", rng)
    text = f"Rewrite this message politely for {_v(domain, 'audience', rng)}: \"You must {action} today.\""
    return Script("rewrite", domain, [text], ("instruction_following",))


def multi_document(domain, rng, sources) -> Script:
    a, b = rng.sample(range(100, 5000, 7), 2)
    i1, i2 = rng.sample(VOCAB[domain]["item"], 2)
    text = (f"Document 1: {i1} costs {a} dollars.\nDocument 2: {i2} costs {b} dollars.\n"
            f"Which of the two costs more, and how many dollars does it cost?")
    return Script("multi_document", domain, [text], ("extraction", "coreference"),
                  [Reference("number", str(max(a, b)))])


def time_constrained(domain, rng, sources) -> Script:
    h, m, dur = rng.randrange(7, 16), rng.choice((0, 15, 30, 45)), rng.choice((30, 45, 60, 90, 105, 120))
    end = h * 60 + m + dur
    text = (f"Quick, I have a deadline: a session about {_v(domain, 'topic', rng)} starts at {h}:{m:02d} and "
            f"lasts {dur} minutes. At what time does it end?")
    return Script("time_constrained", domain, [text], ("time_reasoning",),
                  [Reference("text", f"{end // 60}:{end % 60:02d}")], time_constrained=True)


def arithmetic(domain, rng, sources) -> Script:
    n, price = rng.randrange(2, 9), rng.randrange(3, 60)
    text = (f"I need {n} of {_v(domain, 'item', rng)} at {price} dollars each. What is the total in dollars?")
    return Script("arithmetic", domain, [text], ("arithmetic",), [Reference("number", str(n * price))])


def mixed_terms(domain, rng, sources) -> Script:
    other = rng.choice([d for d in GLOSSARY if d != domain])
    term = rng.choice(GLOSSARY[other])
    text = f"{rng.choice(sources).text} Also, how does {term} relate to {_v(domain, 'topic', rng)}?"
    return Script("mixed_terms", domain, [text], ("domain_terms", "robustness"))


def _s4(kind: str, modules: tuple[str, ...]) -> Callable:
    def make(domain, rng, sources) -> Script:
        c = make_challenge(kind, rng.choice(sources), rng, sources)
        return Script(f"s4_{kind}", domain, [c.text], modules)
    make.__name__ = f"s4_{kind}"
    return make


TYPES: dict[str, Callable[[str, random.Random, list], Script]] = {
    "query": query, "support_dialogue": support_dialogue, "summarise": summarise, "extract": extract,
    "classify": classify, "rewrite": rewrite, "multi_document": multi_document,
    "time_constrained": time_constrained, "arithmetic": arithmetic, "mixed_terms": mixed_terms,
    "s4_ambiguous": _s4("ambiguous", ("coreference", "robustness")),
    "s4_typos": _s4("typos", ("robustness",)),
    "s4_multi_intent": _s4("multi_intent", ("instruction_following", "robustness")),
    "s4_conflicting": _s4("conflicting", ("instruction_following", "robustness")),
    "s4_format_injection": _s4("format_injection", ("instruction_following", "robustness")),
}
