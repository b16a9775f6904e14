"""S4.3 the hard-sample pool, as plain JSON-able data (it lives in the stage's ``run.stage_state``).

A member is a failed challenge: ``{"challenge": Challenge json, "example_id", "entered", "failed_checks",
"passes", "history"}``. After every check a member that passed gains a pass (a failure resets the count) and
leaves after ``pass_to_leave`` passes in a row; a newly failed challenge enters with its failing checks (the
oldest members leave first past ``max_size``). :func:`rates` gives pass rates overall, per kind and per check.
"""

from __future__ import annotations

from .checks import CHECKS


def member(challenge: dict, iteration: int, failed: list[str]) -> dict:
    return {"challenge": challenge, "example_id": f"{challenge['id']}/s0", "entered": iteration,
            "failed_checks": list(failed), "passes": 0, "history": [{"iteration": iteration, "failed": list(failed)}]}


def update(pool: list[dict], outcomes: dict[str, dict], new: list[dict], iteration: int, *, pass_to_leave: int,
           max_size: int) -> tuple[list[dict], list[str], list[str]]:
    """The pool after one iteration's checks. ``outcomes``: ``{challenge id: outcome}`` for the re-checked
    members; ``new``: outcomes of this iteration's new challenges. An outcome is ``{"challenge", "failed"}``
    (``failed``: the names of the failing checks). Returns ``(pool, entered ids, left ids)``."""
    out, left = [], []
    for m in pool:
        o = outcomes.get(m["challenge"]["id"])
        if o is None:  # not re-checked this time: unchanged
            out.append(m)
            continue
        m = {**m, "history": m["history"] + [{"iteration": iteration, "failed": list(o["failed"])}]}
        if o["failed"]:
            m.update(passes=0, failed_checks=list(o["failed"]))
        else:
            m["passes"] += 1
        if m["passes"] >= pass_to_leave:
            left.append(m["challenge"]["id"])
        else:
            out.append(m)
    members = {m["challenge"]["id"] for m in out}
    entered = []
    for o in new:
        cid = o["challenge"]["id"]
        if o["failed"] and cid not in members:
            out.append(member(o["challenge"], iteration, o["failed"]))
            members.add(cid)
            entered.append(cid)
    if len(out) > max_size:
        left += [m["challenge"]["id"] for m in out[:len(out) - max_size]]
        out = out[len(out) - max_size:]
    return out, entered, left


def rates(outcomes: list[dict]) -> dict:
    """Pass rates of ``outcomes`` (each ``{"challenge": {"kind"...}, "failed": [...]}``): ``all`` (every check
    passed), per ``check`` and per ``kind``, with the counts; None where there is nothing to count."""
    def rate(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    kinds: dict[str, list[bool]] = {}
    for o in outcomes:
        kinds.setdefault(o["challenge"]["kind"], []).append(not o["failed"])
    return {"n": len(outcomes), "all": rate([not o["failed"] for o in outcomes]),
            "check": {c: rate([c not in o["failed"] for o in outcomes]) for c in CHECKS},
            "kind": {k: rate(v) for k, v in sorted(kinds.items())}}


def weights(pool: list[dict], weight: float) -> dict[str, float]:
    return {m["example_id"]: weight for m in pool}
