"""System performance for the G-P gates: teacher and student measured in one run, same hardware, same
prompts, same torch thread count, with their repeats interleaved so that drift (thermal, other tenants of a
shared CPU) hits both alike.

* G-P1 TTFT: batch 1, ``torch.inference_mode``, prefill with a KV cache and ``logits_to_keep=1`` (what
  ``generate`` does) + greedy pick of the first token. Ratio = geometric mean over prompt lengths of
  (student median / teacher median), so each length weighs the same.
* G-P3 memory: parameters (unique storages, tied weights once) + KV cache (summed from the real cache after
  a prefill of ``context_len``; checked against 2*layers*kv_heads*head_dim*ctx*batch*bytes) + temporaries
  (peak of torch CPU allocations during the prefill, from ``torch.profiler`` memory events, minus the KV
  cache). Allocations outside torch's allocator (oneDNN/BLAS scratch) are not counted.
* G-P2 volatility (CPU-sized; the SPEC soaks 72 h): a seeded bursty load of multi-turn sessions with long
  contexts, served by one FIFO worker at batch 1; each request's service time is measured for real with
  ``generate``, queueing is simulated on those times with one arrival schedule (offered load set against
  the teacher) for both models. Volatility = P99 / P50 of request latency; gate value = student / teacher.
* G-P4 leak (short run; the SPEC soaks 48 h): RSS after each of repeated ``generate`` calls, least-squares
  slope extrapolated linearly to one hour, reported as an upper 95% bound (slope + 2 SE + one page over the
  run) in % of RSS, so a short noisy run cannot pass by luck.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .gates import GateContext, register_metric_provider

DEFAULT_LENGTHS = (32, 128, 512)
# Any English text works: dense attention's cost depends on the length only, not on the token values.
_FILLER = ("The committee reviewed the quarterly figures and agreed that the new schedule would reduce "
           "waiting times for most customers, although several members asked for a clearer plan for the "
           "winter months, when demand usually rises and staff are harder to find. ")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads (None: keep the current count); restores the old count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def prompt_ids(tokenizer, length: int, text: str | None = None) -> torch.Tensor:
    """Token ids ``[1, length]`` of ``text`` (default: a filler paragraph, repeated as needed)."""
    base = text or _FILLER
    ids = tokenizer(base, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt text tokenizes to nothing")
    ids = (ids * (length // len(ids) + 1))[:length]
    return torch.tensor([ids], dtype=torch.long)


def _prompt_sets(tokenizer, prompts: dict[int, list[str]] | Sequence[int]) -> dict[int, list[torch.Tensor]]:
    if isinstance(prompts, dict):
        return {L: [prompt_ids(tokenizer, L, t) for t in texts] for L, texts in prompts.items()}
    return {int(L): [prompt_ids(tokenizer, int(L))] for L in prompts}


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def ttft_once(model, ids: torch.Tensor) -> float:
    """Milliseconds from a prompt ``ids [1, L]`` to the first greedy token (prefill with KV cache)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).item()  # .item() synchronises and materialises the token
        return (time.perf_counter() - t0) * 1e3


def _summary(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "n": int(a.size)}


def _ttft_samples(models: dict[str, torch.nn.Module], prompts: dict[int, list[torch.Tensor]], repeats: int,
                  warmup: int) -> dict[str, dict[int, list[float]]]:
    """Interleaved timings: per repeat and length, every model once, order alternating between repeats."""
    names = list(models)
    for name in names:
        for L, plist in prompts.items():
            for _ in range(warmup):
                ttft_once(models[name], plist[0])
    samples = {n: {L: [] for L in prompts} for n in names}
    for r in range(repeats):
        for L, plist in prompts.items():
            ids = plist[r % len(plist)]
            for name in (names if r % 2 == 0 else names[::-1]):
                samples[name][L].append(ttft_once(models[name], ids))
    return samples


def _ttft_stats(samples: dict[int, list[float]]) -> dict:
    allms = [x for v in samples.values() for x in v]
    return {**_summary(allms), "per_length": {L: _summary(v) for L, v in samples.items()}}


def measure_ttft(model, tokenizer, prompts_by_length: dict[int, list[str]] | Sequence[int] = DEFAULT_LENGTHS,
                 repeats: int = 5, warmup: int = 1, threads: int | None = None) -> dict:
    """TTFT of one model: ``{median_ms, p99_ms, mean_ms, n, per_length: {L: {...}}, threads}``.

    ``prompts_by_length``: prompt lengths in tokens, or ``{length: [texts]}`` (each text cut/repeated to
    ``length`` tokens). P99 over few repeats is close to the maximum: use repeats >= 20 for a real tail.
    """
    with torch_threads(threads) as n:
        s = _ttft_samples({"m": model}, _prompt_sets(tokenizer, prompts_by_length), repeats, warmup)["m"]
    return {**_ttft_stats(s), "threads": n}


# ------------------------------------------------------------------------------------------------ memory

def params_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied embeddings are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache (DynamicCache ``.layers[i].keys/values``, or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    pairs = [(l.keys, l.values) for l in layers] if layers is not None else list(cache)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


def analytic_kv_cache_bytes(config, context_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * context_len * batch * bytes per element."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv * head_dim * context_len * batch * torch.empty(0, dtype=dtype).element_size()


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null: kineto prints ``USDT: ... profiler_start/stop`` lines from C++ at
    every profiler start and stop, with no switch to turn them off. Only those two calls are wrapped."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):                     # no real fd 2 (embedded interpreters): print as they do
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_extra_alloc(fn) -> tuple[int, object]:
    """Run ``fn()`` under torch.profiler(profile_memory); peak of net CPU allocations (bytes) and its result."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_fd_silenced():
        prof.start()
    try:
        result = fn()
    finally:
        with _stderr_fd_silenced():
            prof.stop()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocations (profile_memory unsupported?)")
    net = np.cumsum([b for _, b in sorted(events, key=lambda e: e[0])])
    return int(max(0, net.max())), result


def measure_memory(model, context_len: int = 512, batch: int = 1) -> dict:
    """Memory breakdown of a prefill of ``[batch, context_len]`` tokens (bytes).

    Returns ``{params_bytes, kv_cache_bytes, kv_cache_bytes_analytic, activations_bytes, peak_extra_bytes,
    total_bytes, context_len, batch, method}``; ``total = params + kv + activations = params + peak_extra``.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(context_len * batch) * 7919 % vocab).view(batch, context_len)
    gc.collect()

    def prefill():
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out

    peak, out = _peak_extra_alloc(prefill)
    kv = kv_cache_bytes(_cache_of(out))
    dtype = next(model.parameters()).dtype
    analytic = analytic_kv_cache_bytes(model.config, context_len, batch, dtype)
    pb = params_bytes(model)
    del out
    act = max(0, peak - kv)
    return {"params_bytes": pb, "kv_cache_bytes": kv, "kv_cache_bytes_analytic": analytic,
            "activations_bytes": act, "peak_extra_bytes": peak, "total_bytes": pb + kv + act,
            "context_len": context_len, "batch": batch,
            "method": "params: unique storages; kv: real cache after prefill; activations: torch.profiler "
                      "profile_memory peak of net CPU allocations during prefill minus kv"}


def compare_perf(teacher, student, tokenizer, lengths: Sequence[int] = DEFAULT_LENGTHS, repeats: int = 5,
                 warmup: int = 1, context_len: int = 512, threads: int | None = None) -> dict:
    """G-P1 and G-P3 in one run: ``{ttft_ratio, peak_memory_ratio, details}`` (student / teacher)."""
    prompts = _prompt_sets(tokenizer, lengths)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with torch_threads(threads) as n:
        s = _ttft_samples({"teacher": teacher, "student": student}, prompts, repeats, warmup)
        mem = {k: measure_memory(m, context_len) for k, m in (("teacher", teacher), ("student", student))}
    tt, st = _ttft_stats(s["teacher"]), _ttft_stats(s["student"])
    per_len = {L: st["per_length"][L]["median_ms"] / tt["per_length"][L]["median_ms"] for L in prompts}
    ratio = math.exp(sum(math.log(r) for r in per_len.values()) / len(per_len))
    ci = ttft_ratio_ci(s["teacher"], s["student"])
    return {"ttft_ratio": ratio, "ttft_ratio_ci": ci,
            "peak_memory_ratio": mem["student"]["total_bytes"] / mem["teacher"]["total_bytes"],
            "details": {"ttft": {"teacher": tt, "student": st, "ratio_per_length": per_len,
                                 "ratio_max": max(per_len.values())},
                        "memory": mem, "threads": n, "repeats": repeats, "warmup": warmup,
                        "ratio_ci95": ci,
                        # other tenants of the CPU inflate both models' times; interleaving keeps the ratio fair
                        "loadavg_1m": [load_before, os.getloadavg()[0] if load_before is not None else None],
                        "cpu_count": os.cpu_count()}}


def ttft_ratio_ci(teacher: dict[int, list[float]], student: dict[int, list[float]], confidence: float = 0.95,
                  n_resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap CI (scipy) of the TTFT ratio (geometric mean over lengths of the per-length median
    ratio). The unit resampled is one repeat: the teacher and student timings taken next to each other at
    every length, so machine-load swings shared by both stay paired. None with fewer than 2 repeats."""
    import numpy as np
    from scipy.stats import bootstrap

    lengths = sorted(teacher)
    r = min(len(teacher[L]) for L in lengths)
    if r < 2:
        return None
    t = np.array([[teacher[L][i] for L in lengths] for i in range(r)])
    s = np.array([[student[L][i] for L in lengths] for i in range(r)])

    def stat(idx):
        idx = idx.astype(int)
        return float(np.exp(np.mean(np.log(np.median(s[idx], axis=0) / np.median(t[idx], axis=0)))))

    res = bootstrap((np.arange(r, dtype=float),), stat, vectorized=False, paired=True, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", random_state=seed)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


# ------------------------------------------------------------------------------------------------ G-P2

@dataclass(frozen=True)
class Request:
    arrival: float  # in units of the mean service time at offered load 1 (scaled to seconds later)
    prompt_len: int
    new_tokens: int
    session: int


def bursty_load(n_requests: int = 24, sessions: int = 6, seed: int = 0, max_context: int = 512,
                load: float = 0.7, burst_prob: float = 0.25, burst_size: int = 4) -> list[Request]:
    """A seeded mixed load: multi-turn sessions (the context grows each turn; one in three sessions opens
    with a long document), arrivals Poisson at rate ``load`` plus bursts of ``burst_size`` at once."""
    rng = random.Random(seed)
    ctx = {s: (rng.randint(max_context // 2, max_context * 3 // 4) if s % 3 == 0 else rng.randint(16, 48))
           for s in range(sessions)}
    reqs, t = [], 0.0
    while len(reqs) < n_requests:
        t += rng.expovariate(load)
        k = burst_size if rng.random() < burst_prob else 1
        for _ in range(min(k, n_requests - len(reqs))):
            s = rng.randrange(sessions)
            new = rng.randint(4, 12)
            ctx[s] = min(max_context, ctx[s] + rng.randint(8, 48))
            reqs.append(Request(arrival=t, prompt_len=ctx[s], new_tokens=new, session=s))
            ctx[s] = min(max_context, ctx[s] + new)
    return reqs


def serve_once(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``generate`` of exactly ``new_tokens`` greedy tokens after ``ids [1, L]``."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0


def fifo_latencies(arrivals_s: Sequence[float], service_s: Sequence[float]) -> list[float]:
    """Latency (wait + service) of each request at one FIFO worker: finish_i = max(arrival_i, finish_i-1) + s_i."""
    out, free_at = [], 0.0
    for a, s in zip(arrivals_s, service_s, strict=True):
        free_at = max(a, free_at) + s
        out.append(free_at - a)
    return out


def latency_volatility(latencies_s: Sequence[float]) -> dict:
    a = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p99 = float(np.percentile(a, 50)), float(np.percentile(a, 99))
    return {"p50_ms": p50, "p99_ms": p99, "volatility": p99 / p50, "n": int(a.size)}


def compare_latency_volatility(teacher, student, tokenizer, n_requests: int = 24, seed: int = 0,
                               max_context: int = 512, load: float = 0.7, threads: int | None = None) -> dict:
    """G-P2: ``{latency_volatility_ratio, details}`` = (P99/P50) student / (P99/P50) teacher on one load.

    Service times are measured interleaved (teacher then student per request, order alternating); the
    arrival schedule is scaled so the teacher's offered load is ``load`` (its mean service time / load per
    arrival unit), and the same schedule in seconds is replayed for the student.
    """
    reqs = bursty_load(n_requests, seed=seed, max_context=max_context, load=load)
    filler = prompt_ids(tokenizer, max_context)
    svc = {"teacher": [], "student": []}
    models = {"teacher": teacher, "student": student}
    with torch_threads(threads) as n:
        for m in models.values():  # warm-up: first generate call pays one-off setup costs
            serve_once(m, filler[:, :16], 2)
        for i, r in enumerate(reqs):
            for name in (("teacher", "student") if i % 2 == 0 else ("student", "teacher")):
                svc[name].append(serve_once(models[name], filler[:, :r.prompt_len], r.new_tokens))
    unit = float(np.mean(svc["teacher"]))
    arrivals = [r.arrival * unit for r in reqs]
    lat = {k: fifo_latencies(arrivals, v) for k, v in svc.items()}
    vol = {k: latency_volatility(v) for k, v in lat.items()}
    from .serve.load import volatility_ratio_ci

    ci = volatility_ratio_ci([1e3 * x for x in lat["teacher"]], [1e3 * x for x in lat["student"]], seed=seed)
    return {"latency_volatility_ratio": vol["student"]["volatility"] / vol["teacher"]["volatility"],
            "details": {**vol, "ci95": list(ci), "n_requests": n_requests, "load": load, "max_context": max_context, "threads": n,
                        "mean_service_ms": {k: 1e3 * float(np.mean(v)) for k, v in svc.items()},
                        "method": "CPU-sized: one FIFO worker, batch 1, real generate service times, "
                                  "simulated queueing on a seeded bursty multi-session schedule"}}


# ------------------------------------------------------------------------------------------------ G-P4

def _rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def leak_rate(model, tokenizer, seconds: float = 60.0, iterations: int | None = None, warmup: int = 3,
              prompt_len: int = 64, new_tokens: int = 16) -> dict:
    """G-P4: RSS growth over repeated ``generate`` calls, as % of RSS per hour (linear extrapolation).

    Runs ``iterations`` calls (or as many as fit in ``seconds``) after ``warmup`` calls, sampling RSS after a
    ``gc.collect()`` each time. ``pct_per_hour_upper95`` = (max(slope + 2 SE, 0) + page/duration) * 3600 / RSS:
    the page term is RSS's resolution, so a run too short to resolve the threshold cannot pass, and a flat or
    shrinking RSS does not bring the bound below that resolution.
    """
    ids = prompt_ids(tokenizer, prompt_len)
    for _ in range(warmup):
        serve_once(model, ids, new_tokens)
    gc.collect()
    t0, ts, rss = time.perf_counter(), [], []
    n_min = max(3, iterations or 0)
    while len(ts) < n_min or (iterations is None and time.perf_counter() - t0 < seconds):
        serve_once(model, ids, new_tokens)
        gc.collect()
        ts.append(time.perf_counter() - t0)
        rss.append(_rss())
    return leak_fit(ts, rss, "RSS after gc per generate call, least squares, upper 95% bound, linear extrapolation")


def leak_fit(ts, rss, method: str) -> dict:
    """The G-P4 estimate from RSS samples ``rss`` (bytes) at times ``ts`` (s): least-squares slope,
    ``pct_per_hour_upper95`` = (max(slope + 2 SE, 0) + page/duration) * 3600 / RSS (see :func:`leak_rate`)."""
    t, r = np.asarray(ts, dtype=np.float64), np.asarray(rss, dtype=np.float64)
    if t.size < 3 or t[-1] <= t[0]:
        raise ValueError(f"leak_rate needs >= 3 samples over a positive duration, got {t.size}")
    slope, intercept = np.polyfit(t, r, 1)
    resid = r - (slope * t + intercept)
    se = math.sqrt(float(resid @ resid) / (t.size - 2) / float(((t - t.mean()) ** 2).sum()))
    duration = float(t[-1] - t[0])
    base = float(r[0])
    to_pct_h = 3600.0 * 100.0 / base
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    slope = float(slope)
    return {"pct_per_hour": slope * to_pct_h, "pct_per_hour_upper95": (max(slope + 2 * se, 0.0) + page / duration) * to_pct_h,
            "resolution_pct_per_hour": page / duration * to_pct_h, "slope_bytes_per_s": slope,
            "slope_se": se, "duration_s": duration, "n": int(t.size), "rss_start": int(r[0]), "rss_end": int(r[-1]),
            "method": method}


# ------------------------------------------------------------------------------------------------ providers

def _opt(ctx: GateContext, key: str, default=None):
    return ctx.opt(key, default)


def _perf(ctx: GateContext) -> dict:
    if "perf" not in ctx.cache:
        t, s = ctx.teacher(), ctx.student()
        ctx.cache["perf"] = compare_perf(
            t.model, s.model, t.tokenizer, lengths=_opt(ctx, "lengths", DEFAULT_LENGTHS),
            repeats=_opt(ctx, "repeats"), warmup=_opt(ctx, "warmup"),
            context_len=_opt(ctx, "context_len"), threads=ctx.options.get("threads"))
        ctx.details["perf"] = ctx.cache["perf"]["details"]
    return ctx.cache["perf"]


def _ttft_ratio(ctx: GateContext) -> float:
    p = _perf(ctx)
    if p.get("ttft_ratio_ci"):  # findings on a ratio whose CI crosses their threshold are 'uncertain'
        ctx.extra["ttft_ratio/ci_low"], ctx.extra["ttft_ratio/ci_high"] = p["ttft_ratio_ci"]
    return p["ttft_ratio"]


def _peak_memory_ratio(ctx: GateContext) -> float:
    return _perf(ctx)["peak_memory_ratio"]


def _latency_volatility_ratio(ctx: GateContext) -> float:
    serving = ctx.options.get("serving")
    if serving is not None and getattr(serving, "enabled", False):
        return _latency_volatility_through_gateway(ctx, serving)
    t, s = ctx.teacher(), ctx.student()
    r = compare_latency_volatility(t.model, s.model, t.tokenizer, n_requests=_opt(ctx, "volatility_requests"),
                                   seed=_opt(ctx, "seed"), max_context=_opt(ctx, "context_len"),
                                   threads=ctx.options.get("threads"))
    ctx.details["latency_volatility_ratio"] = r["details"]
    from .evaluate.providers import report_size

    report_size(ctx, "latency_volatility_ratio", r["details"]["n_requests"], r["details"]["ci95"],
                "percentile bootstrap over the requests (scipy; queued latencies are not independent, so narrow)")
    return r["latency_volatility_ratio"]


def _latency_volatility_through_gateway(ctx: GateContext, serving) -> float:
    """G-P2 under real load (issue 11 part 6): both models behind real backends and the gateway, a locust
    load on loopback. The student in memory is saved to a scratch folder first (the backend loads a folder)."""
    import tempfile

    from .serve.load import measure_latency_volatility

    t, s = ctx.teacher(), ctx.student()
    with tempfile.TemporaryDirectory(prefix="distillgate-gp2-") as tmp:
        student_dir = Path(tmp) / "student"
        s.model.save_pretrained(student_dir, safe_serialization=True)
        s.tokenizer.save_pretrained(student_dir)
        r = measure_latency_volatility(t.path, student_dir, serving, Path(tmp) / "load")
    ctx.extra["latency_volatility_ratio/ci_low"], ctx.extra["latency_volatility_ratio/ci_high"] = r["details"]["ci95"]
    ctx.details["latency_volatility_ratio"] = r["details"]
    return r["latency_volatility_ratio"]


def _leak_pct_per_hour(ctx: GateContext) -> float | None:
    """G-P4: from a gateway soak report (``options['soak_report']``), else a gateway soak of ``leak_seconds``
    when ``options['leak_through_gateway']`` (the student served by a real backend under the locust load; see
    :mod:`distillgate.ops.soak`), else the in-process generate loop of :func:`leak_rate`."""
    rep = ctx.options.get("soak_report")
    seconds = float(_opt(ctx, "leak_seconds", 0))
    if rep is None and seconds > 0 and ctx.options.get("leak_through_gateway"):
        from .ops.soak import soak_student

        s = ctx.student()
        rep = soak_student(s, seconds, ctx.options.get("serving"))
    if rep is not None:
        if isinstance(rep, (str, Path)):
            from .ops.soak import read_report

            rep = read_report(rep)
        ctx.details["leak_pct_per_hour"] = {**{k: v for k, v in rep.items() if k not in ("samples",)},
                                            "provenance": rep["provenance"]}
        return rep["pct_per_hour_upper95"]
    if seconds <= 0:
        ctx.details["leak_pct_per_hour"] = {"note": "soak not run (--leak-seconds 0)"}
        return None
    s = ctx.student()
    with torch_threads(ctx.options.get("threads")):
        r = leak_rate(s.model, s.tokenizer, seconds=seconds)
    ctx.details["leak_pct_per_hour"] = {**r, "provenance": f"in-process generate loop {r['duration_s']:.0f} s"}
    return r["pct_per_hour_upper95"]


register_metric_provider("ttft_ratio", _ttft_ratio, higher_is_better=False,
                         description="TTFT student / teacher, geometric mean over prompt lengths (G-P1)")
register_metric_provider("peak_memory_ratio", _peak_memory_ratio, higher_is_better=False,
                         description="peak memory (params + KV + temporaries) student / teacher (G-P3)")
register_metric_provider("latency_volatility_ratio", _latency_volatility_ratio, higher_is_better=False,
                         description="P99/P50 latency under bursty load, student / teacher (G-P2, CPU-sized)")
register_metric_provider("leak_pct_per_hour", _leak_pct_per_hour, higher_is_better=False,
                         description="student RSS growth, upper 95% bound, % per hour (G-P4, short soak)")


def _flops(ctx: GateContext) -> dict:
    """Analytic FLOPs/token of teacher and student at ``context_len`` (see :mod:`distillgate.models.prune`)."""
    if "flops" not in ctx.cache:
        from .models.info import param_counts
        from .models.flops import flops_per_token

        t, s = ctx.teacher(), ctx.student()
        T = int(_opt(ctx, "context_len", 256))
        ft, fs = flops_per_token(t.model, T), flops_per_token(s.model, T)
        ctx.cache["flops"] = {"teacher": ft, "student": fs, "context_len": T,
                              "params": {"teacher": param_counts(t.model)["total"],
                                         "student": param_counts(s.model)["total"]}}
        ctx.details["flops_ratio"] = ctx.cache["flops"]
        for k, v in fs.items():
            if k != "total":
                ctx.extra[f"flops/{k}"] = float(v)
    return ctx.cache["flops"]


def _flops_ratio(ctx: GateContext) -> float:
    f = _flops(ctx)
    return f["student"]["total"] / f["teacher"]["total"]


def _params_ratio(ctx: GateContext) -> float:
    f = _flops(ctx)["params"]
    return f["student"] / f["teacher"]


register_metric_provider("flops_ratio", _flops_ratio, higher_is_better=False, regression=False,
                         description="forward FLOPs per token student / teacher at context_len, analytic "
                                     "(attention projections + scores, MLP, LM head; S3.3)")
register_metric_provider("params_ratio", _params_ratio, higher_is_better=False, regression=False,
                         description="parameters student / teacher (S3.3)")
