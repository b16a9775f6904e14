"""`distillgate rollback RUN --to ITER`: a new version whose parent is that iteration's version (nothing is
overwritten; blobs are shared), and `current` moves to it."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("rollback", help="roll a run back to an earlier iteration (or version) as a new version")
    p.add_argument("run", help="run id")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", type=int, metavar="ITER", help="iteration to roll back to (its newest version)")
    target.add_argument("--to-version", type=int, metavar="V", help="exact version id to roll back to")
    p.add_argument("--reason", default="", help="why (recorded with the alias move)")
    p.add_argument("--root", default="runs", help="folder holding the runs (default: ./runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..store import RunStore

    with RunStore.open(args.root, args.run, writer=True) as store:
        before = store.aliases().get("current")
        t0 = time.perf_counter()
        vid = store.rollback(iteration=args.to, version=args.to_version, reason=args.reason or "distillgate rollback")
        seconds = time.perf_counter() - t0
        v = store.get_version(vid)
        print(f"run {store.run_id}: new version v{vid} (iteration {v.iteration}, parent v{v.parent}, "
              f"{len(v.files)} files shared) in {seconds * 1000:.1f} ms")
        print(f"current: v{before} -> v{store.aliases()['current']}")
    return 0
