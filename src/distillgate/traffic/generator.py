"""The traffic simulator: simulated users in sessions over simulated days, answered by two arms.

:func:`simulate` draws ``sessions`` sessions; each has a user (of ``users``; the user's arm is sticky: a hash
of the experiment and the user id against ``split``, as a gateway assigns it), a start time uniform over
``days`` simulated days from ``start_ts``, a traffic type (weights ``types``) and a domain. Turn by turn the
user's message (the script's next turn after a good answer, the same request
again after a bad one) goes to the user's arm, the answer is graded (:mod:`~distillgate.traffic.grading`) and the
:class:`~distillgate.traffic.users.UserModel` decides what happens next; the simulated clock moves by the
answer's measured latency plus an exponential think time. Every session has its own seeded RNG, so the
window is reproducible for (options, answers). Events carry ``provenance: simulated``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import DOMAINS
from ..errors import reject_unknown
from .arms import Arm
from .events import TurnEvent
from .grading import grade
from .types import TYPES
from .users import UserModel

RETRY = "That is not what I asked. "
START_TS = 1767225600.0  # 2026-01-01T00:00:00Z: day 0 of the simulated clock


class TrafficOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sessions: int = Field(40, ge=2, description="sessions simulated per A/B window")
    users: int = Field(200, ge=2, description="distinct simulated users (arm assignment is sticky per user)")
    days: float = Field(30.0, gt=0, description="simulated days the sessions are spread over")
    split: float = Field(0.5, gt=0, lt=1, description="share of users assigned to the candidate arm")
    types: dict[str, float] = Field({t: 1.0 for t in TYPES}, description=f"traffic type weights, from {list(TYPES)}")
    domains: list[str] = Field(list(DOMAINS), min_length=1, description=f"business domains, from {list(DOMAINS)}")
    experiment: str = Field("ab", min_length=1, description="experiment name (salts the arm assignment)")
    seed: int = Field(0, description="seed of the sessions (users, types, domains, the users' coins)")
    user: UserModel = Field(default_factory=UserModel, description="the simulated users' behaviour")

    @field_validator("types")
    @classmethod
    def _types(cls, v):
        reject_unknown(v, TYPES, "traffic type")
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {v}")
        return v

    @field_validator("domains")
    @classmethod
    def _domains(cls, v):
        reject_unknown(v, DOMAINS, "domain")
        return v


def assign(user_id: str, experiment: str, split: float, arms=("control", "candidate")) -> str:
    """Sticky arm of a user: ``sha256(experiment:user)`` as a number in [0, 1) against ``split``."""
    h = int(hashlib.sha256(f"{experiment}:{user_id}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return arms[1] if h < split else arms[0]


def _sources(domains, seed: int) -> dict[str, list]:
    from ..data.prompts import builtin_prompts

    pool = builtin_prompts(6 * len(domains), domains, seed=seed)
    return {d: [p for p in pool if p.domain == d] for d in domains}


def simulate(arms: dict[str, Arm] | Arm, opts: TrafficOptions, *, judge: Arm | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[TurnEvent]:
    """One A/B window: ``arms`` maps ``control`` and ``candidate`` to their :class:`Arm` (users assigned here,
    sticky), or is one router arm (the gateway, :class:`~distillgate.traffic.arms.GatewayArm`) that assigns
    users itself and names the arm in each answer; ``judge`` (optional) answers requests without a reference so
    the S4 checks can compare against it."""
    router = None if isinstance(arms, dict) else arms
    if router is None and set(arms) != {"control", "candidate"}:
        raise ValueError(f"arms must be exactly control and candidate, got {sorted(arms)}")
    sources = _sources(opts.domains, opts.seed)
    names, weights = list(opts.types), list(opts.types.values())
    um = opts.user
    events: list[TurnEvent] = []
    for s in range(opts.sessions):
        rng = random.Random(f"distillgate-traffic-{opts.seed}-{s}")
        user_id = f"u{rng.randrange(opts.users):05d}"
        session_id = f"s{opts.seed}-{s:05d}"
        arm = assign(user_id, opts.experiment, opts.split) if router is None else None
        ttype = rng.choices(names, weights)[0]
        domain = rng.choice(opts.domains)
        script = TYPES[ttype](domain, rng, sources[domain])
        ts = START_TS + rng.uniform(0, opts.days * 86400.0)
        messages: list[dict] = []
        step, text, ref = 0, "", None
        for turn in range(1, um.max_turns + 1):
            if turn == 1 or events[-1].correct:  # the script's next turn (a follow-up after a good answer)
                step += 1
                text, ref = script.message(step), script.reference(step)
            else:  # a retry after a bad answer: the same request again, with the same reference
                text = RETRY + messages[-2]["content"].removeprefix(RETRY)
            messages.append({"role": "user", "content": text})
            ans = (router or arms[arm]).respond(messages, user_id, session_id)
            if router is not None:
                arm = ans.arm or arm or "unknown"  # the gateway's (sticky) arm; a switch shows in the KPIs' check
            ref_judge = judge.respond(messages, user_id, session_id).text if judge is not None and ref is None else ""
            g = grade(text, ans.text, ref, ref_judge)
            outcome, clicked = um.decide(g.correct, ans.latency_ms, ans.error is not None, script.time_constrained,
                                         turn, rng)
            review = um.review(g.correct, rng)
            events.append(TurnEvent(ts=ts, session_id=session_id, user_id=user_id, arm=arm, turn=turn,
                                    domain=domain, traffic_type=ttype, request=text, response=ans.text,
                                    latency_ms=ans.latency_ms, ttft_ms=ans.ttft_ms, outcome=outcome,
                                    provenance="simulated", modules=list(script.modules), correct=g.correct,
                                    clicked=clicked, review_pass=review))
            if outcome != "continue":
                break
            messages.append({"role": "assistant", "content": ans.text})
            ts += ans.latency_ms / 1000.0 + (rng.expovariate(1.0 / um.think_s) if um.think_s > 0 else 0.0)
        if progress is not None:
            progress(s + 1, opts.sessions)
    return events
