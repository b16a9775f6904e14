"""SIGTERM as a clean stop: the handler raises :class:`Terminated` where the main thread is, so the run unwinds
like Ctrl-C (``finally`` blocks run, the store transaction rolls back, the run records ``interrupted``).

Python ignores an exception raised inside a finalizer (``__del__``): a signal that lands while one runs (a
library's object being collected) would be lost and the run would go on to the end. So the handler also
records the signal, and the loop and the trainer call :func:`raise_if_terminated` at every phase and every
optimizer step: a swallowed SIGTERM stops the run at the next of those points instead of never."""

from __future__ import annotations

_pending = False


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (see the module docstring)."""


def handle_sigterm(signum, frame) -> None:
    global _pending
    _pending = True
    raise Terminated()


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` when a SIGTERM arrived and its exception was swallowed (by a finalizer)."""
    if _pending:
        raise Terminated()


def pending() -> bool:
    return _pending


def reset() -> None:
    global _pending
    _pending = False
