"""`distillgate drift LOG`: the G-O2 daily drift job on a traffic event log, outside the loop (a cron job, a
look at a real log); in a run the `drift` stage does the same and seeds the recalibration."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("drift", help="daily knowledge drift (G-O2) of a traffic event log, and whether it triggers "
                                     "a recalibration")
    p.add_argument("log", help="JSONL traffic event log (traffic/events.py schema)")
    p.add_argument("--unseen", nargs="+", default=None, metavar="DOMAIN",
                   help="domains the student was not distilled on (default: every domain)")
    p.add_argument("--threshold", type=float, default=None,
                   help="daily KL threshold (default: the G-O2 gate's in --spec)")
    p.add_argument("--spec", default=None, help="gate spec YAML (default: the shipped one)")
    p.add_argument("--days", type=int, default=3, help="consecutive days above the threshold that trigger")
    p.add_argument("--arm", default="candidate", help="the student's arm in the log")
    p.add_argument("--release", type=float, default=None, help="unix time of the release (default: first event)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import InputError
    from ..gates import load_gate_spec
    from ..ops.clock import WallClock
    from ..ops.drift import DriftOptions, daily_drift, format_days
    from ..traffic.events import read_events

    if not Path(args.log).is_file():
        raise InputError(f"{args.log}: traffic log not found")
    thr = args.threshold
    if thr is None:
        gate = next((g for g in load_gate_spec(args.spec).gates if g.metric == "drift_kl_min_3day"), None)
        if gate is None:
            raise InputError("--threshold: the gate spec has no drift_kl_min_3day (G-O2) gate to take it from")
        thr = gate.threshold
    opts = DriftOptions(threshold=thr, consecutive_days=args.days, unseen_domains=args.unseen, arm=args.arm)
    rep = daily_drift(read_events(args.log), opts, release_ts=args.release, until=WallClock().now())
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{args.log}: {len(rep['days'])} complete day(s) after the reference ({rep['provenance']}), "
              f"threshold {thr:g}")
        print(format_days(rep))
        print(f"recalibration triggered on day {rep['trigger_day']}" if rep["trigger_day"] is not None else
              "no recalibration: never " + f"{args.days} days in a row above the threshold")
    return 0
