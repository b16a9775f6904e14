"""RunStore: the facade over one run folder (catalog + blobs + versions + writer lock).

Layout of ``<root>/<run_id>/``::

    run.lock              flock of the single writer (holder pid/host/since inside)
    config.json           the run's config (a copy of the catalog's, for `distillgate runs repair`)
    catalog.sqlite        runs, iterations, phases, versions (commit markers), metrics, gate_results,
                          findings, decisions, alerts, aliases, alias_history
    objects/sha256/ab/..  content-addressed blobs, shared by every version of the run
    versions/000007.json  version manifests: logical name -> blob sha256 (+ iteration, parent, kind, meta)
    tmp/                  staging of the writer; emptied when a writer opens the run

Why one catalog per run rather than one per root: the writer lock then covers everything a run writes
(its catalog, blobs, staging), a run folder can be copied or deleted as a unit, and two runs never contend.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ArtifactError, ConfigError
from .artifacts import BlobStore
from .catalog import CATALOG_NAME, Catalog
from .lock import LOCK_NAME, RunLock, read_holder
from .repair import write_config
from .versions import CrashHook, Version, VersionWriter, manifest_path, read_version

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
STABLE_KEEP = 3  # G-O5: the last three stable versions stay restorable


def default_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class ResumePoint:
    """Where ``run --resume`` continues: from ``version`` (None: nothing committed yet) at ``next_iteration``."""

    version: Version | None
    last_iteration: int | None
    next_iteration: int


class RunStore:
    """One run. Create with :meth:`create`, open with :meth:`open`; use as a context manager or call close()."""

    def __init__(self, run_dir: Path, writer: bool):
        self.dir = Path(run_dir)
        self.run_id = self.dir.name
        self.writer = writer
        self.lock = RunLock(self.dir / LOCK_NAME, self.run_id)
        if writer:
            self.lock.acquire()
        try:
            self.catalog = Catalog(self.dir / CATALOG_NAME, writable=writer,
                                   guard=self.lock.check if writer else None)
            self.blobs = BlobStore(self.dir)
            self._active_writer: VersionWriter | None = None
            if writer:
                self._recover()
        except BaseException:
            self.lock.release()
            raise

    # ---- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, config: dict, run_id: str | None = None) -> "RunStore":
        """Create ``<root>/<run_id>`` (atomically: a run folder exists complete or not at all) and open it
        as its writer. ``config`` is the run's JSON-able config (a pydantic model is dumped)."""
        if hasattr(config, "model_dump"):
            config = config.model_dump(mode="json")
        if not isinstance(config, dict):
            raise ConfigError("config", type(config).__name__, "a dict (or pydantic model) of the run's config")
        run_id = run_id or default_run_id()
        if not _RUN_ID.match(run_id):
            raise ConfigError("run_id", run_id, "1-128 characters of [A-Za-z0-9._-], starting with a letter or digit")
        root = Path(root)
        final = root / run_id
        if final.exists():
            raise ConfigError("run_id", run_id, f"a run id not yet used under {root}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{run_id}.{os.getpid()}.creating"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            cat = Catalog.initialize(tmp / CATALOG_NAME)
            cat.init_run(run_id, config)
            cat.close()
            write_config(tmp, config)  # a copy outside SQLite: `runs repair` rebuilds the catalog from it
            for sub in ("objects", "versions", "tmp"):
                (tmp / sub).mkdir()
            os.rename(tmp, final)  # fails if a concurrent create won the race
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and final.exists():
                raise ConfigError("run_id", run_id, f"a run id not yet used under {root} (created concurrently)") from e
            raise
        return cls(final, writer=True)

    @classmethod
    def open(cls, root: str | os.PathLike, run_id: str, writer: bool = False) -> "RunStore":
        """Open an existing run; ``writer=True`` takes the run's lock (:class:`LockHeldError` if held)."""
        run_dir = Path(root) / run_id
        if not (run_dir / CATALOG_NAME).is_file():
            known = [r["run_id"] for r in list_runs(root)]
            raise ConfigError("run", run_id, f"a run under {root}: {known[-10:] or 'none there'}")
        return cls(run_dir, writer=writer)

    @staticmethod
    def runs(root: str | os.PathLike) -> list[dict]:
        """Summaries of every run under ``root`` (same as :func:`list_runs`)."""
        return list_runs(root)

    def close(self) -> None:
        if self._active_writer is not None:
            self._active_writer.abort()
        self.catalog.close()
        self.lock.release()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recover(self) -> None:
        """Writer open: delete what interrupted commits left (staging files, manifests without a marker)."""
        removed = self.blobs.clean_tmp()
        committed = {r["version_id"] for r in self.catalog.version_rows(status=None)}
        for p in (self.dir / "versions").glob("*"):
            uncommitted = p.suffix == ".json" and p.stem.isdigit() and int(p.stem) not in committed
            if p.name.endswith(".tmp") or uncommitted:
                p.unlink()
                removed += 1
        if removed:
            self.record_alert("warning", "store", f"recovered from an interrupted commit: removed {removed} "
                                                  f"uncommitted staging or manifest file(s)")

    # ---- run info -----------------------------------------------------------------------------------
    def work_dir(self, name: str) -> Path:
        """``<run>/work/<name>``: scratch space on the run's file system (so ``add_file(..., move=True)`` is a
        rename). Never read by the store and never cleaned by it; the owner of ``name`` cleans up."""
        if not re.match(r"^[A-Za-z0-9_.-]+$", name) or name in (".", ".."):
            raise ConfigError("work_dir name", name, "one folder name of [A-Za-z0-9_.-]")
        path = self.dir / "work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def writer_info(self) -> dict:
        """Who holds (or last held) the writer lock: {pid, host, since, argv, alive}; {} if nobody wrote it.
        ``alive`` is True/False when the holder is on this host, None when it is elsewhere."""
        info = read_holder(self.lock.path)
        if info:
            info["alive"] = None
            if info.get("host") == socket.gethostname():
                try:
                    os.kill(int(info["pid"]), 0)
                    info["alive"] = True
                except (ProcessLookupError, ValueError, KeyError):
                    info["alive"] = False
                except PermissionError:  # exists, owned by someone else
                    info["alive"] = True
        return info

    @property
    def config(self) -> dict:
        return self.catalog.run_row()["config"]

    def info(self) -> dict:
        """Summary row: run_id, created, status, converged, iterations, versions, current, best_iteration."""
        return _summary(self.catalog, self.run_id)

    # ---- versions -----------------------------------------------------------------------------------
    def begin_version(self, iteration: int | None, parent: int | str | None = "current", kind: str = "candidate",
                      meta: dict | None = None, crash_hook: CrashHook | None = None) -> VersionWriter:
        """Start version of ``iteration``. ``parent`` is a version id, an alias name (default: whatever
        ``current`` points to, None if unset) or None. One version is written at a time."""
        if not self.writer:
            raise ArtifactError(f"run {self.run_id}: opened read-only (writer=False); cannot write versions")
        if self._active_writer is not None:
            raise ArtifactError(f"run {self.run_id}: version {self._active_writer.version_id} is still being "
                                f"written; commit() or abort() it first")
        if iteration is not None and (not isinstance(iteration, int) or iteration < 0):
            raise ConfigError("iteration", iteration, "an integer >= 0 (or None for a version outside iterations)")
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ConfigError("kind", kind, "a lowercase word such as init, candidate, checkpoint, release")
        rows = self.catalog.version_rows(status=None)
        if isinstance(parent, str):
            aliases = self.catalog.aliases()
            if parent not in aliases and rows:
                raise ConfigError("parent", parent, f"a version id, None, or a set alias: {sorted(aliases)}")
            parent = aliases.get(parent)
        elif parent is not None:
            self._committed_row(parent)
        vid = (rows[-1]["version_id"] + 1) if rows else 1
        self._active_writer = VersionWriter(self, vid, iteration, parent, kind, meta, crash_hook)
        return self._active_writer

    def _committed_row(self, version_id: int, allow_corrupt: bool = False) -> dict:
        row = self.catalog.version_row(version_id)
        if row is None or row["status"] == "pruned" or (row["status"] == "corrupt" and not allow_corrupt):
            ids = [r["version_id"] for r in self.catalog.version_rows()]
            why = "" if row is None else f" (version {version_id} is {row['status']})"
            raise ConfigError("version", version_id, f"a committed version of run {self.run_id}{why}: {ids[-20:]}")
        return row

    def versions(self) -> list[dict]:
        """Catalog rows of every committed version, oldest first (cheap: no manifest is read)."""
        return self.catalog.version_rows()

    def get_version(self, version_id: int) -> Version:
        return read_version(self.dir, self.blobs, self._committed_row(version_id, allow_corrupt=True))

    def latest_version(self) -> Version | None:
        rows = self.catalog.version_rows()
        return read_version(self.dir, self.blobs, rows[-1]) if rows else None

    def resolve(self, ref: int | str) -> Version:
        """A version by id or by alias name (``current``, ``best``, ``stable``, ...)."""
        if isinstance(ref, str):
            aliases = self.catalog.aliases()
            if ref not in aliases:
                raise ConfigError("alias", ref, f"one of {sorted(aliases)}")
            ref = aliases[ref]
        return self.get_version(ref)

    def latest_valid_version(self, deep: bool = True, repair_from: Sequence[str | os.PathLike] = ()) -> Version | None:
        """The newest version whose manifest and blobs verify, after repairing bad blobs from any good copy
        (:meth:`repair_blob`); each one that still fails is skipped with an alert (and marked ``corrupt`` when we
        are the writer). A version marked ``corrupt`` earlier is tried again: once its blobs verify it is usable
        again. None if no version verifies."""
        for row in reversed(self._live_rows()):
            try:
                return self.usable_version(row["version_id"], deep=deep, repair_from=repair_from)
            except ArtifactError as e:
                self._corrupt(row["version_id"], e)
        return None

    def _live_rows(self) -> list[dict]:
        return [r for r in self.catalog.version_rows(status=None) if r["status"] in ("committed", "corrupt")]

    def usable_version(self, version_id: int, deep: bool = True, repair_from: Sequence[str | os.PathLike] = ()) \
            -> Version:
        """Version ``version_id`` after verifying every blob, each bad one repaired from a good copy when one is
        found (:meth:`repair_blob`); a version marked ``corrupt`` that verifies again is marked ``committed``
        again (writer). :class:`ArtifactError` naming the first blob that is bad and has no good copy."""
        v = self.get_version(version_id)
        for name in v.names():
            e = v.files[name]
            try:
                v.path_of(name, deep=deep)
            except ArtifactError as err:
                if not (self.writer and self.repair_blob(e["sha256"], e["bytes"], repair_from)):
                    raise ArtifactError(f"{err}; no good copy found in {self._source_text(repair_from)}") from None
                v.path_of(name, deep=True)
        row = self.catalog.version_row(version_id)
        if row["status"] == "corrupt" and self.writer:
            self.catalog.mark_version(version_id, "committed")
            self.record_alert("info", "store", f"version {version_id} verifies again and is usable again",
                              version_id)
        return v

    # ---- blob repair --------------------------------------------------------------------------------
    def repair_sources(self, extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
        """Where a good copy of a blob may be: ``extra`` folders, the local model folders of the run's config
        (``teacher.path``, ``student.path``: the student's tokenizer files are the teacher's) and the blob
        stores of the other runs under the same root."""
        out = [Path(p) for p in extra]
        try:
            cfg = self.config
        except ArtifactError:
            cfg = {}
        for section in ("teacher", "student"):
            p = (cfg.get(section) or {}).get("path") if isinstance(cfg.get(section), dict) else None
            if isinstance(p, str) and Path(p).is_dir():
                out.append(Path(p))
        out += [d / "objects" for d in sorted(self.dir.parent.iterdir()) if d != self.dir and (d / "objects").is_dir()]
        return out

    def _source_text(self, extra) -> str:
        src = self.repair_sources(extra)
        return f"{len(src)} place(s): {', '.join(str(s) for s in src[:4])}{' ...' if len(src) > 4 else ''}" \
            if src else "no other place (no other run, no local model folder in the config)"

    def repair_blob(self, sha: str, nbytes: int, extra: Sequence[str | os.PathLike] = ()) -> Path | None:
        """Replace the bad blob ``sha`` by a good copy found by content in :meth:`repair_sources` (another run's
        blob of the same hash first, then files of the same size); returns the source, or None if none was
        found (writer only). The copy is admitted like any blob: hashed while copied, fsynced, renamed in."""
        if not self.writer:
            return None
        from ..io import sha256_file

        for src in self.repair_sources(extra):
            if src.name == "objects":
                cands = [src / "sha256" / sha[:2] / sha[2:]]
            else:
                cands = [p for p in sorted(src.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"]
            for c in cands:
                try:
                    if not c.is_file() or c.stat().st_size != nbytes or sha256_file(c) != sha:
                        continue
                    got, _ = self.blobs.put_file(c)
                except OSError:
                    continue
                if got == sha and self.blobs._check(sha, nbytes) is None:
                    self.record_alert("warning", "store", f"blob {sha[:16]} was corrupt and was repaired from a "
                                                          f"good copy: {c}")
                    self.revalidate()
                    return c
        return None

    def revalidate(self) -> list[int]:
        """Verify every version marked ``corrupt`` again and mark those whose blobs all verify ``committed``
        (usable: resume, rollback, aliases). Returns their ids. Writer only; no repair is attempted."""
        back = []
        if not self.writer:
            return back
        for row in self.catalog.version_rows(status="corrupt"):
            try:
                read_version(self.dir, self.blobs, row).verify(deep=True)
            except ArtifactError:
                continue
            self.catalog.mark_version(row["version_id"], "committed")
            back.append(row["version_id"])
        if back:
            self.record_alert("info", "store", f"versions {back} verify again and are usable again")
        return back

    def _corrupt(self, version_id: int, err: Exception) -> None:
        log.warning("skipping version %s: %s", version_id, err)
        if self.writer:
            self.catalog.mark_version(version_id, "corrupt")
            self.record_alert("error", "store", f"version {version_id} failed verification and was marked "
                                                f"corrupt: {err}", version_id)

    # ---- aliases and rollback -----------------------------------------------------------------------
    def set_alias(self, name: str, version_id: int, reason: str = "") -> None:
        """Point ``name`` at ``version_id`` (one transaction; the move is logged in alias_history)."""
        if not self.writer:
            raise ArtifactError(f"run {self.run_id}: opened read-only; cannot move alias {name!r}")
        if not re.match(r"^[A-Za-z0-9_.-]+$", name or ""):
            raise ConfigError("alias", name, "a name of [A-Za-z0-9_.-], e.g. current, best, stable")
        self._committed_row(version_id)
        with self.catalog.tx() as c:
            self.catalog.move_alias(c, name, version_id, reason or "set")

    def aliases(self) -> dict[str, int]:
        return self.catalog.aliases()

    def alias_history(self, name: str) -> list[dict]:
        return self.catalog.alias_history(name)

    def stable_versions(self, n: int = STABLE_KEEP) -> list[int]:
        """The last ``n`` distinct versions ``stable`` pointed to, newest first (the G-O5 restore set)."""
        out: list[int] = []
        for h in reversed(self.catalog.alias_history("stable")):
            if h["version_id"] not in out:
                out.append(h["version_id"])
        return out[:n]

    def rollback(self, *, iteration: int | None = None, version: int | None = None, reason: str = "",
                 deep: bool = True) -> int:
        """Make a new version whose parent is ``version`` (or the newest committed version of ``iteration``),
        sharing its blobs (nothing is copied or overwritten), and point ``current`` at it. The target is
        verified first: rolling back to a corrupted version raises :class:`ArtifactError`. ``deep=False``
        trusts blobs this process already hashed (sizes are still checked). Returns the new id."""
        if (iteration is None) == (version is None):
            raise ConfigError("rollback target", {"iteration": iteration, "version": version},
                              "exactly one of iteration= or version=")
        if iteration is not None:
            rows = [r for r in self.catalog.version_rows() if r["iteration"] == iteration]
            if not rows:
                have = sorted({r["iteration"] for r in self.catalog.version_rows() if r["iteration"] is not None})
                raise ConfigError("iteration", iteration, f"an iteration with a committed version: {have}")
            version = rows[-1]["version_id"]
        target = self.usable_version(version, deep=deep)  # a version marked corrupt that verifies again is fine
        previous = self.catalog.aliases().get("current")
        meta = {"rollback_to": target.version_id, "rolled_back_from": previous, "reason": reason}
        with self.begin_version(target.iteration, parent=target.version_id, kind="rollback", meta=meta) as vw:
            for name, e in target.files.items():
                vw.add_ref(name, e["sha256"], e["bytes"])
            vid = vw.commit(aliases=("current",), reason=reason or f"rollback to version {target.version_id}")
        self.record_alert("info", "rollback", f"current: version {previous} -> {vid} (copy of version "
                                              f"{target.version_id}, iteration {target.iteration})", vid)
        return vid

    def resume_point(self, repair_from: Sequence[str | os.PathLike] = ()) -> ResumePoint:
        """Continue after a crash: the version ``current`` points to if it verifies (bad blobs repaired from a
        good copy, :meth:`usable_version`), else the newest one that does; ``next_iteration`` is one past the
        highest iteration with a committed version.

        A fallback moves ``current`` to the version continued from (so the next version's parent is the one
        actually restored, not the corrupt one). When versions exist but none verifies, this raises
        :class:`ArtifactError` naming the first bad blob: restarting from iteration 0 would silently discard
        the run."""
        v, first_err = None, None
        cur = self.catalog.aliases().get("current")
        if cur is not None:
            try:
                v = self.usable_version(cur, repair_from=repair_from)
            except ArtifactError as e:
                first_err = e
                self._corrupt(cur, e)
        v = v or self.latest_valid_version(repair_from=repair_from)
        live = self._live_rows()
        if v is None and live:
            raise ArtifactError(f"run {self.run_id}: none of its {len(live)} versions verifies, so there is nothing "
                                f"to resume from (restarting at iteration 0 would discard the run); first problem: "
                                f"{first_err or 'see the alerts'}. Put a good copy of the blob back and resume again")
        if v is not None and cur is not None and v.version_id != cur and self.writer:
            with self.catalog.tx() as c:
                self.catalog.move_alias(c, "current", v.version_id, f"resume fallback: version {cur} failed "
                                                                    f"verification")
            self.record_alert("warning", "store", f"current: version {cur} failed verification; resuming from "
                                                  f"version {v.version_id} (iteration {v.iteration})", v.version_id)
        its = [r["iteration"] for r in self.catalog.version_rows(status=None) if r["iteration"] is not None]
        last = max(its) if its else None
        return ResumePoint(v, last, 0 if last is None else last + 1)

    def retention_plan(self, keep_last: int, keep_aliases: bool = True, keep_referenced: bool = True) -> dict:
        """Which versions a purge with this policy keeps, and why (:func:`.retention.plan`); changes nothing."""
        from .retention import plan

        return plan(self, keep_last, keep_aliases, keep_referenced)

    def prune(self, keep_last: int, keep_aliases: bool = True, keep_referenced: bool = True,
              crash_hook: CrashHook | None = None) -> list[int]:
        """Apply a retention policy (:meth:`retention_plan`): the versions it does not keep are pruned. Pruned
        versions stay in the catalog (status ``pruned``: metrics, gates, findings, phase timings kept); their
        manifests go, and their blobs unless a kept version shares them. Returns the pruned ids.

        Crash-safe at every point (``DISTILLGATE_CRASH_AT=gc_marked|gc_manifest|gc_blob[:N]`` tests it):
        (1) one transaction marks the versions ``pruned`` (and drops aliases of pruned versions when
        ``keep_aliases`` is off): before it nothing changed, after it no reader, rollback or resume uses them;
        (2) the manifests of every pruned version are deleted (also those a killed purge left);
        (3) blobs no live manifest names are deleted (:meth:`gc`). A kill in (2) or (3) leaves only files
        nothing refers to; the next purge or gc removes them."""
        from .versions import env_crash_hook

        if not self.writer:
            raise ArtifactError(f"run {self.run_id}: opened read-only; prune needs the writer lock")
        hook = crash_hook or env_crash_hook() or (lambda step: None)
        plan = self.retention_plan(keep_last, keep_aliases, keep_referenced)
        doomed = plan["prune"]
        if doomed:
            with self.catalog.tx() as c:
                c.executemany("UPDATE versions SET status='pruned' WHERE version_id=?", [(v,) for v in doomed])
                for name in plan["drop_aliases"]:
                    c.execute("DELETE FROM aliases WHERE name=?", (name,))
            self.record_alert("info", "store", f"retention (keep_last={keep_last}, keep_aliases={keep_aliases}, "
                                               f"keep_referenced={keep_referenced}): pruned versions "
                                               f"{doomed[:20]}{' ...' if len(doomed) > 20 else ''}"
                                               + (f"; aliases dropped: {plan['drop_aliases']}"
                                                  if plan["drop_aliases"] else ""))
            hook("gc_marked")
        self.gc(hook=hook)
        return doomed

    def gc(self, hook: CrashHook | None = None) -> tuple[int, int]:
        """Finish what pruning left and delete blobs no live version manifest references (crash leftovers,
        pruned versions). Returns (blobs, bytes) removed. A corrupt manifest still protects every blob it
        names. Manifests of pruned versions are deleted first (a purge killed part-way leaves some)."""
        if not self.writer:
            raise ArtifactError(f"run {self.run_id}: opened read-only; gc needs the writer lock")
        hook = hook or (lambda step: None)
        referenced: set[str] = set()
        deleted = False
        for row in self.catalog.version_rows(status=None):
            if row["status"] == "pruned":
                p = manifest_path(self.dir, row["version_id"])
                if p.exists():
                    p.unlink()
                    deleted = True
                    hook("gc_manifest")
                continue
            try:
                files = read_version(self.dir, self.blobs, row).files
            except ArtifactError:
                try:  # damaged but parseable: keep what it names; unparseable: nothing to keep
                    files = json.loads(manifest_path(self.dir, row["version_id"]).read_text()).get("files", {})
                except (OSError, ValueError, AttributeError):
                    files = {}
            referenced |= {e["sha256"] for e in files.values() if isinstance(e, dict) and "sha256" in e}
        if deleted:
            from ..io import fsync_dir

            fsync_dir(self.dir / "versions")
        return self.blobs.gc(referenced, hook=hook)

    def disk_usage(self) -> dict:
        """``{"blob_bytes", "blobs", "version_bytes"}``: bytes on disk (each blob once) vs the sum of every live
        version's files (what storing each version in full would cost)."""
        live = [r for r in self.catalog.version_rows(status=None) if r["status"] != "pruned"]
        return {"blob_bytes": self.blobs.total_bytes(), "blobs": len(self.blobs.all_hashes()),
                "version_bytes": sum(r["bytes"] for r in live)}

    # ---- catalog records (thin, typed; see catalog.py) ----------------------------------------------
    def begin_iteration(self, iteration: int) -> None:
        self.catalog.begin_iteration(iteration)

    def finish_iteration(self, iteration: int, status: str = "ok", converged: bool = False) -> None:
        self.catalog.finish_iteration(iteration, status, converged)

    def record_phase(self, iteration: int, phase: str, seconds: float, status: str = "ok") -> None:
        self.catalog.record_phase(iteration, phase, seconds, status)

    def set_run_status(self, status: str, converged: bool | None = None) -> None:
        self.catalog.set_run_status(status, converged)

    def record_metrics(self, version_id: int, values: dict[str, float], split: str = "val") -> None:
        self._committed_row(version_id)
        self.catalog.record_metrics(version_id, values, split)

    def record_gates(self, version_id: int, results) -> None:
        self._committed_row(version_id)
        self.catalog.record_gates(version_id, results)

    def record_findings(self, iteration: int, findings, version_id: int | None = None) -> list[int]:
        return self.catalog.record_findings(iteration, findings, version_id)

    def record_decisions(self, iteration: int, decisions) -> None:
        self.catalog.record_decisions(iteration, decisions)

    def record_alert(self, level: str, source: str, message: str, version_id: int | None = None,
                     at: float | None = None) -> int:
        return self.catalog.record_alert(level, source, message, version_id, at)

    def metrics_history(self, name: str, split: str = "val") -> list[dict]:
        return self.catalog.metrics_history(name, split)


def _summary(cat: Catalog, run_id: str) -> dict:
    run = cat.run_row()
    aliases = cat.aliases()
    best = cat.version_row(aliases["best"]) if "best" in aliases else None
    n_it = cat.q("SELECT COUNT(*) FROM iterations")[0][0]
    n_v = cat.q("SELECT COUNT(*) FROM versions WHERE status='committed'")[0][0]
    return {"run_id": run_id, "created": run["created"], "status": run["status"], "converged": run["converged"],
            "iterations": n_it, "versions": n_v, "current": aliases.get("current"),
            "best_iteration": best["iteration"] if best else None}


def list_runs(root: str | os.PathLike) -> list[dict]:
    """Summaries (see :meth:`RunStore.info`) of every run under ``root``, oldest first; unreadable runs are
    listed with status 'unreadable: <why>'."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / CATALOG_NAME).is_file():
            continue
        try:
            cat = Catalog(d / CATALOG_NAME, writable=False)
            try:
                out.append(_summary(cat, d.name))
            finally:
                cat.close()
        except Exception as e:  # one broken run must not hide the others
            out.append({"run_id": d.name, "created": None, "status": f"unreadable: {e}", "converged": False,
                        "iterations": 0, "versions": 0, "current": None, "best_iteration": None})
    return sorted(out, key=lambda r: (r["created"] or 0, r["run_id"]))
