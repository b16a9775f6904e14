"""Rebuild a run's catalog from what the run folder itself holds (``distillgate runs repair RUN``).

The catalog is the index and the commit markers; the version manifests and blobs are the data. When
``catalog.sqlite`` is garbage (a disk error, a bad copy, a truncated file), every version can still be
recovered: each ``versions/<id>.json`` names its blobs with their sha256, and the run's config is kept in
``config.json`` next to the catalog (written by :meth:`RunStore.create`). A manifest is adopted as committed
when every blob it names verifies (a manifest is written only after all its blobs are fsynced, so a complete
one is a complete version, even one whose marker a crash lost); one that does not verify is listed as
``corrupt``. What only the catalog held is lost and said so in an alert: alias history, phase timings,
metrics/gates/findings/decisions rows (the loop can re-record those from each version's JSON files).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write_json, sha256_bytes
from .artifacts import BlobStore
from .catalog import CATALOG_NAME, Catalog
from .lock import LOCK_NAME, RunLock
from .versions import FORMAT, FORMAT_VERSION

CONFIG_NAME = "config.json"


def write_config(run_dir: Path, config: dict) -> None:
    atomic_write_json(run_dir / CONFIG_NAME, config)


def rebuild_catalog(root: str | os.PathLike, run_id: str) -> dict:
    """Replace ``<root>/<run_id>/catalog.sqlite`` by one rebuilt from the version manifests (the old file is
    kept beside it as ``catalog.sqlite.damaged-<time>``). Takes the writer lock. Returns a summary
    ``{versions, corrupt, skipped, current, kept}``."""
    run_dir = Path(root) / run_id
    if not (run_dir / "versions").is_dir():
        raise ConfigError("run", run_id, f"a run folder under {root} (with versions/)")
    lock = RunLock(run_dir / LOCK_NAME, run_id).acquire()
    try:
        try:
            config = json.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        kept = []
        for suffix in ("", "-wal", "-shm"):
            p = run_dir / f"{CATALOG_NAME}{suffix}"
            if p.exists():
                dest = run_dir / f"{CATALOG_NAME}{suffix}.damaged-{stamp}"
                os.replace(p, dest)
                kept.append(dest.name)
        tmp = run_dir / f".{CATALOG_NAME}.rebuild-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        cat = Catalog.initialize(tmp)
        cat.guard = lock.check
        cat.init_run(run_id, config if isinstance(config, dict) else {})
        blobs = BlobStore(run_dir)
        adopted, corrupt, skipped = [], [], []
        with cat.tx() as c:
            for p in sorted((run_dir / "versions").glob("*.json")):
                if not p.stem.isdigit():
                    continue
                data = p.read_bytes()
                try:
                    m = json.loads(data)
                    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION or \
                            m.get("version_id") != int(p.stem) or not isinstance(m.get("files"), dict):
                        raise ValueError("not a version manifest of this format")
                except (ValueError, UnicodeDecodeError) as e:
                    skipped.append(f"{p.name} ({e})")
                    continue
                ok = all(blobs._check(e["sha256"], e["bytes"]) is None for e in m["files"].values())
                (adopted if ok else corrupt).append(m["version_id"])
                it = m.get("iteration")
                if it is not None:
                    c.execute("INSERT OR IGNORE INTO iterations VALUES(?,?,?,?,0)",
                              (it, m["created"], m["created"], "ok"))
                c.execute("INSERT INTO versions VALUES(?,?,?,?,?,?,?,?,?)",
                          (m["version_id"], it, m.get("parent"), m["kind"], m["created"],
                           "committed" if ok else "corrupt", sha256_bytes(data), len(m["files"]),
                           sum(e["bytes"] for e in m["files"].values())))
            if adopted:
                cat.move_alias(c, "current", adopted[-1], "catalog rebuilt: the newest version that verifies")
            c.execute("UPDATE runs SET status='repaired'")
        lost = "" if isinstance(config, dict) else f"; {CONFIG_NAME} missing: the run's config is lost (resume refused)"
        cat.record_alert("warning", "store", f"catalog rebuilt from {len(adopted) + len(corrupt)} version manifests "
                         f"({len(corrupt)} corrupt: {corrupt[:10]}, {len(skipped)} unreadable); old file kept as "
                         f"{kept[:1]}; alias history, phase timings and alerts before this are lost{lost}")
        cat.close()
        os.replace(tmp, run_dir / CATALOG_NAME)
        for suffix in ("-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        return {"versions": adopted, "corrupt": corrupt, "skipped": skipped,
                "current": adopted[-1] if adopted else None, "kept": kept, "config": isinstance(config, dict)}
    finally:
        lock.release()
