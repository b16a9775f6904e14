"""S4.2.3 interaction quality: an answer scored on four documented features, each in [0, 1], so a low score
says which feature is low.

* ``politeness``: 0.6 for a neutral answer, +0.2 per courtesy marker (please, thank you, happy to help,
  sorry, ...; at most +0.4), -0.5 per dismissive or rude marker (obviously, just google it, stupid, ...);
* ``density`` (information density): content-word share (words not in a stop list) / 0.55, times
  (1 - repetition: the larger of the share of repeated word trigrams and of words repeating the previous
  one), times min(1, words / 12): short, padded or looping answers score low
  (a small student's typical failure is repeating itself);
* ``follow_up``: 1 when the answer asks the user something or offers a next step ("Would you like ...?",
  "let me know if ..."), else 0;
* ``readability``: Flesch reading ease, ``206.835 - 1.015 words/sentence - 84.6 syllables/word`` with syllables
  from the ``pyphen`` hyphenation dictionary (hyphenation points + 1; textstat needs cmudict from the network),
  mapped from [0, 80] to [0, 1].

``overall`` weighs them (``WEIGHTS``). :func:`check` fails the student when its overall is more than
``margin`` under the teacher's, or its politeness or density is under ``floor`` whatever the teacher did.
"""

from __future__ import annotations

import re
from functools import lru_cache

from . import CheckResult

WEIGHTS = {"politeness": 0.3, "density": 0.4, "follow_up": 0.1, "readability": 0.2}
POLITE = ("please", "thank you", "thanks", "happy to help", "glad to", "sorry", "i hope this helps", "certainly",
          "of course", "you're welcome", "i'd recommend", "i recommend", "feel free")
RUDE = ("obviously", "just google", "stupid", "idiot", "figure it out", "whatever", "not my problem",
        "as i already said", "shut up", "dumb", "waste of time", "i don't care", "read the manual")
FOLLOW_UP = re.compile(r"(would you like|do you want|shall i|should i|can i help|could you (?:tell|share|clarify)|"
                       r"let me know if|do you have|which (?:one|option) do you|want me to|if you tell me)", re.I)
STOPWORDS = frozenset("a an the of to in on at for and or is are was were be been being it its this that these "
                      "those with by as from into you your i we our they their he she him her them my me so "
                      "but if then than there here just very really also can could will would should may might "
                      "do does did have has had not no yes all any some more most such what which who how".split())


@lru_cache(maxsize=1)
def _pyphen():
    import pyphen

    return pyphen.Pyphen(lang="en_US")


def flesch(text: str) -> float:
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return 0.0
    sentences = max(1, len(re.findall(r"[.!?]+(?:\s|$)", text.strip() + " ")))
    syl = sum(len(_pyphen().positions(w.lower())) + 1 for w in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syl / len(words)


def features(text: str) -> dict[str, float]:
    low = text.lower()
    words = re.findall(r"[a-z0-9']+", low)
    n = len(words)
    polite = sum(1 for p in POLITE if p in low)
    rude = sum(1 for r in RUDE if r in low)
    politeness = min(1.0, max(0.0, 0.6 + min(0.4, 0.2 * polite) - 0.5 * rude))
    if n == 0:
        return {"politeness": politeness, "density": 0.0, "follow_up": 0.0, "readability": 0.0}
    content = sum(1 for w in words if w not in STOPWORDS) / n
    tri = [tuple(words[i:i + 3]) for i in range(n - 2)]
    repeated = (len(tri) - len(set(tri))) / len(tri) if tri else 0.0
    stutter = sum(a == b for a, b in zip(words, words[1:])) / max(1, n - 1)  # "is is is the the"
    repeated = max(repeated, stutter)
    density = min(1.0, content / 0.55) * (1.0 - repeated) * min(1.0, n / 12)
    follow = 1.0 if FOLLOW_UP.search(text) or re.search(r"\b(you|your)\b[^.!?]*\?", low) else 0.0
    fre = flesch(text)
    readability = min(1.0, max(0.0, fre / 80.0))
    return {"politeness": round(politeness, 4), "density": round(density, 4), "follow_up": follow,
            "readability": round(readability, 4)}


def overall(f: dict[str, float]) -> float:
    return round(sum(WEIGHTS[k] * f[k] for k in WEIGHTS), 4)


def check(teacher: str, student: str, *, margin: float = 0.15, floor: float = 0.3) -> CheckResult:
    ft, fs = features(teacher), features(student)
    ot, os_ = overall(ft), overall(fs)
    reasons = []
    if os_ < ot - margin:
        low = [k for k in WEIGHTS if fs[k] < ft[k] - 1e-9]
        reasons.append(f"overall {os_:.2f} < teacher {ot:.2f} - {margin} (lower: "
                       + ", ".join(f"{k} {fs[k]:.2f} vs {ft[k]:.2f}" for k in low) + ")")
    for k in ("politeness", "density"):
        if fs[k] < floor:
            reasons.append(f"{k} {fs[k]:.2f} < floor {floor}")
    return CheckResult("quality", not reasons, os_, "; ".join(reasons),
                       {"student": fs, "teacher": ft, "student_overall": os_, "teacher_overall": ot})
