"""Retention of a run's versions (``store.retention``, ``distillgate runs gc``): which versions a purge keeps, and why.

The purge itself is :meth:`RunStore.prune <distillgate.store.RunStore.prune>` (crash-safe: one transaction marks
the versions, then their files are deleted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ArtifactError, ConfigError
from .versions import read_version

if TYPE_CHECKING:
    from .store import RunStore


def plan(store: "RunStore", keep_last: int, keep_aliases: bool = True, keep_referenced: bool = True) -> dict:
    """Which versions a purge with this policy keeps, and why: ``{"keep": {id: [reasons]}, "prune": [ids],
    "drop_aliases": [names]}`` (nothing is changed). Always kept: the newest ``keep_last`` versions,
    ``current``, the last three ``stable`` versions (G-O5) and the versions the current loop state names
    (its last good and best iterations: a prune stage restores the last good weights). ``keep_aliases``:
    also every other alias target. ``keep_referenced``: also every version whose gates all passed and every
    version a kept rollback restored (its ``rollback_to``)."""
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 2:
        raise ConfigError("store.retention.keep_last", keep_last,
                          "an integer >= 2 (keep_last=1 would keep only the newest version, leaving nothing "
                          "to roll back to)")
    rows = [r for r in store.catalog.version_rows(status=None) if r["status"] != "pruned"]
    live = {r["version_id"]: r for r in rows}
    keep: dict[int, list[str]] = {}

    def add(vid, why):
        if vid in live:
            keep.setdefault(vid, []).append(why)

    for r in rows[-keep_last:]:
        add(r["version_id"], f"newest {keep_last}")
    aliases = store.aliases()
    for name, vid in sorted(aliases.items()):
        if name == "current" or keep_aliases:
            add(vid, f"alias {name}")
    for vid in store.stable_versions():
        add(vid, "last 3 stable (G-O5)")
    cur = aliases.get("current")
    if cur in live and live[cur]["status"] == "committed":
        try:
            v = read_version(store.dir, store.blobs, live[cur])
            st = v.load_json("loop_state.json") if "loop_state.json" in v.files else {}
        except (ArtifactError, ValueError):
            st = {}
        for key in ("last_good", "best"):
            ref = (st.get(key) or {}).get("version") if isinstance(st.get(key), dict) else None
            if isinstance(ref, int):
                add(ref, f"loop state {key}")
    if keep_referenced:
        for (vid,) in store.catalog.q("SELECT version_id FROM gate_results GROUP BY version_id "
                                     "HAVING MIN(passed) = 1"):
            add(vid, "gates all passed")
        todo = [v for v in keep if live[v]["kind"] == "rollback"]
        while todo:                    # a rollback's target may itself be a rollback
            v = todo.pop()
            target = live[v]["parent"]
            if target in live and target not in keep:
                add(target, f"rollback target of v{v}")
                if live[target]["kind"] == "rollback":
                    todo.append(target)
            elif target in keep:
                keep[target].append(f"rollback target of v{v}")
    doomed = [v for v in live if v not in keep]
    drop = sorted(n for n, v in aliases.items() if v in doomed)
    return {"keep": keep, "prune": doomed, "drop_aliases": drop}
