"""`distillgate report`: render a run's HTML report (D1 radar, W1 pipeline, W5 parameter heat maps).

    distillgate report RUN [--root DIR] [--out FILE] [--save-json FILE] [--no-param-diff]
    distillgate report --from-json data.json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError, InputError

DEFAULT_ROOT = "runs"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of a run",
                       description="Write one self-contained HTML page (opens offline, no server) for a run in "
                                   "the store, or for a saved ReportData JSON.")
    p.add_argument("run", nargs="?", help="run id under --root")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"folder holding the runs (default: {DEFAULT_ROOT})")
    p.add_argument("--from-json", metavar="FILE", help="render a saved ReportData JSON instead of a run")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default: <root>/<run>/report.html, or "
                                                  "the JSON's name with .html)")
    p.add_argument("--save-json", metavar="FILE", help="also write the ReportData read from the store as JSON")
    p.add_argument("--no-param-diff", action="store_true",
                   help="skip the per-layer parameter differences (reads no model weights)")
    p.set_defaults(func=run)


def _validate(args) -> None:
    if (args.run is None) == (args.from_json is None):
        raise ConfigError("RUN / --from-json", {"run": args.run, "from_json": args.from_json},
                          "exactly one: a run id, or --from-json FILE")
    if args.from_json and args.save_json:
        raise ConfigError("--save-json", args.save_json, "only with a RUN (the input already is JSON)")
    if args.out and Path(args.out).is_dir():
        raise ConfigError("--out", args.out, "a file path, not a folder")
    if args.from_json and not Path(args.from_json).is_file():
        raise InputError(f"--from-json {args.from_json}: no such file")


def run(args) -> int:
    _validate(args)
    from ..io import atomic_write_json
    from ..report import ReportData, render_report

    if args.from_json:
        try:
            raw = json.loads(Path(args.from_json).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"--from-json {args.from_json}: not readable JSON ({e})") from e
        data = ReportData.from_dict(raw)
        out = Path(args.out) if args.out else Path(args.from_json).with_suffix(".html")
    else:
        from ..report.from_store import load_report_data

        data = load_report_data(args.root, args.run, param_diffs=not args.no_param_diff)
        out = Path(args.out) if args.out else Path(args.root) / args.run / "report.html"
        if args.save_json:
            atomic_write_json(args.save_json, data.to_dict())
    path = render_report(data, out)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, {len(data.iterations)} iterations)")
    return 0
