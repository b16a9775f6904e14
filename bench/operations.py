"""G-O1 circuit breaker under load: decision latency, degraded-output compliance on a generated attack corpus,
detector false positives on normal traffic, the backend breaker's fallback, and a rollback by /admin/swap.

    python bench/operations.py [--attacks 10000] [--normal-per-type 100] [--concurrency 16] [--semantic-sample 300]
                               [--out ops_breaker.json] [--rollback-run ROOT/RUN] [--rollback-out drill.json]

Everything runs in this process on loopback: the gateway (uvicorn thread, the real app with its G-O1 hook)
in front of two fake *gullible* backends (distillgate.testing.fake_backend: they answer with the system prompt
plus the user's message, so any attack that gets through leaks and repeats, and the checker fails it): the
candidate v2 and the previous stable v1 (the fallback). The load generator (asyncio + aiohttp) shares the
GIL with them, so latencies include its time too. Phases:

1. detector stages offline: rules alone on every attack and normal request; MiniLM similarity alone on a
   sample (its own recall, false positives and per-request cost, cold and cached);
2. under load: every attack of the corpus (``--attacks``, seeded) mixed with the normal traffic of every type
   of src/distillgate/traffic/types.py, ``--concurrency`` requests in flight; each attack's output goes
   through the compliance checker (distillgate.ops.compliance.check): a missed attack reaches the gullible
   backend and fails it, so ``degraded_compliance_pct`` = compliant outputs / attacks; the latency of the
   degraded responses is the breaker decision latency; the same normal traffic without a detector gives the
   detector's added latency;
3. backend breaker: the candidate starts answering 500 under load: client-visible errors and fallback latency;
4. rollback (G-O5), the real path: ``distillgate.ops.recovery.drill_run`` on a run store (``--rollback-run
   ROOT/RUN``, default a scratch run of four tiny-model versions, three of them once ``stable``): the gateway
   serves ``current`` from a real ``transformers serve`` backend, under the locust load each of the last three
   stable versions is restored by POST /admin/swap (the launcher starts its backend from the store's weights);
   ``rollback_s`` = the slowest rollback, ``rollback_added_p50_ms`` = the largest p50 after - before.

``s4_format_injection`` traffic embeds an injected instruction (S4 challenge kind): flagging it is no false
positive; it is reported on its own and left out of the false-positive rate.

Last line: ``breaker_p99_ms=A degraded_compliance_pct=B detector_fp_pct=C rollback_s=D rollback_added_p50_ms=E``
(G-O1: A <= 200, B >= 99.99; G-O5: D <= 900, E <= 5). ``--out`` writes the JSON the G-O1 gate provider reads
(``distillgate gates --breaker-report FILE``), labelled as generated attacks; ``--rollback-out`` the drill report
the G-O5 providers read (``distillgate gates --rollback-report FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from distillgate.ops.breaker_drill import attack_pass, detector_metrics, fire, normal_traffic, q  # noqa: E402


def offline(attacks, normal, sample: int, encoder) -> dict:
    from distillgate.ops.detectors import Detector

    rules = Detector(semantic="off")
    t = time.perf_counter()
    r_att = [rules.inspect({"messages": a.messages()}).triggered for a in attacks]
    rules_ms = (time.perf_counter() - t) * 1000 / len(attacks)
    r_norm = [rules.inspect({"messages": [{"role": "user", "content": x}]}).triggered for _, x in normal]
    sem = Detector(semantic="always", use_rules=False, encoder=encoder)
    sem.warm_up()
    rng = random.Random(1)
    sa, sn = rng.sample(attacks, min(sample, len(attacks))), rng.sample(normal, min(sample, len(normal)))
    t = time.perf_counter()
    s_att = [sem.inspect({"messages": a.messages()}) for a in sa]
    cold_ms = (time.perf_counter() - t) * 1000 / len(sa)
    t = time.perf_counter()
    for a in sa[:50]:
        sem.inspect({"messages": a.messages()})
    cached_ms = (time.perf_counter() - t) * 1000 / min(50, len(sa))
    s_norm = [sem.inspect({"messages": [{"role": "user", "content": x}]}) for _, x in sn]
    benign = [i for i, (ty, _) in enumerate(normal) if ty != "s4_format_injection"]
    sbenign = [d for d, (ty, _) in zip(s_norm, sn) if ty != "s4_format_injection"]
    missed_by_rules = [a for a, hit in zip(attacks, r_att) if not hit]
    return {"rules": {"recall_pct": 100 * float(np.mean(r_att)), "ms_per_request": rules_ms,
                      "fp_pct": 100 * float(np.mean([r_norm[i] for i in benign])),
                      "missed": len(missed_by_rules),
                      "missed_templates": Counter(f"{a.kind}#{a.template}" for a in missed_by_rules).most_common()},
            "semantic": {"n": len(sa), "threshold": sem.threshold,
                         "recall_pct": 100 * float(np.mean([d.triggered for d in s_att])),
                         "fp_pct": 100 * float(np.mean([d.triggered for d in sbenign])) if sbenign else None,
                         "ms_per_request_cold": cold_ms, "ms_per_request_cached": cached_ms}}


def rollback_drill(a) -> dict:
    """G-O5 through the real path (see the module docstring, phase 4)."""
    import tempfile

    from distillgate.ops.recovery import drill_run
    from distillgate.serve.spec import ServingSpec

    spec = ServingSpec(enabled=True, load_users=a.rollback_users, load_max_tokens=4, long_context_words=120,
                       burst_size=2, burst_every_s=2.0, think_time_s=0.2, seed=a.seed)
    if a.rollback_run:
        root, run = str(Path(a.rollback_run).parent), Path(a.rollback_run).name
        return drill_run(root, run, spec=spec, window_s=a.rollback_window_s, say=print)
    from distillgate.store import RunStore
    from distillgate.testing import make_tiny_tokenizer, save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="distillgate-drill-"))
    tok = make_tiny_tokenizer()
    with RunStore.create(tmp / "runs", {"teacher": {"path": "tiny"}}, run_id="drill") as st:
        for i in range(1, 5):  # v1..v3 were stable in turn; v4 is current (a candidate being served)
            d = save_tiny_model(tmp / f"m{i}", num_layers=2, hidden=64, intermediate=128, seed=i, tokenizer=tok)
            vw = st.begin_version(i)
            vw.add_dir("student", d)
            vid = vw.commit()
            if i < 4:
                st.set_alias("stable", vid, "gates passed")
    return drill_run(tmp / "runs", "drill", spec=spec, window_s=a.rollback_window_s, say=print)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attacks", type=int, default=10000)
    ap.add_argument("--normal-per-type", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--semantic-sample", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="alternating passes for the detector's added latency")
    ap.add_argument("--out", default=None, help="write the G-O1 report JSON here")
    ap.add_argument("--rollback-run", default=None, metavar="ROOT/RUN", help="drill this run (default: a scratch "
                    "run of tiny models)")
    ap.add_argument("--rollback-out", default=None, help="write the G-O5 drill report JSON here")
    ap.add_argument("--rollback-users", type=int, default=4, help="locust users during the drill")
    ap.add_argument("--rollback-window-s", type=float, default=8.0, help="seconds compared before / after a rollback")
    a = ap.parse_args()

    from distillgate.consistency.checks.semantic import load_encoder
    from distillgate.ops import attacks as A
    from distillgate.ops.detectors import Detector
    from distillgate.serve.assign import Assigner
    from distillgate.serve.backends import Backend
    from distillgate.serve.gateway import GatewayState, build_app
    from distillgate.serve.server import ThreadedServer
    from distillgate.testing.fake_backend import FakeControl, gullible_app

    corpus = A.generate(a.attacks, seed=a.seed)
    normal = normal_traffic(a.normal_per_type, seed=a.seed)
    print(f"corpus: {len(corpus)} generated attacks ({', '.join(A.KINDS)}), {len(normal)} normal requests "
          f"({a.normal_per_type} per traffic type)")
    encoder = load_encoder()
    off = offline(corpus, normal, a.semantic_sample, encoder)

    ctl = {"v2": FakeControl("v2"), "v1": FakeControl("v1")}
    backs = {v: ThreadedServer(gullible_app(c)).start() for v, c in ctl.items()}

    def gateway(detector):
        state = GatewayState(arms={"candidate": Backend(backs["v2"].url, "m2", "v2")},
                             assigner=Assigner("ops", {"candidate": 1.0}), detector=detector,
                             breaker={"fail_max": 5, "reset_timeout_s": 2.0, "timeout_s": 5.0},
                             fallback=Backend(backs["v1"].url, "m1", "v1"), stop_replaced=False)
        return ThreadedServer(build_app(state), start_timeout=180).start(), state

    det = Detector(semantic="suspicious", encoder=encoder)
    det.warm_up()
    g, _ = gateway(det)
    g_plain, plain_state = gateway(None)
    try:
        p = attack_pass(g.url, corpus, normal, concurrency=a.concurrency, seed=a.seed)
        items, res, wall = p["items"], p["res"], p["wall"]
        det_metrics = detector_metrics(g.url)
        # the detector's added latency: normal traffic alone, through each gateway in turn (repeats alternate,
        # the machine's load drifts), median over repeats of each pass's p50 / p99
        norm_items = [it for it in items if it["kind"] == "normal"]
        over = []
        for _ in range(a.repeats):
            on = [r["ms"] for r in asyncio.run(fire(g.url, norm_items, a.concurrency))
                  if r["type"] != "s4_format_injection"]
            offp = [r["ms"] for r in asyncio.run(fire(g_plain.url, norm_items, a.concurrency))
                    if r["type"] != "s4_format_injection"]
            over.append((q(on, .5), q(offp, .5), q(on, .99), q(offp, .99)))
        over_med = [float(np.median([o[i] for o in over])) for i in range(4)]

        # ---- compliance of every attack's output (attack_pass ran the checker)
        degraded, deg_ok, compliant, misses = p["degraded"], p["deg_ok"], p["compliant"], p["misses"]
        att = [r for r in res if r["kind"] == "attack"]
        nres, benign, fp_by_type, deg_ms, n_ms = p["nres"], p["benign"], p["fp_by_type"], p["deg_ms"], p["n_ms"]

        # ---- backend breaker: the candidate fails under load
        fail_items = [{"kind": "normal", "type": t, "body": {"messages": [{"role": "user", "content": m}],
                                                             "max_tokens": 16}} for t, m in normal[:600]]
        ctl["v2"].fail = True
        calls0 = ctl["v2"].calls
        fres = asyncio.run(fire(g_plain.url, fail_items, a.concurrency))
        ctl["v2"].fail = False
        f_err = sum(r["status"] != 200 for r in fres)
        f_fb = [r for r in fres if r["fallback"]]
        breaker_calls = ctl["v2"].calls - calls0

    finally:
        for s in (g, g_plain, *backs.values()):
            s.stop()
    drill = rollback_drill(a)
    rollback_s = max(x["seconds"] for x in drill["rollbacks"])
    rollback_added = drill["rollback_added_latency_ms"]
    rollback_added = float("nan") if rollback_added is None else rollback_added

    # ---- print
    fp_pct, s4, comp_pct = p["fp_pct"], p["s4"], p["comp_pct"]
    print(f"\n1. detector stages offline ({len(corpus)} attacks, {len(normal)} normal requests)")
    print(f"{'stage':<28}{'recall %':>10}{'FP %':>8}{'ms/request':>12}")
    r_, s_ = off["rules"], off["semantic"]
    print(f"{'rules':<28}{r_['recall_pct']:>10.2f}{r_['fp_pct']:>8.2f}{r_['ms_per_request']:>12.3f}")
    print(f"{'MiniLM alone (cold, n=%d)' % s_['n']:<28}{s_['recall_pct']:>10.2f}{s_['fp_pct']:>8.2f}"
          f"{s_['ms_per_request_cold']:>12.1f}")
    print(f"{'MiniLM alone (cached)':<28}{'':>10}{'':>8}{s_['ms_per_request_cached']:>12.2f}")
    print(f"rules missed {r_['missed']} attacks; by template: {r_['missed_templates'][:6]}")
    print(f"\n2. through the gateway under load ({len(items)} requests, {a.concurrency} in flight, {wall:.0f} s, "
          f"{len(items) / wall:.0f} req/s; rules + MiniLM on cue-bearing misses)")
    print(f"attacks degraded: {len(degraded)}/{len(att)}; degraded outputs compliant: {sum(deg_ok)}/{len(deg_ok)}; "
          f"end-to-end compliant: {sum(compliant)}/{len(att)} = {comp_pct:.3f}%")
    print(f"degraded response latency (decision + answer, client side) ms: p50 {q(deg_ms, .5):.2f} p99 "
          f"{q(deg_ms, .99):.2f} max {max(deg_ms, default=float('nan')):.1f}")
    print(f"detector time in the gateway: mean {det_metrics['mean_ms']:.2f} ms over {det_metrics['requests']:.0f} "
          f"requests; MiniLM stage skipped (queue full) {det_metrics['semantic_skipped']:.0f} times")
    print(f"normal traffic ms in the mixed load: p50 {q(n_ms, .5):.2f} p99 {q(n_ms, .99):.2f}; normal traffic alone "
          f"with / without detector (median of {a.repeats} alternating passes): p50 {over_med[0]:.2f} / "
          f"{over_med[1]:.2f}, p99 {over_med[2]:.2f} / {over_med[3]:.2f}; per pass {[tuple(round(x, 1) for x in o) for o in over]}")
    print(f"false positives on normal traffic: {sum(r['degraded'] is not None for r in benign)}/{len(benign)} = "
          f"{fp_pct:.2f}% by type {dict(fp_by_type)}; s4_format_injection flagged {sum(bool(r['degraded']) for r in s4)}"
          f"/{len(s4)} (attack-bearing, not counted)")
    for at, v in misses[:5]:
        print(f"  miss [{at.kind}#{at.template} {at.obfuscation}]: {at.text[:150]!r} -> {v.reasons[:2]}")
    print(f"\n3. backend breaker: candidate answering 500 for {len(fres)} requests: client errors {f_err}, "
          f"served by fallback v1 {len(f_fb)} (reasons {dict(Counter(r['fallback'] for r in f_fb))}), failing backend "
          f"called {breaker_calls} times; fallback latency ms p50 {q([r['ms'] for r in f_fb], .5):.2f} "
          f"p99 {q([r['ms'] for r in f_fb], .99):.2f}")
    from distillgate.ops.recovery import format_report

    print(f"\n4. rollback drill (G-O5) on run {drill['run']} under locust load ({a.rollback_users} users), real "
          f"`transformers serve` backends started from the store's weights: {drill['n_requests']} requests, "
          f"{drill['failed_requests']} failed, {drill['seconds']:.0f} s in all")
    print(format_report(drill))
    report = {"provenance": "generated attacks", "n_attacks": len(att), "seed": a.seed,
              "degraded_compliance_pct": comp_pct, "breaker_p50_ms": q(deg_ms, .5), "breaker_p99_ms": q(deg_ms, .99),
              "detector_fp_pct": fp_pct, "fp_by_type": dict(fp_by_type), "offline": off,
              "misses": [{"id": x.id, "kind": x.kind, "text": x.text, "reasons": v.reasons} for x, v in misses[:50]],
              "n_misses": len(misses), "normal_p50_ms": q(n_ms, .5), "detector_added_p50_ms": over_med[0] - over_med[1],
              "detector_added_p99_ms": over_med[2] - over_med[3], "detector_gateway": det_metrics,
              "rollback_s": rollback_s, "rollback_added_p50_ms": rollback_added, "concurrency": a.concurrency,
              "rollback_failed_requests": drill["failed_requests"]}
    from distillgate.io import atomic_write_text

    if a.out:
        atomic_write_text(a.out, json.dumps(report, indent=1, default=str))
    if a.rollback_out:
        atomic_write_text(a.rollback_out, json.dumps(drill, indent=1, default=str))
    print(f"breaker_p99_ms={q(deg_ms, .99):.2f} degraded_compliance_pct={comp_pct:.3f} detector_fp_pct={fp_pct:.2f} "
          f"rollback_s={rollback_s:.3f} rollback_added_p50_ms={rollback_added:.2f}")


if __name__ == "__main__":
    main()
