"""A real ``transformers serve`` for tests: one child process on a free loopback port, unpinned (no model on
its command line: each request's ``model`` names the folder it loads), so several tiny models share one
server. Started by :func:`distillgate.serve.backends.start`, as ``serving.backend: transformers`` is, not
through transformers' in-process ``Serve`` class, whose constructor changed between releases (5.25 dropped
``non_blocking``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def transformers_serve(log_dir: str | os.PathLike | None = None, timeout: float = 120.0,
                       threads: int | None = None) -> Iterator[str]:
    """Yield the base URL of an unpinned ``transformers serve`` child process; stopped on exit. Its output goes
    to ``log_dir/backend-unpinned-<port>.log`` (a temporary folder when None), and the log's tail is in the
    error if it does not come up within ``timeout`` s."""
    from ..serve.backends import start

    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dg-serve-"))
        b = start("transformers", None, "unpinned", log_dir, timeout=timeout, threads=threads)
        try:
            yield b.url
        finally:
            b.stop()
