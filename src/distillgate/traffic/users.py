"""The simulated user: what a user does after each answer, from how good it was and how long it took.

After every turn the user takes one outcome (:data:`~distillgate.traffic.events.OUTCOMES`), in this order:

1. **too slow**: the answer took longer than the budget (``latency_budget_ms``; ``tight_budget_ms`` for
   time-constrained requests): abandon with probability ``abandon_if_slow``;
2. **good answer** (graded correct, :mod:`~distillgate.traffic.grading`): another turn with probability
   ``continue_if_good`` (a follow-up: engagement), else ``resolved``;
3. **bad answer**: ``escalate`` to a human agent with probability ``escalate_if_bad``, ``abandon`` with
   ``abandon_if_bad``, else rephrase and try again (another turn);
4. a failed call (the arm returned an error) ends the session with ``error``;

and a turn reaching ``max_turns`` that would continue is ``resolved``. Independently the user clicks a link or
suggested action with probability ``click_if_good`` / ``click_if_bad``, and a share ``review_rate`` of turns is
sampled for human review, where the (simulated) reviewer agrees with the grade except with probability
``review_noise``. Every probability is drawn from the session's own seeded RNG, so two arms facing the same user
draw the same coins: a difference between arms comes from their answers only.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field, model_validator


class UserModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    continue_if_good: float = Field(0.5, ge=0, le=1, description="chance of a follow-up turn after a good answer")
    escalate_if_bad: float = Field(0.35, ge=0, le=1, description="chance of asking for a human after a bad answer")
    abandon_if_bad: float = Field(0.25, ge=0, le=1, description="chance of leaving after a bad answer (the rest "
                                                                  "rephrase and retry)")
    abandon_if_slow: float = Field(0.5, ge=0, le=1, description="chance of leaving when an answer is over budget")
    latency_budget_ms: float = Field(20000.0, gt=0, description="latency a user waits for without leaving")
    tight_budget_ms: float = Field(8000.0, gt=0, description="latency budget of time-constrained requests")
    click_if_good: float = Field(0.4, ge=0, le=1, description="chance of a click after a good answer")
    click_if_bad: float = Field(0.05, ge=0, le=1, description="chance of a click after a bad answer")
    max_turns: int = Field(5, ge=1, description="most turns in a session")
    review_rate: float = Field(0.25, ge=0, le=1, description="share of turns sampled for human review")
    review_noise: float = Field(0.05, ge=0, le=0.5, description="chance the reviewer disagrees with the grade")
    think_s: float = Field(20.0, ge=0, description="mean seconds a user takes before the next turn (exponential)")

    @model_validator(mode="after")
    def _sum(self):
        if self.escalate_if_bad + self.abandon_if_bad > 1:
            raise ValueError(f"escalate_if_bad + abandon_if_bad = {self.escalate_if_bad + self.abandon_if_bad} "
                             f"must be <= 1 (the rest is the chance to retry)")
        return self

    def decide(self, correct: bool, latency_ms: float, error: bool, time_constrained: bool, turn: int,
               rng: random.Random) -> tuple[str, bool]:
        """``(outcome, clicked)`` after one turn. Coins are drawn in a fixed order whatever the branch, so the
        same session RNG gives both arms the same draws."""
        u_slow, u_next, u_click = rng.random(), rng.random(), rng.random()
        if error:
            return "error", False
        budget = self.tight_budget_ms if time_constrained else self.latency_budget_ms
        clicked = u_click < (self.click_if_good if correct else self.click_if_bad)
        if latency_ms > budget and u_slow < self.abandon_if_slow:
            return "abandon", clicked
        if correct:
            out = "continue" if u_next < self.continue_if_good else "resolved"
        elif u_next < self.escalate_if_bad:
            out = "escalate"
        elif u_next < self.escalate_if_bad + self.abandon_if_bad:
            out = "abandon"
        else:
            out = "continue"
        if out == "continue" and turn >= self.max_turns:
            out = "resolved" if correct else "abandon"
        return out, clicked

    def review(self, correct: bool, rng: random.Random) -> bool | None:
        """The human reviewer's verdict when this turn is sampled (None: not sampled)."""
        u_pick, u_noise = rng.random(), rng.random()
        if u_pick >= self.review_rate:
            return None
        return correct if u_noise >= self.review_noise else not correct
