"""A small Python client for the gateway (sync and async), for traffic generators and tests.

``GatewayClient(url).chat(messages, user_id="u1", session_id="s1")`` returns a :class:`ChatResult` with the
text, the arm and version that served it (from the gateway's ``X-Distillgate-*`` headers), the request id (the
row's ``request_id`` in the request log), and client-side TTFT and latency. ``stream=True`` reads server-sent
events and times the first content chunk. An HTTP error comes back as a result with ``status`` and ``error``
set (no exception), so a load generator can count it; a connection failure raises ``httpx.HTTPError``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class ChatResult:
    status: int
    text: str | None
    arm: str | None
    version: str | None
    request_id: str | None
    ttft_ms: float | None
    latency_ms: float
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def _body(messages, model, stream, max_tokens, params) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": model, "messages": list(messages), "stream": stream, **params}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _headers(user_id, session_id, token) -> dict:
    h = {"Content-Type": "application/json"}
    if user_id is not None:
        h["X-User-Id"] = str(user_id)
    if session_id is not None:
        h["X-Session-Id"] = str(session_id)
    if token:
        h["Authorization"] = f"Bearer {token}"
    return h


class _SSE:
    """Accumulates SSE lines: content pieces, usage, finish reason."""

    def __init__(self):
        self.text, self.usage, self.finish, self.first = [], {}, None, None

    def line(self, line: str, t: float) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            return
        obj = json.loads(data)
        self.usage = obj.get("usage") or self.usage
        for ch in obj.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content")
            if piece:
                self.text.append(piece)
                self.first = t if self.first is None else self.first
            self.finish = ch.get("finish_reason") or self.finish


def _result(r: httpx.Response, t0: float, text, first, usage, finish) -> ChatResult:
    now = time.perf_counter()
    err = None
    if r.status_code != 200:
        try:
            err = r.json().get("error", {}).get("message") or r.text
        except ValueError:
            err = r.text
    return ChatResult(status=r.status_code, text=text, arm=r.headers.get("x-distillgate-arm"),
                      version=r.headers.get("x-distillgate-version"), request_id=r.headers.get("x-request-id"),
                      ttft_ms=None if first is None else (first - t0) * 1000, latency_ms=(now - t0) * 1000,
                      usage=usage or {}, finish_reason=finish, error=err)


def _parse_full(r: httpx.Response):
    obj = r.json()
    ch = (obj.get("choices") or [{}])[0]
    return (ch.get("message") or {}).get("content"), obj.get("usage"), ch.get("finish_reason")


class GatewayClient:
    """Synchronous client; one persistent connection pool. Use as a context manager or call close()."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0, model: str = "distillgate"):
        self.model, self.token = model, token
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def chat(self, messages, *, user_id=None, session_id=None, model: str | None = None, stream: bool = False,
             max_tokens: int | None = None, **params) -> ChatResult:
        body = _body(messages, model or self.model, stream, max_tokens, params)
        headers = _headers(user_id, session_id, self.token)
        t0 = time.perf_counter()
        if not stream:
            r = self._http.post("/v1/chat/completions", json=body, headers=headers)
            text, usage, finish = _parse_full(r) if r.status_code == 200 else (None, None, None)
            first = time.perf_counter() if r.status_code == 200 else None
            return _result(r, t0, text, first, usage, finish)
        sse = _SSE()
        with self._http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code == 200:
                for line in r.iter_lines():
                    sse.line(line, time.perf_counter())
            else:
                r.read()
        return _result(r, t0, "".join(sse.text) if r.status_code == 200 else None, sse.first, sse.usage,
                       sse.finish)

    def health(self) -> dict:
        return self._http.get("/health").raise_for_status().json()

    def metrics(self) -> str:
        return self._http.get("/metrics").raise_for_status().text

    def swap(self, arm: str, **target) -> dict:
        """``swap("candidate", version="7")`` or ``swap("candidate", url=..., model=..., version=...)``."""
        headers = _headers(None, None, self.token)
        r = self._http.post("/admin/swap", json={"arm": arm, **target}, headers=headers, timeout=600)
        return r.raise_for_status().json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncGatewayClient:
    """Asynchronous twin of :class:`GatewayClient` (``await client.chat(...)``); ``max_connections`` bounds
    the pool (the concurrency a traffic generator can reach)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0, model: str = "distillgate",
                 max_connections: int = 256):
        self.model, self.token = model, token
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                       limits=httpx.Limits(max_connections=max_connections,
                                                           max_keepalive_connections=max_connections))

    async def chat(self, messages, *, user_id=None, session_id=None, model: str | None = None, stream: bool = False,
                   max_tokens: int | None = None, **params) -> ChatResult:
        body = _body(messages, model or self.model, stream, max_tokens, params)
        headers = _headers(user_id, session_id, self.token)
        t0 = time.perf_counter()
        if not stream:
            r = await self._http.post("/v1/chat/completions", json=body, headers=headers)
            text, usage, finish = _parse_full(r) if r.status_code == 200 else (None, None, None)
            first = time.perf_counter() if r.status_code == 200 else None
            return _result(r, t0, text, first, usage, finish)
        sse = _SSE()
        async with self._http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    sse.line(line, time.perf_counter())
            else:
                await r.aread()
        return _result(r, t0, "".join(sse.text) if r.status_code == 200 else None, sse.first, sse.usage,
                       sse.finish)

    async def health(self) -> dict:
        return (await self._http.get("/health")).raise_for_status().json()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
