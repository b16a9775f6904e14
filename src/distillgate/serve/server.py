"""Run the gateway app with uvicorn: in the foreground (``distillgate serve``) or in a background thread
(tests, the G-P2 provider, bench/serve.py). Loopback only unless ``allow_remote`` and a token are given."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time

import uvicorn

from ..errors import ConfigError
from .backends import free_port


def check_host(host: str, allow_remote: bool, token: str | None) -> None:
    """Refuse a non-loopback bind unless explicitly allowed and protected by a token."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not (allow_remote and token):
        raise ConfigError("--host", host, "a loopback address (127.0.0.1, ::1); binding beyond loopback needs "
                                          "--allow-remote and --token")


def _config(app, host: str, port: int) -> uvicorn.Config:
    # uvloop + httptools when installed (the `serve` extra): ~2x less per-request time than asyncio + h11
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                          timeout_keep_alive=60, backlog=2048)


def serve_forever(app, host: str, port: int) -> None:
    uvicorn.Server(_config(app, host, port)).run()


class ThreadedServer:
    """``with ThreadedServer(app) as s: s.url`` serves ``app`` on 127.0.0.1 (an ephemeral port by default) in a
    daemon thread with its own event loop; leaving the block stops it (graceful: in-flight requests finish)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 30.0):
        check_host(host, False, None)
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(_config(app, host, self.port))
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._run, name="distillgate-gateway", daemon=True)
        self._start_timeout = start_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._server.serve())

    def start(self) -> "ThreadedServer":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway on {self.url} did not start within {self._start_timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
