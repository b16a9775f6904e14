"""The clock the operations jobs run on: wall time in production, the traffic simulator's clock in tests.

Every ops job (the daily drift job, the dimension watch that raises alerts after two hours under threshold,
the seven-day quiet window of D3) asks a :class:`Clock` for ``now()`` in unix seconds, the same unit as the
event log's ``ts`` (:mod:`distillgate.traffic.events`). :class:`SimClock` starts at the simulator's day 0
(:data:`distillgate.traffic.generator.START_TS`) unless told otherwise and only moves when advanced, so a test
can walk a week in milliseconds and an event log written by the simulator lines up with it.
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

from ..errors import ConfigError

DAY = 86400.0
HOUR = 3600.0


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    """Unix time of this machine."""

    def now(self) -> float:
        return time.time()


class SimClock:
    """A simulated clock: ``now()`` is where it was set; :meth:`advance` moves it forward, never back."""

    def __init__(self, start: float | None = None):
        if start is None:  # imported here: the simulator imports the config, which imports the ops options
            from ..traffic.generator import START_TS as start
        self._t = _finite(start, "SimClock.start")

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> float:
        s = _finite(seconds, "SimClock.advance(seconds)")
        if s < 0:
            raise ConfigError("SimClock.advance(seconds)", seconds, "a non-negative number (time moves forward)")
        self._t += s
        return self._t

    def set(self, t: float) -> float:
        t = _finite(t, "SimClock.set(t)")
        if t < self._t:
            raise ConfigError("SimClock.set(t)", t, f"a time at or after the clock's {self._t}")
        self._t = t
        return t


def day_index(ts: float, origin: float) -> int:
    """Whole days from ``origin`` (the release) to ``ts``: day 0 is the release day."""
    return int(math.floor((ts - origin) / DAY))


def _finite(x, field: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(field, x, "a finite number of seconds")
    return float(x)
