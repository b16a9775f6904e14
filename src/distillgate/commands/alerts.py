"""`distillgate alerts RUN`: the run's alerts and the work orders they raised (SPEC D2), open and closed."""

from __future__ import annotations

import json
import time


def _t(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "-"


def register(sub) -> None:
    p = sub.add_parser("alerts", help="a run's alerts and work orders (location, impact, fix, verification)")
    p.add_argument("run", help="run id")
    p.add_argument("--root", default="runs", help="folder holding the runs (default: ./runs)")
    p.add_argument("--status", choices=("open", "closed", "all"), default="all", help="work orders to list")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..store import RunStore

    with RunStore.open(args.root, args.run) as store:
        cat = store.catalog
        alerts = cat.alerts()
        orders = cat.work_orders(None if args.status == "all" else args.status)
        converged = cat.run_row()["converged"]
    if args.json:
        print(json.dumps({"run": args.run, "converged": converged, "alerts": alerts, "work_orders": orders},
                         indent=1, default=str))
        return 0
    con = Console()
    t = Table(title=f"alerts of run {args.run} ({len(alerts)})")
    for c in ("id", "time", "level", "source", "message"):
        t.add_column(c, overflow="fold")
    for a in alerts:
        color = "red" if a["level"] == "error" else ("yellow" if a["level"] == "warning" else "")
        t.add_row(str(a["id"]), _t(a["time"]), f"[{color}]{a['level']}[/]" if color else a["level"], a["source"],
                  a["message"])
    con.print(t)
    w = Table(title=f"work orders ({args.status}: {len(orders)})")
    for c in ("id", "dimension", "status", "opened", "closed", "location", "impact", "suggested fix", "verification"):
        w.add_column(c, overflow="fold")
    for o in orders:
        ver = ", ".join(o["verification"]["gates"]) + " pass"
        w.add_row(str(o["id"]), o["dimension"], "[green]closed[/]" if o["status"] == "closed" else "[red]open[/]",
                  _t(o["opened"]), _t(o["closed"]), o["location"], o["impact"], o["suggested_fix"],
                  ver + (f"; {o['closed_by']}" if o["closed_by"] else ""))
    con.print(w)
    n_open = sum(o["status"] == "open" for o in orders)
    con.print(f"{n_open} open, {len(orders) - n_open} closed; run converged (D3): {'yes' if converged else 'no'}")
    return 0

