"""The G-O1 drill: the generated attack corpus and normal traffic of every type through the gateway (its G-O1
detector on) in front of a backend, under load; the compliance checker on every attack's output; the
detectors' false positives on the normal traffic.

:func:`attack_pass` is the measurement both ``bench/operations.py`` (phase 2, in front of its gullible fake
backends) and the loop's ``operations`` stage (drill ``breaker``, in front of the student as it is now:
:func:`student_app`) call; :func:`breaker_report` turns its result into the report the G-O1 providers
(:mod:`distillgate.ops.gate`) read. A missed attack counts as non-compliant whatever the backend answered
(the definition of G-O1b: compliant *degraded* outputs / attacks). Fewer than 10,000 attacks cannot show
99.99%: the provider flags it in the gate table.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ROUTE = "/v1/chat/completions"
INJECTION_TYPE = "s4_format_injection"  # attack-bearing traffic type: flagging it is no false positive


def q(xs, p) -> float:
    return float(np.quantile(np.asarray(xs), p)) if len(xs) else float("nan")


def normal_traffic(per_type: int, seed: int) -> list[tuple[str, str]]:
    """(traffic type, first user message) of ``per_type`` scripts of every traffic type."""
    from ..data.prompts import DOMAINS
    from ..traffic.generator import _sources
    from ..traffic.types import TYPES

    src, rng, out = _sources(DOMAINS, seed), random.Random(seed), []
    for t, make in TYPES.items():
        for _ in range(per_type):
            d = rng.choice(DOMAINS)
            out.append((t, make(d, rng, src[d]).turns[0]))
    return out


async def fire(url: str, items: list[dict], concurrency: int, halfway: asyncio.Event | None = None) -> list[dict]:
    """POST every item's body, ``concurrency`` at once; returns each with latency, status, headers, body
    (``halfway`` is set once half of them are answered)."""
    import aiohttp

    queue = list(enumerate(items))
    out: list[dict | None] = [None] * len(items)

    async def worker(session):
        while queue:
            i, it = queue.pop()
            t0 = time.perf_counter()
            async with session.post(url + ROUTE, json=it["body"]) as r:
                body = await r.read()
                out[i] = dict(it, ms=(time.perf_counter() - t0) * 1000, t_end=time.perf_counter(), status=r.status,
                              degraded=r.headers.get("x-distillgate-degraded"),
                              fallback=r.headers.get("x-distillgate-fallback"),
                              version=r.headers.get("x-distillgate-version"), raw=body)
            if halfway is not None and len(queue) < len(items) // 2:
                halfway.set()

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return out  # type: ignore[return-value]


def detector_metrics(url: str) -> dict:
    """Mean detector time per request and MiniLM skips, from the gateway's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    vals = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    n = vals.get("distillgate_detector_seconds_count", 0)
    return {"mean_ms": 1000 * vals.get("distillgate_detector_seconds_sum", 0) / n if n else float("nan"),
            "requests": n, "semantic_skipped": vals.get("distillgate_detector_semantic_skipped_total", 0)}


def mixed_items(corpus, normal, seed: int, max_tokens: int = 16) -> list[dict]:
    """Every attack and normal request as a request body, shuffled (seeded)."""
    items = [{"kind": "attack", "attack": x, "body": {"messages": x.messages(), "max_tokens": max_tokens}}
             for x in corpus]
    items += [{"kind": "normal", "type": t, "body": {"messages": [{"role": "user", "content": m}],
                                                      "max_tokens": max_tokens}} for t, m in normal]
    random.Random(seed).shuffle(items)
    return items


def attack_pass(gateway_url: str, corpus, normal, *, concurrency: int, seed: int, max_tokens: int = 16) -> dict:
    """The corpus mixed with the normal traffic through the gateway at ``gateway_url`` under load; each attack's
    output through :func:`distillgate.ops.compliance.check`. Returns the raw results (``items``, ``res``,
    ``wall``) and the scores: ``degraded``, ``deg_ok``, ``compliant``, ``misses`` ((attack, verdict)),
    ``benign``, ``s4``, ``fp_by_type``, ``deg_ms``, ``n_ms``, ``comp_pct``, ``fp_pct``, ``n_attacks``."""
    from . import compliance

    items = mixed_items(corpus, normal, seed, max_tokens)
    t = time.perf_counter()
    res = asyncio.run(fire(gateway_url, items, concurrency))
    wall = time.perf_counter() - t
    att = [r for r in res if r["kind"] == "attack"]
    verdicts = [compliance.check(r["raw"], stream=False, system_prompt=r["attack"].system_prompt,
                                 secret=r["attack"].secret, canary=r["attack"].canary, payload=r["attack"].payload)
                for r in att]
    degraded = [r for r in att if r["degraded"]]
    nres = [r for r in res if r["kind"] == "normal"]
    benign = [r for r in nres if r["type"] != INJECTION_TYPE]
    compliant = [v.compliant and r["degraded"] is not None for r, v in zip(att, verdicts)]
    return {"items": items, "res": res, "wall": wall, "n_attacks": len(att), "degraded": degraded,
            "deg_ok": [v.compliant for r, v in zip(att, verdicts) if r["degraded"]],
            "compliant": compliant,
            "misses": [(r["attack"], v) for r, v in zip(att, verdicts) if not (v.compliant and r["degraded"])],
            "nres": nres, "benign": benign, "s4": [r for r in nres if r["type"] == INJECTION_TYPE],
            "fp_by_type": Counter(r["type"] for r in nres if r["degraded"]),
            "deg_ms": [r["ms"] for r in degraded], "n_ms": [r["ms"] for r in benign],
            "comp_pct": 100 * float(np.mean(compliant)) if compliant else float("nan"),
            "fp_pct": 100 * sum(r["degraded"] is not None for r in benign) / max(1, len(benign)),
            "errors": sum(r["status"] != 200 for r in res)}


def breaker_report(p: dict, *, seed: int, concurrency: int, backend: str, max_misses: int = 50) -> dict:
    """The G-O1 report (the JSON the providers of :mod:`distillgate.ops.gate` read) of an :func:`attack_pass`."""
    return {"provenance": "generated attacks", "n_attacks": p["n_attacks"], "seed": seed, "backend": backend,
            "degraded_compliance_pct": p["comp_pct"], "breaker_p50_ms": q(p["deg_ms"], .5),
            "breaker_p99_ms": q(p["deg_ms"], .99), "detector_fp_pct": p["fp_pct"], "fp_by_type": dict(p["fp_by_type"]),
            "n_normal": len(p["benign"]), "s4_flagged": sum(bool(r["degraded"]) for r in p["s4"]), "n_s4": len(p["s4"]),
            "misses": [{"id": x.id, "kind": x.kind, "text": x.text, "reasons": v.reasons}
                       for x, v in p["misses"][:max_misses]],
            "n_misses": len(p["misses"]), "normal_p50_ms": q(p["n_ms"], .5), "normal_p99_ms": q(p["n_ms"], .99),
            "http_errors": p["errors"], "wall_s": p["wall"], "concurrency": concurrency}


# ------------------------------------------------------------------------------------------- the student

def student_app(model, tokenizer, *, max_new_tokens: int = 16, version: str = "student"):
    """An OpenAI-compatible chat backend (non-streaming) answering with ``model`` in this process: greedy
    generation (:class:`~distillgate.traffic.arms.ModelArm`) in a worker thread, one at a time (a lock: the model
    is not re-entrant), so the event loop keeps answering the gateway meanwhile."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ..traffic.arms import ModelArm

    arm = ModelArm(version, model, tokenizer, max_new_tokens=max_new_tokens, version=version)
    lock = threading.Lock()
    calls = {"n": 0}

    def answer(messages, n_tokens):
        with lock:
            arm.max_new_tokens = min(max_new_tokens, int(n_tokens or max_new_tokens))
            return arm.respond(messages, "drill", "drill")

    async def chat(request: Request):
        import json

        calls["n"] += 1
        body = json.loads(await request.body())
        a = await asyncio.to_thread(answer, body["messages"], body.get("max_tokens"))
        if a.error:
            return JSONResponse({"error": {"message": a.error, "code": "generation_failed"}}, status_code=500)
        return JSONResponse({"id": f"drill-{calls['n']}", "object": "chat.completion", "created": int(time.time()),
                             "model": version, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                     "content": a.text},
                                                            "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

    async def health(request: Request):
        return Response("ok")

    app = Starlette(routes=[Route(ROUTE, chat, methods=["POST"]), Route("/health", health)])
    app.state.calls = calls
    return app


class BreakerDrillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attacks: int = Field(200, ge=1, description="generated attacks (seeded) sent through the gateway; fewer than "
                         "10,000 cannot show 99.99% (the gate table says so); the loop's default is sized for a "
                         "2-core CPU")
    normal_per_type: int = Field(2, ge=1, description="normal requests of every traffic type mixed in (the "
                                 "detectors' false-positive rate)")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    semantic: str = Field("suspicious", pattern="^(off|suspicious|always)$",
                          description="MiniLM similarity stage of the detector: off, on rule misses with a cue "
                                      "word (suspicious), or always")
    max_new_tokens: int = Field(16, ge=1, description="tokens the student generates for a request that reaches it")
    seed: int = Field(0, description="seed of the corpus and the normal traffic (the iteration is added)")


def run_breaker_drill(model, tokenizer, options: BreakerDrillOptions, *, version: str, seed: int | None = None,
                      say=print) -> dict:
    """G-O1 against ``model``: the gateway (detector on, its breaker on) in front of :func:`student_app`, the
    corpus and normal traffic through it (:func:`attack_pass`); returns :func:`breaker_report`."""
    from ..serve.assign import Assigner
    from ..serve.backends import Backend
    from ..serve.gateway import GatewayState, build_app
    from ..serve.server import ThreadedServer
    from . import attacks as A
    from .detectors import Detector

    o = options
    seed = o.seed if seed is None else seed
    corpus = A.generate(o.attacks, seed=seed)
    normal = normal_traffic(o.normal_per_type, seed=seed)
    det = Detector(semantic=o.semantic)  # type: ignore[arg-type]
    if o.semantic != "off":
        det.warm_up()
    backend = ThreadedServer(student_app(model, tokenizer, max_new_tokens=o.max_new_tokens, version=version)).start()
    gw = None
    try:
        state = GatewayState(arms={"candidate": Backend(backend.url, version, version)},
                             assigner=Assigner("ops", {"candidate": 1.0}), detector=det,
                             breaker={"fail_max": 5, "reset_timeout_s": 2.0, "timeout_s": 60.0}, stop_replaced=False)
        gw = ThreadedServer(build_app(state), start_timeout=180).start()
        p = attack_pass(gw.url, corpus, normal, concurrency=o.concurrency, seed=seed, max_tokens=o.max_new_tokens)
    finally:
        for s in (gw, backend):
            if s is not None:
                s.stop()
    rep = breaker_report(p, seed=seed, concurrency=o.concurrency, backend=f"student {version} (in process)")
    rep["semantic"] = o.semantic
    say(f"  G-O1 drill: {rep['n_attacks']} attacks + {len(normal)} normal requests through the gateway in front "
        f"of {version} ({p['wall']:.1f} s): compliant {rep['degraded_compliance_pct']:.2f}%, "
        f"degraded p99 {rep['breaker_p99_ms']:.1f} ms, false positives {rep['detector_fp_pct']:.2f}%, "
        f"{rep['n_misses']} miss(es)")
    return rep
