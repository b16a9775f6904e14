"""G-O1 backend circuit breaker: the classic closed / open / half-open machine from ``pybreaker`` (maintained,
thread-safe), one per backend, driven from the gateway's asyncio handler.

A request through :meth:`BackendBreaker.guard` counts as a failure when the backend is unreachable, times out
(``timeout_s``, tighter than the gateway's upstream timeout) or answers HTTP 5xx; after ``fail_max``
consecutive failures the breaker opens and requests go to the fallback (the previous stable version's backend)
without touching the failing one; after ``reset_timeout_s`` the next request is let through (half-open): its
success closes the breaker, its failure opens it again.

pybreaker's ``call_async`` needs tornado; its ``calling()`` context manager runs the state machine around a
block, which on one event loop thread may span an ``await`` (the state is read and updated under its lock
before and after the block, never across it). In half-open, pybreaker lets every request through until
the first one returns (not only one trial): a few in-flight requests may hit a still-failing backend.
"""

from __future__ import annotations

import asyncio
import contextlib

import pybreaker


class BackendFailure(Exception):
    """A backend answer the breaker counts as a failure (5xx, unreachable, timeout)."""


class BackendBreaker:
    def __init__(self, name: str, fail_max: int = 5, reset_timeout_s: float = 10.0, timeout_s: float = 30.0):
        if fail_max < 1 or reset_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError(f"breaker {name}: fail_max >= 1, reset_timeout_s > 0 and timeout_s > 0 needed, got "
                             f"{fail_max}, {reset_timeout_s}, {timeout_s}")
        self.name, self.timeout_s = name, timeout_s
        # a cancelled request (the client went away) says nothing about the backend: not a failure
        self.cb = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_timeout_s, name=name,
                                           throw_new_error_on_trip=False, exclude=[asyncio.CancelledError])
        self.transitions: list[tuple[str, str]] = []
        breaker = self

        class _Listener(pybreaker.CircuitBreakerListener):
            def state_change(self, cb, old_state, new_state):
                breaker.transitions.append((old_state.name if old_state else "", new_state.name))

        self.cb.add_listener(_Listener())

    @property
    def state(self) -> str:
        return self.cb.current_state

    @contextlib.contextmanager
    def guard(self):
        """``with breaker.guard(): ...`` raises :class:`pybreaker.CircuitBreakerError` at once while open; a
        :class:`BackendFailure` (or any exception) raised inside counts as a failure and propagates."""
        with self.cb.calling():
            yield

    def to_json(self) -> dict:
        return {"state": self.state, "fail_counter": self.cb.fail_counter, "fail_max": self.cb.fail_max,
                "reset_timeout_s": self.cb.reset_timeout, "timeout_s": self.timeout_s}
