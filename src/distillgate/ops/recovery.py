"""G-O5 recovery under live serving: a rollback drill, and the gate values it yields.

:func:`drill_run` serves a run's ``current`` version behind the gateway, puts the gateway under the maintained
locust load (:class:`~distillgate.serve.load.BackgroundLoad`: multi-turn sessions, long contexts, bursts),
and rolls the served arm back, by ``POST /admin/swap {"arm": "candidate", "version": V}``, to each of the
last three stable versions of the run (:meth:`RunStore.stable_versions`, newest first), one after the other.
The gateway's launcher starts each version's backend from the store's weights (a verified, hard-linked
checkout of the version's ``student/`` files; ``transformers serve`` by default), warms it up, points the arm
at it and stops the old one once its in-flight requests are done. The store is only read: the drill moves no
alias (``distillgate rollback`` does that).

Per rollback, from the gateway's request log (server-side latencies, one clock):

* ``seconds``: from the swap request to its answer (backend start + warm-up + switch + drain);
* ``p50_before_ms``: requests received in the ``window_s`` before the swap started (the old version);
* ``p50_after_ms``: requests received in the ``window_s`` after the swap answered (the restored version;
  ``served_after`` lists the versions that served them: only the target, or the drill says so);
* ``added_p50_ms`` = after - before, with a 95% bootstrap CI (``added_p50_ci95``); ``p50_during_ms`` (requests received while the swap ran) is reported too:
  on a CPU machine the new backend's start competes with serving for the cores.

Gate values: G-O5a ``rollback_minutes`` = the slowest rollback, G-O5b ``rollback_added_latency_ms`` = the
largest ``added_p50_ms``; both only from a drill with zero failed requests (a non-200 in the log or a locust
failure) and every rollback done: otherwise the provider errors, naming what failed, and the gate is not met.
``distillgate ops rollback-drill RUN --out FILE`` runs it; ``distillgate gates --rollback-report FILE`` reads it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..io import read_json_report
from ..evaluate.providers import GateContext, register_metric_provider, report_size

REPORT_KEYS = ("provenance", "rollbacks", "rollback_minutes", "rollback_added_latency_ms", "failed_requests")


def _p50(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def _median_diff_ci(after: list[float], before: list[float]) -> list[float]:
    """95% percentile-bootstrap CI (scipy) of median(after) - median(before), the windows resampled apart: on a
    shared machine a few ms either way is noise, and the CI says how much."""
    from scipy.stats import bootstrap

    ci = bootstrap((np.asarray(after), np.asarray(before)),
                   lambda a, b, axis=-1: np.median(a, axis=axis) - np.median(b, axis=axis), vectorized=True,
                   paired=False, n_resamples=1000, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval
    return [float(ci.low), float(ci.high)]


IDLE_PROBES = 5


def _swaps_under_load(load, log_file, window_s, warmup_s, targets, state, http, swaps, say) -> None:
    load.wait_started(log_file)
    time.sleep(window_s if warmup_s is None else warmup_s)  # the ramp-up, measured by no window
    time.sleep(window_s)  # the first rollback's "before" window
    for ref in targets:
        say(f"  rollback: candidate {state.arms['candidate'].version} -> {ref} under load ...")
        t0 = time.time()
        r = http.post("/admin/swap", json={"arm": "candidate", "version": ref})
        t1 = time.time()
        body = r.json()
        swaps.append({"to": ref, "t0": t0, "t1": t1, "seconds": t1 - t0, "http_status": r.status_code,
                      "replaced": body.get("replaced"), "version": body.get("version"),
                      "error": None if r.status_code == 200 else body.get("error", {}).get("message")})
        say(f"    HTTP {r.status_code} in {t1 - t0:.1f} s")
        if r.status_code != 200:
            break
        time.sleep(window_s)  # this rollback's "after" window (and the next one's "before")


def drill(start, targets: list[str], launch: Callable[[str], object], spec, work_dir, *, window_s: float = 3.0,
          warmup_s: float | None = None, max_rollback_s: float = 900.0, max_load_factor: float = 10.0,
          say: Callable[[str], None] = lambda s: None) -> dict:
    """Serve ``start`` (a running :class:`~distillgate.serve.backends.Backend`) as the ``candidate`` arm under
    the locust load of ``spec`` (a :class:`~distillgate.serve.spec.ServingSpec`), then swap the arm to each of
    ``targets`` in turn through ``/admin/swap`` (``launch(ref) -> Backend`` is the gateway's launcher); returns
    the drill report (see the module docstring). The load runs ``warmup_s`` (default ``window_s``) before the
    first "before" window opens: the locust ramp and a cold backend's first requests are not the steady state a
    rollback is compared against. Before the load, :data:`IDLE_PROBES` requests one at a time give the idle p50
    (``p50_idle_ms``): a rollback whose "before" p50 is over ``max_load_factor`` times it ran on a saturated
    backend, where latency is queueing (a swap resets the queue, so "added" latency comes out negative), and the
    report marks it ``saturated``. Every backend the drill started is stopped; ``start`` too."""
    import httpx

    from ..serve.assign import Assigner
    from ..serve.gateway import GatewayState, build_app
    from ..serve.load import BackgroundLoad
    from ..serve.log import RequestLog, read_requests
    from ..serve.server import ThreadedServer

    if not targets:
        raise InputError("rollback drill: no target versions")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "requests.sqlite"
    if log_file.exists():
        raise InputError(f"rollback drill: {work} already holds a drill's request log; use a new folder")
    started = [start]

    async def launcher(ref: str):
        b = await asyncio.get_running_loop().run_in_executor(None, launch, ref)
        started.append(b)
        return b

    log = RequestLog(log_file)
    state = GatewayState(arms={"candidate": start}, assigner=Assigner(spec.experiment, {"candidate": 1.0}),
                         request_log=log, max_body_bytes=spec.max_body_bytes, max_tokens_limit=spec.max_tokens_limit,
                         launcher=launcher, stop_replaced=True)
    swaps: list[dict] = []
    t_begin = time.time()
    try:
        with ThreadedServer(build_app(state)) as server, \
                httpx.Client(base_url=server.url, timeout=max_rollback_s) as http:
            for i in range(IDLE_PROBES):  # one at a time, no load: the backend's idle latency, same log and clock
                http.post("/v1/chat/completions", json={"model": "candidate", "max_tokens": spec.load_max_tokens,
                                                        "messages": [{"role": "user", "content": f"Hello {i}"}]})
            t_load = time.time()
            with BackgroundLoad(server.url, spec, ["candidate"], work, max_seconds=3600) as load:
                _swaps_under_load(load, log_file, window_s, warmup_s, targets, state, http, swaps, say)
        locust = load.result
    finally:
        log.close()
        for b in started:
            b.stop()
    rows = read_requests(log_file, since=t_begin)
    failed = [r for r in rows if r["status"] != 200]  # the idle probes' too
    idle = [r["latency_ms"] for r in rows if r["ts"] < t_load and r["status"] == 200]
    rows = [r for r in rows if r["ts"] >= t_load]
    loc_fail = sum(s["num_failures"] for s in (locust or {}).get("stats", {}).values())
    for s in swaps:
        before = [r["latency_ms"] for r in rows if s["t0"] - window_s <= r["ts"] < s["t0"] and r["status"] == 200]
        during = [r for r in rows if s["t0"] <= r["ts"] < s["t1"]]
        after_rows = [r for r in rows if s["t1"] <= r["ts"] < s["t1"] + window_s]
        after = [r["latency_ms"] for r in after_rows if r["status"] == 200]
        s.update(n_before=len(before), n_during=len(during), n_after=len(after),
                 p50_before_ms=_p50(before), p50_during_ms=_p50([r["latency_ms"] for r in during if r["status"] == 200]),
                 p50_after_ms=_p50(after), served_after=dict(Counter(r["model_version"] for r in after_rows)))
        s["added_p50_ms"] = (s["p50_after_ms"] - s["p50_before_ms"]) if before and after else None
        s["added_p50_ci95"] = _median_diff_ci(after, before) if len(before) >= 5 and len(after) >= 5 else None
    p50_idle = _p50(idle)
    for s in swaps:
        s["saturated"] = bool(p50_idle and s.get("p50_before_ms") and s["p50_before_ms"] > max_load_factor * p50_idle)
    done = [s for s in swaps if s["http_status"] == 200]
    complete = len(done) == len(targets) and all(s["added_p50_ms"] is not None for s in done)
    return {"provenance": f"rollback drill under load ({spec.load_users} locust users, {spec.backend} backends, "
                          f"{len(targets)} stable versions)",
            "rollbacks": swaps, "complete": complete,
            "rollback_minutes": max(s["seconds"] for s in done) / 60 if done else None,
            "rollback_added_latency_ms": (max(s["added_p50_ms"] for s in done) if complete else None),
            "p50_idle_ms": p50_idle, "max_load_factor": max_load_factor,
            "saturated": any(s["saturated"] for s in swaps),
            "failed_requests": len(failed) + loc_fail, "failed_examples": [
                {k: r[k] for k in ("ts", "status", "error", "model_version")} for r in failed[:10]],
            "n_requests": len(rows), "locust": locust, "window_s": window_s, "seconds": time.time() - t_begin,
            "work_dir": str(work), "method": "POST /admin/swap to each target under a locust load; p50 of the "
                                             "gateway's server-side latencies in the window before vs after"}


def store_launcher(store, spec, work: Path, start_backend: Callable[[str, Path], object] | None = None):
    """``launch(ref) -> Backend`` for :func:`drill`: version ``ref`` (an id or an alias) of ``store`` checked out
    (verified, hard-linked) under ``work/versions`` and started by ``start_backend(label, folder)`` (default:
    :func:`distillgate.serve.backends.start` with ``spec``'s backend, logs under ``work/logs``)."""
    from ..serve import backends

    if start_backend is None:
        def start_backend(label, folder):
            return backends.start(spec.backend, folder, label, work / "logs", device=spec.device,
                                  timeout=spec.startup_timeout_s, threads=spec.backend_threads)
    n = [0]

    def launch(ref: str):
        v = store.resolve(int(ref) if str(ref).isdigit() else ref)
        n[0] += 1
        return start_backend(f"v{v.version_id}", v.checkout("student", work / "versions" / f"{n[0]:02d}-v{v.version_id}"))

    return launch


def drill_run(root, run_id: str, *, spec=None, n_versions: int = 3, window_s: float = 3.0,
              start_backend: Callable[[str, Path], object] | None = None, work_dir=None,
              say: Callable[[str], None] = lambda s: None) -> dict:
    """:func:`drill` on a run of the store: ``current`` served first, then each of its last ``n_versions``
    stable versions. ``start_backend(label, folder) -> Backend`` starts a backend for a checked-out version
    folder (default: :func:`distillgate.serve.backends.start` with ``spec.backend``); ``spec``: the run's
    ``loop.serving`` (a :class:`ServingSpec`) unless given."""
    from ..serve.spec import ServingSpec
    from ..store import RunStore

    with RunStore.open(root, run_id, writer=False) as store:
        cfg = store.config
        spec = spec or ServingSpec(**((cfg.get("loop") or {}).get("serving") or {}))
        stable = store.stable_versions(n_versions)
        if not stable:
            raise InputError(f"run {run_id}: no stable version (the alias 'stable' was never set): nothing to roll "
                             f"back to")
        current = store.aliases().get("current")
        if current is None:
            raise InputError(f"run {run_id}: no 'current' version to serve")
        work = Path(work_dir) if work_dir else store.dir / "serve" / f"rollback-drill-{time.strftime('%Y%m%d-%H%M%S')}"
        launch = store_launcher(store, spec, work, start_backend)
        say(f"rollback drill on run {run_id}: serving v{current}, then rolling back to "
            + ", ".join(f"v{x}" for x in stable) + " under load")
        rep = drill(launch(str(current)), [str(x) for x in stable], launch, spec, work, window_s=window_s, say=say)
    rep.update(run=run_id, current=current, stable_versions=stable)
    if len(stable) < n_versions:
        rep["note"] = f"the run has {len(stable)} stable version(s), fewer than the {n_versions} G-O5 asks for"
    return rep


def _fmt_ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def format_report(rep: dict) -> str:
    out = []
    for s in rep["rollbacks"]:
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        out.append(f"  -> v{s['to']}: HTTP {s['http_status']} in {s['seconds']:.1f} s; p50 before {f(s.get('p50_before_ms'))}"
                   f" ms, during {f(s.get('p50_during_ms'))} ms, after {f(s.get('p50_after_ms'))} ms (added "
                   f"{f(s.get('added_p50_ms'))} ms, 95% CI {_fmt_ci(s.get('added_p50_ci95'))}); served after: {s.get('served_after')}")
    out.append(f"  requests {rep['n_requests']}, failed {rep['failed_requests']}; rollback_minutes "
               f"{rep['rollback_minutes']}, rollback_added_latency_ms {rep['rollback_added_latency_ms']}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ G-O5 gates

def read_report(path) -> dict:
    """The drill report at ``path``, checked (InputError naming the file and the field)."""
    p = Path(path)
    rep = read_json_report(p, "--rollback-report", "write one with `distillgate ops rollback-drill RUN --out FILE`")
    if not isinstance(rep, dict) or any(k not in rep for k in REPORT_KEYS):
        raise InputError(f"--rollback-report {p}: needs the fields {list(REPORT_KEYS)}")
    if not isinstance(rep["rollbacks"], list) or not isinstance(rep["failed_requests"], int):
        raise InputError(f"--rollback-report {p}: 'rollbacks' must be a list and 'failed_requests' an integer")
    return rep


def _provider(metric: str):
    def fn(ctx: GateContext):
        rep = ctx.options.get("rollback_report")
        if not rep:
            ctx.details[metric] = {"note": "requires a rollback drill under load: --rollback-report FILE "
                                           "(`distillgate ops rollback-drill RUN --out FILE`)"}
            return None
        if isinstance(rep, (str, Path)):
            rep = read_report(rep)
        ctx.details[metric] = {"provenance": rep["provenance"], "failed_requests": rep["failed_requests"],
                               "rollbacks": [{k: s.get(k) for k in ("to", "seconds", "p50_before_ms", "p50_after_ms",
                                                                    "added_p50_ms", "added_p50_ci95")}
                                             for s in rep["rollbacks"]]}
        if rep["failed_requests"]:
            raise InputError(f"the rollback drill had {rep['failed_requests']} failed request(s) (G-O5 needs zero)")
        value = rep[metric]
        if value is None or not rep.get("complete", True):
            bad = [s for s in rep["rollbacks"] if s.get("http_status") != 200]
            raise InputError("the rollback drill did not complete every rollback"
                             + (f": {bad[0].get('to')} failed ({bad[0].get('error')})" if bad else
                                " (a window without requests)"))
        if not math.isfinite(float(value)):
            raise InputError(f"the rollback drill's {metric} is not finite: {value!r}")
        if metric == "rollback_added_latency_ms" and rep.get("saturated"):
            sat = next(s for s in rep["rollbacks"] if s.get("saturated"))
            raise InputError(f"the rollback drill's load saturated the backend (p50 before the rollback to "
                             f"{sat['to']}: {sat['p50_before_ms']:.0f} ms, idle {rep['p50_idle_ms']:.0f} ms, over "
                             f"{rep['max_load_factor']:g}x): latency there is queueing, and a swap resets the queue; "
                             f"lower loop.serving.load_users or load_max_tokens")
        if metric == "rollback_added_latency_ms":  # the CI of the rollback that gives the value: uncertain or not
            worst = max((s for s in rep["rollbacks"] if s.get("added_p50_ms") is not None),
                        key=lambda s: s["added_p50_ms"])
            report_size(ctx, metric, int(worst.get("n_before", 0)) + int(worst.get("n_after", 0)),
                        tuple(worst["added_p50_ci95"]) if worst.get("added_p50_ci95") else None,
                        "percentile bootstrap of median(after) - median(before) (scipy)")
        return float(value)
    fn.__qualname__ = f"rollback_metric[{metric}]"
    return fn


register_metric_provider("rollback_minutes", _provider("rollback_minutes"), higher_is_better=False, regression=False,
                         description="G-O5a: minutes of the slowest rollback to one of the last three stable "
                                     "versions, under load", tier="high", module=__name__)
register_metric_provider("rollback_added_latency_ms", _provider("rollback_added_latency_ms"), higher_is_better=False,
                         regression=False, description="G-O5b: largest p50 latency added by a rollback (after - "
                                                       "before), under load, ms", tier="high", module=__name__)
