"""G-P4 through the gateway: a bounded soak of the served student, its backend's RSS sampled under load.

:func:`gateway_soak` puts the gateway in front of the student's backend (a running
:class:`~distillgate.serve.backends.Backend`; its process, or ``pid``), runs the maintained locust load
(:class:`~distillgate.serve.load.BackgroundLoad`) through it, waits ``warmup_s`` (first requests allocate
caches), then samples the backend process's RSS (psutil; the process and its children, summed) every
``sample_every_s`` for ``seconds``. The estimate is :func:`distillgate.perf.leak_fit`'s, the one the in-process
G-P4 uses: least-squares slope of RSS over time, upper 95% bound (slope + 2 SE, plus one page over the run:
a run too short to resolve the threshold cannot pass), extrapolated linearly to % of RSS per hour.

``distillgate ops soak --student DIR --seconds N --out FILE`` runs it (the SPEC soaks 48 h; tests soak seconds);
``distillgate gates --soak-report FILE`` (or ``--leak-seconds N --leak-through-gateway``) feeds the G-P4 gate
``leak_pct_per_hour``, with provenance ``gateway soak N s``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ..errors import InputError
from ..io import read_json_report

REPORT_KEYS = ("provenance", "pct_per_hour_upper95", "duration_s", "n")


def process_rss(pid: int) -> int:
    """RSS in bytes of process ``pid`` and all its children."""
    import psutil

    p = psutil.Process(pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def gateway_soak(backend, seconds: float, spec, work_dir, *, pid: int | None = None, sample_every_s: float = 0.5,
                 warmup_s: float = 2.0) -> dict:
    """Soak ``backend`` through the gateway for ``seconds`` under ``spec``'s locust load (a
    :class:`~distillgate.serve.spec.ServingSpec`), sampling the RSS of its process (or ``pid``)."""
    from ..perf import leak_fit
    from ..serve.assign import Assigner
    from ..serve.gateway import GatewayState, build_app
    from ..serve.load import BackgroundLoad
    from ..serve.log import RequestLog, read_requests
    from ..serve.server import ThreadedServer

    if not (seconds > 0 and math.isfinite(seconds)):
        raise InputError(f"soak seconds must be a positive number, got {seconds!r}")
    if pid is None:
        if backend.process is None:
            raise InputError(f"soak: backend {backend.url} is not a process distillgate started; pass its pid")
        pid = backend.process.pid
    process_rss(pid)  # the process exists (psutil.NoSuchProcess otherwise), before any load starts
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "requests.sqlite"
    log = RequestLog(log_file)
    state = GatewayState(arms={"student": backend}, assigner=Assigner(spec.experiment, {"student": 1.0}),
                         request_log=log, max_body_bytes=spec.max_body_bytes, max_tokens_limit=spec.max_tokens_limit,
                         stop_replaced=False)
    t_begin = time.time()
    ts, rss = [], []
    try:
        with ThreadedServer(build_app(state)) as server, \
                BackgroundLoad(server.url, spec, ["student"], work, max_seconds=seconds + warmup_s + 600) as load:
            load.wait_started(log_file)
            time.sleep(warmup_s)
            t_soak = time.time()
            t0 = time.perf_counter()
            while True:
                now = time.perf_counter() - t0
                ts.append(now)
                rss.append(process_rss(pid))
                if now >= seconds:
                    break
                time.sleep(max(0.0, min(sample_every_s, seconds - now)))
        locust = load.result
    finally:
        log.close()
    rows = read_requests(log_file, since=t_begin)
    during = [r for r in rows if r["ts"] >= t_soak]
    failed = sum(r["status"] != 200 for r in rows)
    fit = leak_fit(ts, rss, "RSS of the backend process (and children) sampled every "
                            f"{sample_every_s:g} s under the locust load through the gateway; least squares, "
                            "upper 95% bound, linear extrapolation")
    return {**fit, "provenance": f"gateway soak {seconds:g} s", "pid": pid, "backend_version": backend.version,
            "n_requests": len(during), "requests_per_s": len(during) / max(ts[-1], 1e-9), "failed_requests": failed,
            "locust": locust, "warmup_s": warmup_s, "samples": [[t, int(r)] for t, r in zip(ts, rss)],
            "load": spec.model_dump(include={"load_users", "load_max_tokens", "long_context_words", "burst_size",
                                             "burst_every_s", "think_time_s"}), "work_dir": str(work)}


def soak_student(student, seconds: float, spec=None, work_dir=None) -> dict:
    """:func:`gateway_soak` of a loaded student (``.model``, ``.tokenizer``, ``.path``): its folder (or a
    scratch save of the model in memory) served by ``spec.backend`` (default: ``transformers serve``)."""
    import tempfile

    from ..serve import backends
    from ..serve.spec import ServingSpec

    spec = spec or ServingSpec(enabled=True)
    with tempfile.TemporaryDirectory(prefix="distillgate-soak-") as tmp:
        folder = Path(student.path) if getattr(student, "path", None) and Path(student.path).is_dir() else None
        if folder is None or not (folder / "config.json").is_file():
            folder = Path(tmp) / "student"
            student.model.save_pretrained(folder, safe_serialization=True)
            student.tokenizer.save_pretrained(folder)
        work = Path(work_dir) if work_dir else Path(tmp) / "soak"
        b = backends.start(spec.backend, folder, "student", work / "logs", device=spec.device,
                           timeout=spec.startup_timeout_s, threads=spec.backend_threads)
        try:
            return gateway_soak(b, seconds, spec, work)
        finally:
            b.stop()


def read_report(path) -> dict:
    p = Path(path)
    rep = read_json_report(p, "--soak-report", "write one with `distillgate ops soak --out FILE`")
    for k in REPORT_KEYS:
        v = rep.get(k) if isinstance(rep, dict) else None
        ok = isinstance(v, str) and v if k == "provenance" else \
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            raise InputError(f"--soak-report {p}: field {k!r} must be " +
                             ("a non-empty string" if k == "provenance" else "a finite number") + f", got {v!r}")
    return rep
