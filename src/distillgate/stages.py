"""Stages are plug-ins of the loop (SPEC section 2): each contributes to some phases of its iterations.

A stage is any object with a ``name``, a SPEC ``code`` (S1..S4) and any of the phase hooks
``extract(ctx)``, ``map(ctx)``, ``validate(ctx)``, ``attribute(ctx)``, each taking the
:class:`~distillgate.loop.IterationContext`. The loop core calls the hooks of the iteration's stage in phase
order and does the shared work itself (gates in validate, findings in attribute, the strategy in compensate,
the versioned commit). A new stage registers here with :func:`register_stage`; the core is not edited.
This module imports nothing heavy so the config can validate stage names cheaply.
"""

from __future__ import annotations

from typing import Callable, Protocol

PHASES = ("extract", "map", "validate", "attribute", "compensate")


class Stage(Protocol):
    name: str
    code: str


STAGES: dict[str, Callable[[], Stage]] = {}


def register_stage(name: str, factory: Callable[[], Stage]) -> None:
    STAGES[name] = factory


class AnchorStage:
    """S1 knowledge anchoring (iteration 0): the teacher's baseline profile, once per teacher version, and the
    initial student measured against it."""

    name, code = "anchor", "S1"

    def validate(self, ctx) -> None:
        ctx.loop.anchor_profile(ctx)


class JointStage:
    """S2 multi-granularity joint distillation: new teacher answers each iteration (mixed by the recipe's
    domain shares and curriculum tier), then training through the recipe's loss channels."""

    name, code = "joint", "S2"

    def extract(self, ctx) -> None:
        ctx.loop.extract_iteration(ctx)

    def map(self, ctx) -> None:
        ctx.loop.train_iteration(ctx)


register_stage("anchor", AnchorStage)
register_stage("joint", JointStage)
