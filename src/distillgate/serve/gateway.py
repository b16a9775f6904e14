"""The gateway: an OpenAI-compatible front on loopback that assigns each user a sticky arm, proxies to that
arm's backend (streaming or not), logs the outcome (:mod:`.log`), optionally shadow-calls the production model,
exports Prometheus metrics, and swaps an arm's backend without dropping a request.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``,
``POST /admin/swap`` (token-protected when a token is set).

Overhead is kept to the proxying itself: one persistent aiohttp connection pool, the request body passed on
after one JSON parse, the response bytes passed through untouched; parsing the response for the log, the
metrics and the shadow call all run after the last byte has gone to the client (a background task).

G-O1 (:mod:`distillgate.ops`), both optional: a ``detector`` runs on each request before routing (rules
first, MiniLM similarity in a one-process pool only when the rules found nothing, the text has a cue and
fewer than ``semantic_queue_max`` requests already wait for it: the encoder must not set the tail latency) and
answers a detected attack with the degraded safe response (``X-Distillgate-Degraded: <kind>``; the backend is
never called); ``breaker`` options give each backend a closed / open / half-open circuit breaker (failures:
unreachable, timeout, HTTP 5xx) and a request the breaker refuses or whose call fails goes to the ``fallback``
backend (the previous stable version; ``X-Distillgate-Fallback``), else a 503 ``circuit_open``.

Model names a client may send: the gateway's ``public_model`` (default ``distillgate``; also an empty or
missing ``model``) goes through the A/B assignment; an arm's name forces that arm (for direct comparisons);
anything else is a 404 ``model_not_found``. User and session come from the ``X-User-Id`` / ``X-Session-Id``
headers (else the body's ``user``); a request with neither is assigned by its request id (not sticky).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import logging
import secrets
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
from fastapi import FastAPI, Request
from pybreaker import CircuitBreakerError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.background import BackgroundTask

from ..errors import DistillgateError
from ..ops import compliance as safe
from ..ops.breaker import BackendBreaker, BackendFailure
from .assign import Assigner
from .backends import Backend
from ..ops.detectors import Detection, child_init, child_similar, user_text
from .log import RequestLog, RequestRecord

log = logging.getLogger(__name__)
ROUTE = "/v1/chat/completions"
ROLES = ("system", "user", "assistant", "tool", "developer")
_JSON = {"Content-Type": "application/json"}


@dataclass
class GatewayState:
    """What the app serves: ``arms`` (name -> Backend), the A/B ``assigner`` over them, the request log, an
    optional ``shadow`` backend (the production model) called for ``shadow_fraction`` of the requests served
    by another version, limits, and a ``launcher`` that starts a backend for a version (for ``/admin/swap``)."""

    arms: dict[str, Backend]
    assigner: Assigner
    request_log: RequestLog | None = None
    shadow: Backend | None = None
    shadow_fraction: float = 1.0
    public_model: str = "distillgate"
    token: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    upstream_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    launcher: Callable[[str], Awaitable[Backend]] | None = None
    stop_replaced: bool = True
    pending: set = field(default_factory=set)  # background tasks (shadow calls + log writes) still running
    detector: object | None = None  # distillgate.ops.detectors.Detector: G-O1 pre-request stage
    breaker: dict | None = None  # BackendBreaker options (fail_max, reset_timeout_s, timeout_s); None: no breaker
    fallback: Backend | None = None  # the previous stable version: serves while a backend's breaker is open
    semantic_queue_max: int = 2  # MiniLM costs ~100 ms a request on a loaded CPU: at most this many queue for it
    breakers: dict = field(default_factory=dict)  # Backend -> BackendBreaker (a swapped-in backend starts closed)

    def breaker_for(self, backend: Backend) -> BackendBreaker | None:
        if self.breaker is None:
            return None
        if backend not in self.breakers:
            self.breakers[backend] = BackendBreaker(backend.version, **self.breaker)
        return self.breakers[backend]


class Refused(Exception):
    """A 4xx before any arm is chosen: nothing is logged (the refusal counter counts it)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validate(payload, state: GatewayState) -> None:
    if not isinstance(payload, dict):
        raise Refused(400, "the body must be a JSON object", "invalid_request")
    msgs = payload.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Refused(400, "'messages' must be a non-empty list of {role, content}", "invalid_messages", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), (str, list)):
            raise Refused(400, f"messages[{i}]: needs 'role' in {list(ROLES)} and a string 'content'",
                          "invalid_messages", f"messages[{i}]")
    mt = payload.get("max_tokens", payload.get("max_completion_tokens"))
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= state.max_tokens_limit):
        raise Refused(400, f"'max_tokens' must be an integer in [1, {state.max_tokens_limit}], got {mt!r}",
                      "invalid_max_tokens", "max_tokens")
    if not isinstance(payload.get("stream", False), bool):
        raise Refused(400, "'stream' must be true or false", "invalid_stream", "stream")


class _Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        lat_buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("distillgate_ttft_seconds", "time to first content token, per arm", ["arm"],
                              buckets=lat_buckets, registry=r)
        self.latency = Histogram("distillgate_request_latency_seconds", "request latency, per arm", ["arm"],
                                 buckets=lat_buckets, registry=r)
        self.tps = Histogram("distillgate_tokens_per_second", "completion tokens per second of decoding, per arm",
                             ["arm"], buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000), registry=r)
        self.requests = Counter("distillgate_requests", "requests answered, per arm and HTTP status",
                                ["arm", "status"], registry=r)
        self.errors = Counter("distillgate_errors", "failed requests, per arm and kind", ["arm", "kind"], registry=r)
        self.refused = Counter("distillgate_refused", "requests refused before routing (4xx), per reason",
                               ["reason"], registry=r)
        self.inflight = Gauge("distillgate_inflight", "requests in flight, per arm", ["arm"], registry=r)
        self.degraded = Counter("distillgate_degraded", "requests answered with the degraded safe response "
                                "(G-O1), per attack kind and detector stage", ["kind", "stage"], registry=r)
        self.detect = Histogram("distillgate_detector_seconds", "G-O1 detector time per request",
                                buckets=(.0001, .0005, .001, .005, .01, .025, .05, .1, .25, .5), registry=r)
        self.semantic_skipped = Counter("distillgate_detector_semantic_skipped", "requests whose MiniLM stage was "
                                        "skipped because semantic_queue_max requests already waited for it",
                                        registry=r)
        self.fallbacks = Counter("distillgate_fallbacks", "requests served by the fallback backend, per arm and "
                                 "reason", ["arm", "reason"], registry=r)
        self.shadow_latency = Histogram("distillgate_shadow_latency_seconds", "shadow call latency",
                                        buckets=lat_buckets, registry=r)


def _sse_text(chunks: list[tuple[float, bytes]]) -> tuple[str, float | None, dict | None, str | None, int]:
    """(text, time of the first content chunk, usage, finish_reason, content chunks) from an SSE stream."""
    text, first, usage, finish, n = [], None, None, None, 0
    buf = b""
    for t, chunk in chunks:
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                usage = obj.get("usage") or usage
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        text.append(piece)
                        n += 1
                        first = t if first is None else first
                    finish = ch.get("finish_reason") or finish
    return "".join(text), first, usage, finish, n


def build_app(state: GatewayState) -> "HotPath":
    """The ASGI app over ``state`` (run it with uvicorn on 127.0.0.1)."""
    metrics = _Metrics()
    http: dict[str, aiohttp.ClientSession] = {}
    rng = random.Random(secrets.randbits(64))  # shadow sampling; not security-relevant
    # the MiniLM stage: one child process (the encoder off the GIL of the event loop), one request at a time
    pool: dict = {}
    queued = [0]  # requests waiting for / in the MiniLM stage

    async def lifespan(app):
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=None)
        http["s"] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
            total=state.upstream_timeout_s, sock_connect=10))
        det = state.detector
        if det is not None and det.semantic != "off":
            pool["p"] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=child_init, initargs=(det.config,))
            await asyncio.get_running_loop().run_in_executor(pool["p"], child_similar, "warm up the encoder")
        yield
        if state.pending:
            await asyncio.wait(list(state.pending), timeout=30)
        await http["s"].close()
        if "p" in pool:
            pool["p"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="distillgate gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = state
    app.state.metrics = metrics

    def _authorised(request: Request) -> bool:
        return state.token is None or secrets.compare_digest(request.headers.get("authorization", ""),
                                                             f"Bearer {state.token}")

    def _refuse(e: Refused) -> JSONResponse:
        metrics.refused.labels(e.code).inc()
        return JSONResponse(_error_body(e.message, e.code, e.param), status_code=e.status)

    async def _read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > state.max_body_bytes:
            raise Refused(413, f"body of {cl} bytes is over the limit of {state.max_body_bytes}", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > state.max_body_bytes:
                raise Refused(413, f"body over the limit of {state.max_body_bytes} bytes", "body_too_large")
        return bytes(body)

    def _route(payload: dict, request: Request, rid: str) -> tuple[str, str | None, str | None]:
        model = payload.get("model") or state.public_model
        user = request.headers.get("x-user-id") or (payload.get("user") if isinstance(payload.get("user"), str)
                                                    else None)
        session = request.headers.get("x-session-id")
        if model == state.public_model:
            arm = state.assigner.assign(user or session or rid)
        elif model in state.arms:
            arm = model
        else:
            raise Refused(404, f"model {model!r} not served here; use {state.public_model!r} (A/B) or an arm: "
                               f"{sorted(state.arms)}", "model_not_found", "model")
        return arm, user, session

    def _spawn(coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        state.pending.add(task)
        task.add_done_callback(state.pending.discard)

    async def _later(*args) -> None:
        """Background task of a response: hand the bookkeeping to its own task, so the connection is free
        for the client's next request at once."""
        _spawn(_finish(*args))

    async def _finish(rec: RequestRecord, t0: float, body: bytes | None, chunks: list | None, payload: dict,
                      backend: Backend, arm: str) -> None:
        """After the last byte: parse the response, observe metrics, shadow-call, log (one whole row)."""
        backend.inflight -= 1
        metrics.inflight.labels(arm).dec()
        if rec.status == 200 and rec.error is None:
            try:
                if chunks is not None:
                    text, first, usage, finish, n = _sse_text(chunks)
                    rec.ttft_ms = (first - t0) * 1000 if first is not None else rec.latency_ms
                    rec.completion_tokens = (usage or {}).get("completion_tokens", n)
                else:
                    obj = json.loads(body)
                    ch = (obj.get("choices") or [{}])[0]
                    text, finish, usage = (ch.get("message") or {}).get("content"), ch.get("finish_reason"), \
                        obj.get("usage")
                    rec.ttft_ms = rec.latency_ms
                    rec.completion_tokens = (usage or {}).get("completion_tokens")
                rec.response, rec.finish_reason = text, finish
                rec.prompt_tokens = (usage or {}).get("prompt_tokens")
            except (ValueError, AttributeError, TypeError, IndexError) as e:
                rec.error = f"unreadable backend response: {type(e).__name__}: {e}"
        metrics.requests.labels(arm, str(rec.status)).inc()
        if rec.error is not None:
            metrics.errors.labels(arm, "upstream" if rec.status >= 500 else "client").inc()
        else:
            metrics.latency.labels(arm).observe(rec.latency_ms / 1000)
            if rec.ttft_ms is not None:
                metrics.ttft.labels(arm).observe(rec.ttft_ms / 1000)
            decode_s = (rec.latency_ms - (rec.ttft_ms or 0)) / 1000
            if rec.completion_tokens and decode_s > 0:
                metrics.tps.labels(arm).observe(rec.completion_tokens / decode_s)
        shadow = state.shadow
        if (shadow is not None and rec.error is None and shadow.version != backend.version
                and (state.shadow_fraction >= 1 or rng.random() < state.shadow_fraction)):
            await _shadow_then_log(rec, payload, shadow)
        elif state.request_log is not None:
            state.request_log.add(rec)

    async def _shadow_then_log(rec: RequestRecord, payload: dict, shadow: Backend) -> None:
        rec.shadow_model_version = shadow.version
        t = time.perf_counter()
        try:
            up = dict(payload, model=shadow.model, stream=False)
            up.pop("stream_options", None)
            async with http["s"].post(shadow.url + ROUTE, data=json.dumps(up), headers=_JSON) as r:
                raw = await r.read()
                if r.status != 200:
                    rec.shadow_error = f"HTTP {r.status}: {raw[:200].decode(errors='replace')}"
                else:
                    rec.shadow_response = json.loads(raw)["choices"][0]["message"]["content"]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as e:
            rec.shadow_error = f"{type(e).__name__}: {e}"
        rec.shadow_latency_ms = (time.perf_counter() - t) * 1000
        metrics.shadow_latency.observe(rec.shadow_latency_ms / 1000)
        if state.request_log is not None:
            state.request_log.add(rec)

    async def _detect(payload: dict):
        """Rules inline (microseconds); the MiniLM stage off the event loop, only when it is wanted."""
        det = state.detector
        text = user_text(payload)
        t = time.perf_counter()
        d = det.rules(text) if det.use_rules else Detection(False)
        if not d.triggered and det.wants_semantic(text):
            if queued[0] >= state.semantic_queue_max:  # a bounded wait: past it the rules' verdict stands
                metrics.semantic_skipped.inc()
            else:
                queued[0] += 1
                try:
                    d = await asyncio.get_running_loop().run_in_executor(pool["p"], child_similar, text)
                finally:
                    queued[0] -= 1
        d.ms = (time.perf_counter() - t) * 1000
        metrics.detect.observe(d.ms / 1000)
        return d

    def _degraded(d, rec: RequestRecord, rid: str, stream: bool, t0: float):
        metrics.degraded.labels(d.kind, d.stage).inc()
        rec.arm, rec.model_version, rec.status, rec.finish_reason = None, safe.DEGRADED_MODEL, 200, "stop"
        rec.response = safe.safe_text(d.kind)
        rec.latency_ms = rec.ttft_ms = (time.perf_counter() - t0) * 1000
        metrics.requests.labels("degraded", "200").inc()
        if state.request_log is not None:
            state.request_log.add(rec)
        headers = {"X-Request-Id": rid, "X-Distillgate-Degraded": d.kind,
                   "X-Distillgate-Detector": f"{d.stage}:{d.rule}"[:200]}
        if stream:
            return Response(safe.degraded_sse(d.kind, rid), media_type="text/event-stream", headers=headers)
        return Response(json.dumps(safe.degraded_completion(d.kind, rid)), media_type="application/json",
                        headers=headers)

    async def _post(backend: Backend, payload: dict):
        """POST to ``backend`` through its breaker: returns the response (status < 500, headers read); raises
        CircuitBreakerError (open), BackendFailure (5xx: the body is read and kept in ``.body``) or the
        aiohttp / timeout error, each counted by the breaker."""
        data = json.dumps(dict(payload, model=backend.model))
        brk = state.breaker_for(backend)
        if brk is None:
            return await http["s"].post(backend.url + ROUTE, data=data, headers=_JSON)
        with brk.guard():
            resp = await asyncio.wait_for(http["s"].post(backend.url + ROUTE, data=data, headers=_JSON),
                                          brk.timeout_s)
            if resp.status >= 500:
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                e = BackendFailure(f"backend HTTP {resp.status}")
                e.status, e.body = resp.status, body
                raise e
            return resp

    ids = itertools.count()
    id_prefix = secrets.token_hex(6)

    async def chat_completions(request: Request):
        t0, ts = time.perf_counter(), time.time()
        if not _authorised(request):
            return _refuse(Refused(401, "missing or wrong bearer token", "unauthorised"))
        rid = f"chatcmpl-{id_prefix}{next(ids):012x}"  # unique per gateway start; no syscall per request
        try:
            raw = await _read_body(request)
            try:
                payload = json.loads(raw)
            except ValueError as e:
                raise Refused(400, f"body is not valid JSON: {e}", "invalid_json") from None
            _validate(payload, state)
            arm, user, session = _route(payload, request, rid)
        except Refused as e:
            return _refuse(e)
        stream = bool(payload.get("stream", False))
        if state.detector is not None:
            d = await _detect(payload)
            if d.triggered:
                user = request.headers.get("x-user-id")
                return _degraded(d, RequestRecord(request_id=rid, ts=ts, route=ROUTE, status=0, user_id=user,
                                                  session_id=request.headers.get("x-session-id"),
                                                  experiment=state.assigner.experiment, stream=stream,
                                                  request=payload), rid, stream, t0)
        backend = state.arms[arm]  # this request keeps this backend even if the arm is swapped meanwhile
        backend.inflight += 1
        metrics.inflight.labels(arm).inc()
        rec = RequestRecord(request_id=rid, ts=ts, route=ROUTE, status=0, user_id=user, session_id=session,
                            experiment=state.assigner.experiment, arm=arm, model_version=backend.version,
                            stream=stream, request=payload)
        headers = {"X-Request-Id": rid, "X-Distillgate-Arm": arm, "X-Distillgate-Version": backend.version}
        failed_body = None
        try:
            resp = await _post(backend, payload)
        except (CircuitBreakerError, BackendFailure, aiohttp.ClientError, asyncio.TimeoutError) as e:
            reason = ("circuit_open" if isinstance(e, CircuitBreakerError) else
                      "http_5xx" if isinstance(e, BackendFailure) else "timeout" if isinstance(
                          e, asyncio.TimeoutError) else "unreachable")
            fb = state.fallback
            if fb is not None and fb is not backend:
                metrics.fallbacks.labels(arm, reason).inc()
                backend.inflight -= 1
                fb.inflight += 1
                backend, rec.model_version = fb, fb.version
                headers.update({"X-Distillgate-Version": fb.version, "X-Distillgate-Fallback": reason})
                try:
                    resp = await http["s"].post(fb.url + ROUTE, data=json.dumps(dict(payload, model=fb.model)),
                                                headers=_JSON)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e2:
                    e = e2
                    resp = None
            else:
                resp = None
            if resp is None and isinstance(e, BackendFailure):
                resp, failed_body = None, (e.status, e.body)
            elif resp is None:
                rec.status = 503 if isinstance(e, CircuitBreakerError) else 502
                rec.error = (f"circuit open for {backend.version} and no fallback" if rec.status == 503 else
                             f"backend unreachable: {type(e).__name__}: {e}")
                rec.latency_ms = (time.perf_counter() - t0) * 1000
                _spawn(_finish(rec, t0, None, None, payload, backend, arm))
                code = "circuit_open" if rec.status == 503 else "backend_unreachable"
                return JSONResponse(_error_body(rec.error, code, kind="server_error"), rec.status, headers=headers)
        if failed_body is not None:
            rec.status, body = failed_body
            rec.error = f"backend HTTP {rec.status}: {body[:300].decode(errors='replace')}"
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            return Response(body, status_code=rec.status, media_type="application/json", headers=headers,
                            background=BackgroundTask(_later, rec, t0, body, None, payload, backend, arm))
        if not stream or resp.status != 200:
            try:
                body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                body, rec.error = b"", f"backend failed mid-response: {type(e).__name__}: {e}"
                resp.status = 502
            finally:
                resp.release()
            rec.status = resp.status
            if resp.status != 200 and rec.error is None:
                rec.error = f"backend HTTP {resp.status}: {body[:300].decode(errors='replace')}"
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            return Response(body, status_code=resp.status, media_type="application/json", headers=headers,
                            background=BackgroundTask(_later, rec, t0, body, None, payload, backend, arm))

        chunks: list[tuple[float, bytes]] = []

        async def relay():
            rec.status = 200
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
                    chunks.append((time.perf_counter(), chunk))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                rec.status, rec.error = 502, f"backend failed mid-stream: {type(e).__name__}: {e}"
            except BaseException:  # the client went away (cancelled): record it, then let it unwind
                rec.status, rec.error = 499, "client closed the connection mid-stream"
                rec.latency_ms = (time.perf_counter() - t0) * 1000
                resp.release()
                _spawn(_finish(rec, t0, None, chunks, payload, backend, arm))
                raise
            finally:
                resp.release()
            rec.latency_ms = (time.perf_counter() - t0) * 1000

        async def after_stream():
            if rec.status != 499:
                _spawn(_finish(rec, t0, None, chunks, payload, backend, arm))

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(after_stream))

    # Listed for completeness (405 on GET, OpenAPI-free); POSTs never reach it: HotPath below takes them first.
    app.add_route(ROUTE, chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models():
        names = [state.public_model, *state.arms]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "distillgate"} for n in names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "experiment": state.assigner.experiment, "weights": state.assigner.weights,
                "arms": {a: {"version": b.version, "inflight": b.inflight} for a, b in state.arms.items()},
                "shadow": state.shadow.version if state.shadow else None,
                "fallback": state.fallback.version if state.fallback else None,
                "breakers": {b.version: brk.to_json() for b, brk in state.breakers.items()},
                "detector": None if state.detector is None else state.detector.semantic}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/swap")
    async def swap(request: Request):
        """Body ``{"arm": A, "version": V}`` (started by the launcher) or ``{"arm": A, "url": U, "model": M,
        "version": V}`` (already running). Answers once the new backend took the arm and the old one drained."""
        if not _authorised(request):
            return _refuse(Refused(401, "missing or wrong bearer token", "unauthorised"))
        try:
            body = json.loads(await _read_body(request))
            arm = body.get("arm") if isinstance(body, dict) else None
            if arm not in state.arms:
                raise Refused(400, f"'arm' must be one of {sorted(state.arms)}, got {arm!r}", "invalid_arm", "arm")
            if body.get("url"):
                new = Backend(url=str(body["url"]).rstrip("/"), model=str(body.get("model") or ""),
                              version=str(body.get("version") or body["url"]))
            elif body.get("version") is not None and state.launcher is not None:
                try:
                    new = await state.launcher(str(body["version"]))
                except DistillgateError as e:  # unknown version, backend failed to start: the arm is unchanged
                    return JSONResponse(_error_body(str(e), "swap_failed", kind="server_error"), 502)
            else:
                raise Refused(400, "give 'url' (+ 'model', 'version') or a 'version' to start", "invalid_swap")
        except ValueError as e:
            return _refuse(Refused(400, f"body is not valid JSON: {e}", "invalid_json"))
        except Refused as e:
            return _refuse(e)
        try:
            old = await swap_backend(state, arm, new, http["s"])
        except RuntimeError as e:
            new.stop()
            return JSONResponse(_error_body(str(e), "swap_failed", kind="server_error"), 502)
        return {"arm": arm, "version": new.version, "replaced": old.version}

    return HotPath(app, chat_completions)


class HotPath:
    """The ASGI app the gateway serves: ``POST /v1/chat/completions`` goes straight to its handler, everything
    else (and the lifespan) through the FastAPI app. FastAPI's and Starlette's middleware stack (error, body
    limit, exception, telemetry, exit-stack middleware and the router) cost ~1 ms of CPU per request on this
    2-core machine (py-spy: a third of the gateway's samples), which is half of the 2 ms latency budget; the
    handler does its own 4xx and an unexpected error here still becomes a JSON 500, as the middleware did."""

    def __init__(self, app: FastAPI, handler):
        self.app, self.handler = app, handler
        self.state = app.state  # app.state.gateway / .metrics, as on the FastAPI app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == ROUTE:
            try:
                response = await self.handler(Request(scope, receive))
            except Exception as e:  # noqa: BLE001 - a bug in the gateway: the client gets a clean 500
                log.exception("gateway error on %s", ROUTE)
                response = JSONResponse(_error_body(f"gateway error: {type(e).__name__}", "internal_error",
                                                    kind="server_error"), 500)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def warm_up(session: aiohttp.ClientSession, backend: Backend) -> None:
    """One short request so the new backend has loaded its weights before it takes traffic."""
    payload = {"model": backend.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        async with session.post(backend.url + ROUTE, data=json.dumps(payload), headers=_JSON) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"new backend {backend.url} answered the warm-up with HTTP {r.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise RuntimeError(f"new backend {backend.url} failed the warm-up: {type(e).__name__}: {e}") from None


async def swap_backend(state: GatewayState, arm: str, new: Backend, session: aiohttp.ClientSession) -> Backend:
    """Warm ``new`` up, point ``arm`` at it (requests already in flight keep the old one), wait until the old
    one has no request in flight, then stop it if the gateway started it. Returns the old backend."""
    await warm_up(session, new)
    old = state.arms[arm]
    state.arms[arm] = new  # one assignment on the event loop: each request sees the old or the new, whole
    deadline = time.monotonic() + state.drain_timeout_s
    while old.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.stop_replaced and old not in state.arms.values() and old is not state.shadow:
        await asyncio.get_running_loop().run_in_executor(None, old.stop)
    return old
