"""Model backends: OpenAI-compatible ``/v1/chat/completions`` endpoints the gateway proxies to.

Three kinds (config ``serving.backend``):

- ``transformers``: ``transformers serve <folder>`` (the Hugging Face server: FastAPI + uvicorn, generate()
  with a KV cache; streaming; runs offline on a local folder) started as a child process on a free loopback
  port, one per model version;
- ``vllm``: ``vllm serve <folder>`` the same way, on a GPU machine (needs the ``vllm`` package there);
- a URL: an endpoint someone else runs; distillgate neither starts nor stops it.

A :class:`Backend` counts its in-flight requests so a hot swap can wait for them before stopping it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError

KINDS = ("transformers", "vllm")


@dataclass(eq=False)
class Backend:
    """One upstream. ``model`` is the id sent upstream in the body's ``model``; ``version`` is what the log's
    ``model_version`` records (``v<id>`` of the run store, ``teacher``, or a name)."""

    url: str
    model: str
    version: str
    process: subprocess.Popen | None = None
    log_file: Path | None = None
    inflight: int = 0
    extra: dict = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child process (SIGTERM, then SIGKILL after ``timeout``); no-op for a URL backend."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(kind: str, model_dir: str | os.PathLike | None, port: int, device: str = "cpu",
            python: str | None = None) -> list[str]:
    """The command line that serves ``model_dir`` on ``127.0.0.1:port``. ``model_dir`` None (``transformers``
    only): no model on the command line, each request's ``model`` names the folder to load (unpinned).
    ``python``: the interpreter whose ``transformers`` serves (default: this one, the venv's)."""
    if kind == "transformers":
        # the `transformers` console script's entry point, run by that interpreter
        return [python or sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
                "serve", *([str(model_dir)] if model_dir is not None else []), "--host", "127.0.0.1",
                "--port", str(port), "--device", device, "--no-trust-remote-code", "--log-level", "warning"]
    if kind == "vllm":
        if model_dir is None:
            raise ConfigError("serving.backend", kind, "transformers to serve unpinned (no model folder)")
        exe = shutil.which("vllm")
        if exe is None:
            raise InputError("serving.backend vllm: the `vllm` command is not installed (pip install vllm on a "
                             "GPU machine), or use backend: transformers or a URL")
        return [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
                str(model_dir), "--disable-log-requests"]
    raise ConfigError("serving.backend", kind, f"one of {list(KINDS)} or an http(s):// URL")


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None, log_file: Path | None = None) -> None:
    """Poll ``url``/health until it answers 200; InputError (with the log's tail) if the process dies or
    ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise InputError(f"backend {url} exited with code {process.returncode} before it was healthy"
                             + _tail(log_file))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise InputError(f"backend {url} was not healthy within {timeout:.0f} s" + _tail(log_file))
        time.sleep(0.2)


def _tail(log_file: Path | None, n: int = 1500) -> str:
    if log_file is None or not log_file.is_file():
        return ""
    return "; its log ends: " + log_file.read_text(errors="replace")[-n:].strip()


def start(kind: str, model_dir: str | os.PathLike | None, version: str, log_dir: str | os.PathLike,
          device: str = "cpu", timeout: float = 180.0, threads: int | None = None,
          python: str | None = None) -> Backend:
    """Start a ``kind`` backend for ``model_dir`` on a free loopback port and wait until it is healthy.
    Its output goes to ``log_dir/backend-<version>-<port>.log``. ``model_dir`` None: unpinned (see
    :func:`command`), each request's ``model`` names the folder; ``python``: see :func:`command`."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise InputError(f"{model_dir}: not a model folder (no config.json)")
    port = free_port()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"backend-{version}-{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(command(kind, model_dir, port, device, python), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    b = Backend(url=f"http://127.0.0.1:{port}", model="" if model_dir is None else str(model_dir), version=version,
                process=proc, log_file=log_file)
    try:
        wait_healthy(b.url, timeout, proc, log_file)
    except BaseException:
        b.stop()
        raise
    return b


def url_backend(url: str, model: str, version: str) -> Backend:
    if not url.startswith(("http://", "https://")):
        raise ConfigError("serving.backend", url, "an http(s):// URL of an OpenAI-compatible server")
    return Backend(url=url.rstrip("/").removesuffix("/v1"), model=model, version=version)


def start_many(kind: str, folders: dict[str, str | os.PathLike], log_dir: str | os.PathLike, **kw) -> list[Backend]:
    """:func:`start` one backend per ``{version: folder}``, all at once (their start-ups overlap); if one
    fails, the others are stopped and the error is raised."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(folders)) as pool:
        futures = [pool.submit(start, kind, folder, version, log_dir, **kw) for version, folder in folders.items()]
    out, error = [], None
    for f in futures:
        try:
            out.append(f.result())
        except BaseException as e:  # noqa: BLE001 - re-raised below after the others are stopped
            error = error or e
    if error is not None:
        for b in out:
            b.stop()
        raise error
    return out
