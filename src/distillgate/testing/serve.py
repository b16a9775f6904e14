"""A real ``transformers serve`` for tests: one child process on a free loopback port, unpinned (no model on
its command line: each request's ``model`` names the folder it loads), so several tiny models share one
server. Started through the same command line as ``serving.backend: transformers`` (``serve.backends``), not
through transformers' in-process ``Serve`` class, whose constructor changed between releases (5.25 dropped
``non_blocking``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def transformers_serve(log_dir: str | os.PathLike | None = None, timeout: float = 120.0,
                       threads: int | None = None) -> Iterator[str]:
    """Yield the base URL of an unpinned ``transformers serve`` child process; stopped on exit. Its output goes
    to ``log_dir/transformers-serve-<port>.log`` (a temporary folder when None), and the log's tail is in the
    error if it does not come up within ``timeout`` s."""
    from ..serve.backends import Backend, command, free_port, wait_healthy

    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dg-serve-"))
        port = free_port()
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_file = Path(log_dir) / f"transformers-serve-{port}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(command("transformers", None, port), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        b = Backend(url=f"http://127.0.0.1:{port}", model="", version="unpinned", process=proc, log_file=log_file)
        try:
            wait_healthy(b.url, timeout, proc, log_file)
            yield b.url
        finally:
            b.stop()
