"""`distillgate runs list|show|repair|gc`: what the run store holds (list/show are read-only and safe while a run
is writing; repair rebuilds a damaged catalog from the version manifests and gc applies the retention policy;
both take the writer lock)."""

from __future__ import annotations

import time

DEFAULT_ROOT = "runs"


def _t(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "-"


def register(sub) -> None:
    p = sub.add_parser("runs", help="list runs or show one run's iterations, versions, gates and alerts")
    rsub = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    pl = rsub.add_parser("list", help="one line per run under --root")
    pl.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the runs (default: ./runs)")
    pl.set_defaults(func=run_list)
    ps = rsub.add_parser("show", help="iterations with phase timings, versions with aliases, last gates, alerts")
    ps.add_argument("run", help="run id")
    ps.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the runs (default: ./runs)")
    ps.set_defaults(func=run_show)
    pr = rsub.add_parser("repair", help="rebuild a damaged catalog.sqlite from the run's version manifests "
                                        "(the old file is kept beside it)")
    pr.add_argument("run", help="run id")
    pr.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the runs (default: ./runs)")
    pr.set_defaults(func=run_repair)
    pg = rsub.add_parser("gc", help="apply the retention policy (store.retention of the run's config, or "
                                    "--keep-last): prune old versions' weights, delete unreferenced blobs")
    pg.add_argument("run", help="run id")
    pg.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the runs (default: ./runs)")
    pg.add_argument("--keep-last", type=int, default=None, metavar="N",
                    help="versions to keep, newest first (>= 2; default: the run's store.retention.keep_last)")
    pg.add_argument("--dry-run", action="store_true", help="show what would be kept and pruned; change nothing")
    pg.set_defaults(func=run_gc)


def retention_of(config: dict, keep_last: int | None = None):
    """The run's :class:`~distillgate.config.RetentionSpec` (its config's ``store.retention``; a run created
    before retention existed gets the defaults), with ``keep_last`` overridden when given (validated)."""
    from pydantic import ValidationError

    from ..config import RetentionSpec, _validation_to_config_error
    from ..errors import ConfigError

    raw = dict(((config or {}).get("store") or {}).get("retention") or {})
    if keep_last is not None:
        raw["keep_last"] = keep_last
    try:
        return RetentionSpec.model_validate(raw)
    except ValidationError as e:
        err = _validation_to_config_error(e, raw)
        field = "--keep-last" if keep_last is not None and err.field == "keep_last" else \
            "store.retention" + ("" if err.field == "<config>" else f".{err.field}")
        raise ConfigError(field, err.value, err.allowed) from None


def run_gc(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..store import RunStore

    con = Console(width=140)
    with RunStore.open(args.root, args.run, writer=not args.dry_run) as store:
        pol = retention_of(store.config, args.keep_last)
        before = store.disk_usage()
        if pol.keep_last is None:
            if args.dry_run:
                print(f"run {args.run}: no retention policy (store.retention.keep_last unset, no --keep-last): "
                      f"every version is kept; gc would only delete unreferenced blobs")
                return 0
            blobs, freed = store.gc()
            print(f"run {args.run}: no retention policy (store.retention.keep_last unset, no --keep-last): every "
                  f"version kept; {blobs} unreferenced blob(s) deleted, {freed / 1e6:.1f} MB freed")
            return 0
        plan = store.retention_plan(pol.keep_last, pol.keep_aliases, pol.keep_referenced)
        t = Table("version", "iteration", "kind", "MB", "kept because", title=f"retention of run {args.run} "
                  f"(keep_last={pol.keep_last}, keep_aliases={pol.keep_aliases}, "
                  f"keep_referenced={pol.keep_referenced})")
        for v in store.catalog.version_rows(status=None):
            if v["status"] == "pruned":
                continue
            why = plan["keep"].get(v["version_id"])
            t.add_row(f"v{v['version_id']}", str(v["iteration"]), v["kind"], f"{v['bytes'] / 1e6:.1f}",
                      ", ".join(dict.fromkeys(why)) if why else "[red]pruned[/]")
        con.print(t)
        if args.dry_run:
            print(f"dry run: would prune {len(plan['prune'])} version(s) {plan['prune'][:20]}"
                  + (f", drop aliases {plan['drop_aliases']}" if plan["drop_aliases"] else "") + "; nothing changed")
            return 0
        pruned = store.prune(pol.keep_last, pol.keep_aliases, pol.keep_referenced)
        after = store.disk_usage()
    print(f"run {args.run}: pruned {len(pruned)} version(s) {pruned[:20]}; blobs {before['blobs']} -> "
          f"{after['blobs']}, {before['blob_bytes'] / 1e6:.1f} MB -> {after['blob_bytes'] / 1e6:.1f} MB on disk")
    return 0


def run_repair(args) -> int:
    from ..store import RunStore
    from ..store.repair import rebuild_catalog

    r = rebuild_catalog(args.root, args.run)
    rebuilt = 0
    try:  # the loop's rows (metrics, gates, findings, decisions) come back from each version's JSON files
        from ..loop import repair_catalog
    except ImportError:
        repair_catalog = None
    if repair_catalog is not None and r["versions"]:
        with RunStore.open(args.root, args.run, writer=True) as store:
            for vid in r["versions"]:
                rebuilt += bool(repair_catalog(store, store.get_version(vid)))
    print(f"run {args.run}: catalog rebuilt from {len(r['versions']) + len(r['corrupt'])} version manifests "
          f"({len(r['corrupt'])} corrupt{', ' + str(r['corrupt']) if r['corrupt'] else ''}); current -> "
          f"v{r['current']}; records restored for {rebuilt} version(s); old catalog kept as "
          f"{', '.join(r['kept']) or 'nothing (none was there)'}")
    return 0


def run_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..store import list_runs

    rows = list_runs(args.root)
    if not rows:
        print(f"no runs under {args.root}")
        return 0
    table = Table("run", "created (UTC)", "iterations", "versions", "status", "converged", "best iteration",
                  "current")
    for r in rows:
        table.add_row(r["run_id"], _t(r["created"]), str(r["iterations"]), str(r["versions"]), r["status"],
                      "yes" if r["converged"] else "no",
                      "-" if r["best_iteration"] is None else str(r["best_iteration"]),
                      "-" if r["current"] is None else f"v{r['current']}")
    Console(width=140).print(table)
    return 0


def run_show(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..gates import provenance_label
    from ..store import RunStore

    con = Console(width=140)
    with RunStore.open(args.root, args.run, writer=False) as store:
        info, cat = store.info(), store.catalog
        con.print(f"run {info['run_id']}  created {_t(info['created'])} UTC  status {info['status']}  "
                  f"converged {'yes' if info['converged'] else 'no'}", highlight=False)
        w = store.writer_info()
        if w:
            state = {True: "running", False: "not running (died without releasing; the lock is free)",
                     None: "on another host"}[w["alive"]]
            con.print(f"writer: pid {w.get('pid')} on {w.get('host')} since {_t(w.get('since'))} UTC, {state}",
                      highlight=False)
        its = cat.iterations()
        phases = list(dict.fromkeys(p for it in its for p in it["phases"]))
        t = Table("iteration", "status", *phases, "total s", title="iterations (phase seconds)")
        for it in its:
            cells = [f"{it['phases'][p]['seconds']:.1f}" + ("" if it["phases"][p]["status"] == "ok" else
                     f" ({it['phases'][p]['status']})") if p in it["phases"] else "-" for p in phases]
            total = sum(p["seconds"] for p in it["phases"].values())
            t.add_row(str(it["iteration"]), it["status"], *cells, f"{total:.1f}")
        con.print(t)
        by_version: dict[int, list[str]] = {}
        for name, vid in store.aliases().items():
            by_version.setdefault(vid, []).append(name)
        t = Table("version", "iteration", "parent", "kind", "created (UTC)", "status", "files", "MB", "aliases",
                  title="versions")
        for v in cat.version_rows(status=None):
            t.add_row(f"v{v['version_id']}", str(v["iteration"]), "-" if v["parent"] is None else f"v{v['parent']}",
                      v["kind"], _t(v["created"]), v["status"], str(v["n_files"]), f"{v['bytes'] / 1e6:.1f}",
                      ", ".join(sorted(by_version.get(v["version_id"], []))))
        con.print(t)
        du = store.disk_usage()
        con.print(f"disk: {du['blob_bytes'] / 1e6:.1f} MB in {du['blobs']} blobs for "
                  f"{du['version_bytes'] / 1e6:.1f} MB of version files (identical files are stored once)",
                  highlight=False)
        gated = cat.last_gated_version()
        if gated is not None:
            t = Table("gate", "dimension", "value", "threshold", "status", "note", title=f"gate results of v{gated}")
            for g in cat.gate_results(gated):
                # the verdict's own status (pass / fail / missing / not_measured) when the row kept it
                status = str(g.detail.get("status") or ("pass" if g.passed else "fail")).upper().replace("_", " ")
                note, prov = str(g.detail.get("note") or ""), g.detail.get("provenance")
                if prov and g.value is not None:  # what a measured traffic / drill gate stands on
                    note = provenance_label(str(prov)) + (f"; {note}" if note else "")
                t.add_row(g.gate, g.dimension, "-" if g.value is None else f"{g.value:.4g}",
                          "-" if g.threshold is None else f"{g.threshold:.4g}", status, note)
            m = store.get_version(gated)
            m = m.load_json("metrics.json").get("student", {}) if "metrics.json" in m.files else {}
            for name, note in (("flops_ratio", "forward FLOPs/token student / teacher, analytic (S3.3)"),
                               ("params_ratio", "parameters student / teacher (S3.3)")):
                if isinstance(m.get(name), (int, float)):
                    t.add_row(name, "performance", f"{m[name]:.4g}", "-", "INFO", note)
            con.print(t)
        _structure_table(con, store)
        _strategy_table(con, store)
        alerts = cat.alerts()
        if alerts:
            t = Table("time (UTC)", "level", "source", "version", "message", title=f"alerts (last 20 of {len(alerts)})")
            for a in alerts[-20:]:
                t.add_row(_t(a["time"]), a["level"], a["source"],
                          "-" if a["version_id"] is None else f"v{a['version_id']}",
                          a["message"])
            con.print(t)
    return 0


def _structure_table(con, store) -> None:
    """Structure and FLOPs per iteration (S3.3), when the structure changed during the run (a prune stage)."""
    from rich.table import Table

    from ..report import structure as S
    from ..report.from_store import versions_by_iteration

    snaps = S.snapshots(store, versions_by_iteration(store.versions()))
    if not S.changed(snaps):
        return
    t = Table(*S.FLOPS_HEADER, title="structure and FLOPs per token (analytic) per iteration")
    for row in S.flops_rows(snaps):
        t.add_row(*row)
    con.print(t)


def _strategy_table(con, store) -> None:
    """What the strategy learned (issue 16): per knob, moves tried / kept / reverted, verdicts, exploration
    trials and the measured effect with its spread, from the current version's loop state."""
    from rich.table import Table

    from ..knobs import effect_table
    from ..report.strategy import EFFECT_HEADER, MOVES_HEADER, effect_rows, move_rows

    try:
        v = store.resolve("current")
    except Exception:  # noqa: BLE001  (no version yet)
        return
    if "loop_state.json" not in v.files:
        return
    data = v.load_json("loop_state.json").get("strategy") or {}
    rows = effect_table(data)
    if not rows:
        return
    t = Table(*MOVES_HEADER, title="decisions and their measured effects (newest 20)")
    for cells in move_rows(data.get("moves") or [], last=20):
        t.add_row(*cells)
    con.print(t)
    t = Table(*EFFECT_HEADER, title="what the strategy learned (measured effect per move up: mean ± sd, n)")
    for cells in effect_rows(rows):
        t.add_row(*cells)
    con.print(t)
