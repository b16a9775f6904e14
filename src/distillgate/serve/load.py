"""G-P2 under real load: teacher and student served by real backends behind the gateway, driven by locust
(headless, bounded by ``--run-time``) with bursts, long contexts and many concurrent sessions; latencies read
back from the gateway's request log (server-side, the same clock for both arms).

``measure_latency_volatility(teacher_dir, student_dir, spec, work_dir)`` -> ``{latency_volatility_ratio,
details}``; the ratio is (P99/P50) student / (P99/P50) teacher, with a bootstrap 95% CI (scipy).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..perf import latency_volatility
from . import backends
from .assign import Assigner
from .gateway import GatewayState, build_app
from .log import RequestLog, read_requests
from .server import ThreadedServer
from .spec import ServingSpec

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def _locust_cmd(url: str, spec: ServingSpec, arms: list[str], out_dir: Path, run_time_s: float):
    cfg = {"arms": arms, "max_tokens": spec.load_max_tokens, "long_context_words": spec.long_context_words,
           "burst_size": spec.burst_size, "burst_every_s": spec.burst_every_s, "think_time_s": spec.think_time_s,
           "seed": spec.seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_file = out_dir / "locust-stats.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(spec.load_users),
           "-r", str(spec.load_users), "-t", f"{math.ceil(run_time_s)}s", "-H", url, "--only-summary",
           "--stop-timeout", "30", "--loglevel", "WARNING", "--json-file", str(stats_file.with_suffix(""))]
    env = dict(os.environ, DISTILLGATE_LOAD=json.dumps(cfg), OMP_NUM_THREADS="1")
    return cmd, env, stats_file


def _locust_stats(stats_file: Path) -> dict:
    stats = {}
    if stats_file.is_file():
        for s in json.loads(stats_file.read_text()):
            stats[s["name"]] = {"num_requests": s["num_requests"], "num_failures": s["num_failures"]}
    return stats


def run_locust(url: str, spec: ServingSpec, arms: list[str], out_dir: Path) -> dict:
    """Run the load against ``url`` for ``spec.load_seconds``; returns locust's final stats per arm
    ({name: {num_requests, num_failures}}) and its exit code."""
    cmd, env, stats_file = _locust_cmd(url, spec, arms, out_dir, spec.load_seconds)
    with open(out_dir / "locust.log", "wb") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=spec.load_seconds + 120)
    return {"exit_code": p.returncode, "stats": _locust_stats(stats_file)}


class BackgroundLoad:
    """The same locust load, open-ended: ``with BackgroundLoad(url, spec, arms, dir) as load: ...`` runs it
    (bounded by ``max_seconds``) while the block does something under load (a rollback, a soak); leaving the
    block stops locust (SIGTERM: it writes its stats) and ``load.result`` holds ``{exit_code, stats}``.
    ``wait_started()`` blocks until the first request through ``log`` (a :class:`RequestLog`'s path) is seen."""

    def __init__(self, url: str, spec: ServingSpec, arms: list[str], out_dir: str | os.PathLike,
                 max_seconds: float = 3600.0):
        self.out_dir = Path(out_dir)
        self.cmd, self.env, self.stats_file = _locust_cmd(url, spec, arms, self.out_dir, max_seconds)
        self.max_seconds = max_seconds
        self.proc: subprocess.Popen | None = None
        self.result: dict | None = None

    def __enter__(self) -> "BackgroundLoad":
        self._log = open(self.out_dir / "locust.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        return self

    def wait_started(self, request_log: str | os.PathLike, timeout: float = 120.0, min_rows: int = 1,
                     since: float | None = None) -> None:
        """Block until the request log holds ``min_rows`` rows (since ``since``): the load has reached the
        gateway. InputError if locust exits or ``timeout`` passes first."""
        import sqlite3

        deadline = time.monotonic() + timeout
        while True:
            n = 0
            if Path(request_log).is_file():
                try:
                    n = len(read_requests(request_log, since=since))
                except sqlite3.OperationalError:
                    n = 0
            if n >= min_rows:
                return
            if self.proc.poll() is not None:
                raise InputError(f"locust exited with code {self.proc.returncode} before the load started; "
                                 f"see {self.out_dir / 'locust.log'}")
            if time.monotonic() > deadline:
                raise InputError(f"no request reached the gateway within {timeout:.0f} s of starting locust; "
                                 f"see {self.out_dir / 'locust.log'}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._log.close()
        self.result = {"exit_code": code, "stats": _locust_stats(self.stats_file)}


def volatility_ratio_ci(teacher_ms: list[float], student_ms: list[float], confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap (scipy, percentile) CI of (P99/P50 student) / (P99/P50 teacher), arms resampled independently."""
    from scipy.stats import bootstrap

    def vol(a, axis=-1):
        return np.percentile(a, 99, axis=axis) / np.percentile(a, 50, axis=axis)

    def stat(s, t, axis=-1):
        return vol(s, axis) / vol(t, axis)

    res = bootstrap((np.asarray(student_ms), np.asarray(teacher_ms)), stat, vectorized=True, paired=False,
                    confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def measure_latency_volatility(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike,
                               spec: ServingSpec, work_dir: str | os.PathLike) -> dict:
    """Start both backends (``spec.backend``), measure through the gateway, stop them."""
    work = Path(work_dir)
    started = backends.start_many(spec.backend, {"teacher": teacher_dir, "student": student_dir}, work / "logs",
                                  device=spec.device, timeout=spec.startup_timeout_s, threads=spec.backend_threads)
    try:
        return measure_through_gateway({b.version: b for b in started}, spec, work)
    finally:
        for b in started:
            b.stop()


def measure_through_gateway(arms: dict[str, backends.Backend], spec: ServingSpec, work_dir: str | os.PathLike,
                            baseline: str = "teacher", candidate: str = "student") -> dict:
    """Gateway in front of ``arms`` (running backends), the locust load on every arm, P99/P50 per arm from
    the request log; ``latency_volatility_ratio`` = candidate's / baseline's."""
    from .client import GatewayClient

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = RequestLog(work / "requests.sqlite")
    state = GatewayState(arms=dict(arms), assigner=Assigner(spec.experiment, {a: 1.0 for a in arms}),
                         request_log=log, max_body_bytes=spec.max_body_bytes, max_tokens_limit=spec.max_tokens_limit,
                         stop_replaced=False)
    t0 = time.time()
    try:
        with ThreadedServer(build_app(state)) as server:
            with GatewayClient(server.url) as c:  # warm-up: a first generate pays one-off setup costs
                for arm in arms:
                    c.chat("warm up", model=arm, max_tokens=2)
            since = time.time()
            run = run_locust(server.url, spec, list(arms), work)
    finally:
        log.close()
    rows = read_requests(work / "requests.sqlite", since=since)
    names = (baseline, candidate)
    ok = {a: [r for r in rows if r["arm"] == a and r["status"] == 200] for a in names}
    failed = {a: sum(1 for r in rows if r["arm"] == a and r["status"] != 200) for a in names}
    if min(len(v) for v in ok.values()) < 20:
        raise InputError(f"G-P2 through the gateway: too few answered requests "
                         f"({ {a: len(v) for a, v in ok.items()} }, failed {failed}); raise "
                         f"loop.serving.load_seconds or load_users, or see {work / 'locust.log'}")
    lat = {a: [r["latency_ms"] for r in v] for a, v in ok.items()}
    vol = {a: latency_volatility(np.asarray(v) / 1000) for a, v in lat.items()}
    ttft = {a: float(np.median([r["ttft_ms"] for r in v])) for a, v in ok.items()}
    ratio = vol[candidate]["volatility"] / vol[baseline]["volatility"]
    return {"latency_volatility_ratio": ratio,
            "details": {**vol, "ci95": volatility_ratio_ci(lat[baseline], lat[candidate]), "failed": failed,
                        "ttft_p50_ms": ttft, "locust": run, "seconds": time.time() - t0, "work_dir": str(work),
                        "load": spec.model_dump(include={"load_users", "load_seconds", "load_max_tokens",
                                                          "long_context_words", "burst_size", "burst_every_s"}),
                        "method": "through the gateway: real backends, a locust load with bursts, long contexts "
                                  "and concurrent sessions on loopback; server-side latency from the request log"}}
