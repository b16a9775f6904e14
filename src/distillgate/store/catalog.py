"""The run catalog: one SQLite file per run (``<run>/catalog.sqlite``), schema-versioned with migrations.

Durability: WAL journal + ``synchronous=FULL`` (a committed transaction survives power loss), every write in
one ``BEGIN IMMEDIATE`` transaction. A row in ``versions`` is the *commit marker* of a version: the manifest
file and its blobs are written and fsynced before that row is inserted, and readers only see versions that
have it. Non-finite metric values are stored as NULL and read back as NaN (a diverged loss is information).

Typed rows accepted by the ``record_*`` methods: the loop's one :class:`~distillgate.schema.GateResult`
(stored as a :class:`GateRow`), :class:`~distillgate.schema.Finding` and :class:`~distillgate.schema.Decision` (or plain dicts with exactly
their fields; an unknown field fails loudly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import ArtifactError, ConfigError
from ..schema import SEVERITIES, Decision, Finding, GateResult

CATALOG_NAME = "catalog.sqlite"

# Each entry migrates the schema from version i to i+1; never edit a shipped entry, append a new one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE runs(run_id TEXT PRIMARY KEY, created REAL NOT NULL, config TEXT NOT NULL,
               status TEXT NOT NULL, converged INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL)""",
        """CREATE TABLE iterations(iteration INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL,
               status TEXT NOT NULL, converged INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE phases(iteration INTEGER NOT NULL, phase TEXT NOT NULL, seconds REAL NOT NULL,
               status TEXT NOT NULL, recorded REAL NOT NULL, PRIMARY KEY(iteration, phase))""",
        """CREATE TABLE versions(version_id INTEGER PRIMARY KEY, iteration INTEGER, parent INTEGER,
               kind TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL, manifest_sha256 TEXT NOT NULL,
               n_files INTEGER NOT NULL, bytes INTEGER NOT NULL)""",
        """CREATE TABLE metrics(version_id INTEGER NOT NULL, name TEXT NOT NULL, split TEXT NOT NULL,
               value REAL, recorded REAL NOT NULL, PRIMARY KEY(version_id, name, split))""",
        """CREATE TABLE gate_results(version_id INTEGER NOT NULL, gate TEXT NOT NULL, passed INTEGER NOT NULL,
               value REAL, threshold REAL, dimension TEXT NOT NULL, detail TEXT NOT NULL, recorded REAL NOT NULL,
               PRIMARY KEY(version_id, gate))""",
        """CREATE TABLE findings(id INTEGER PRIMARY KEY, iteration INTEGER NOT NULL, version_id INTEGER,
               kind TEXT NOT NULL, subject TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
               data TEXT NOT NULL, recorded REAL NOT NULL)""",
        """CREATE TABLE decisions(id INTEGER PRIMARY KEY, iteration INTEGER NOT NULL, knob TEXT NOT NULL,
               old TEXT NOT NULL, new TEXT NOT NULL, reason TEXT NOT NULL, recorded REAL NOT NULL)""",
        """CREATE TABLE alerts(id INTEGER PRIMARY KEY, time REAL NOT NULL, level TEXT NOT NULL,
               source TEXT NOT NULL, message TEXT NOT NULL, version_id INTEGER)""",
        """CREATE TABLE aliases(name TEXT PRIMARY KEY, version_id INTEGER NOT NULL, moved REAL NOT NULL)""",
        """CREATE TABLE alias_history(id INTEGER PRIMARY KEY, name TEXT NOT NULL, version_id INTEGER NOT NULL,
               previous INTEGER, moved REAL NOT NULL, reason TEXT NOT NULL)""",
    ],
    [  # 2: operations (SPEC D2): dimension scores on the ops clock, work orders raised by alerts
        """CREATE TABLE dimension_scores(id INTEGER PRIMARY KEY, time REAL NOT NULL, version_id INTEGER,
               dimension TEXT NOT NULL, status TEXT NOT NULL, pass_share REAL, closeness REAL,
               failing TEXT NOT NULL)""",
        """CREATE TABLE work_orders(id INTEGER PRIMARY KEY, alert_id INTEGER, dimension TEXT NOT NULL,
               opened REAL NOT NULL, closed REAL, status TEXT NOT NULL, version_id INTEGER,
               location TEXT NOT NULL, impact TEXT NOT NULL, suggested_fix TEXT NOT NULL,
               verification TEXT NOT NULL, root_cause TEXT NOT NULL, closed_by TEXT)""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
PHASE_STATUSES = ("ok", "failed", "skipped")


@dataclass(frozen=True)
class GateRow:
    """What the catalog keeps of one :class:`distillgate.schema.GateResult` (its verdict in ``detail``)."""

    gate: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    dimension: str = ""
    detail: dict = field(default_factory=dict)


def _coerce(cls, item):
    if isinstance(item, cls):
        return item
    if dataclasses.is_dataclass(item):
        item = dataclasses.asdict(item)
    if not isinstance(item, Mapping):
        raise ConfigError(cls.__name__, type(item).__name__, f"a {cls.__name__} or a dict with its fields")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(item) - set(names))
    if unknown:
        raise ConfigError(f"{cls.__name__}.{unknown[0]}", item[unknown[0]], f"fields {names}")
    try:
        return cls(**item)
    except TypeError as e:
        raise ConfigError(cls.__name__, dict(item), f"fields {names} ({e})") from None


def _mapping(cls, item) -> dict:
    if dataclasses.is_dataclass(item):
        return dataclasses.asdict(item)
    if not isinstance(item, Mapping):
        raise ConfigError(cls.__name__, type(item).__name__, f"a {cls.__name__} or a dict with its fields")
    return dict(item)


def _real(x) -> float | None:
    """Store NaN/inf as NULL (sqlite turns NaN into NULL anyway; make inf behave the same)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _is_number(x) -> bool:
    if x is None:
        return True
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _val(x) -> float:
    return float("nan") if x is None else float(x)


class Catalog:
    """Typed access to ``catalog.sqlite``. ``writable=False`` refuses every write with a clear error."""

    def __init__(self, path: str | Path, writable: bool, guard=None):
        self.path = Path(path)
        self.writable = writable
        self.guard = guard  # called inside every write transaction (the store checks its writer lock there)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: run catalog missing (not a distillgate run folder?)")
        self._mu = threading.RLock()
        try:
            self.conn = self._connect(writable)
            have = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if have:
                self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()  # a garbage file fails here, typed
        except sqlite3.DatabaseError as e:
            raise self._damaged(e) from None
        if have > SCHEMA_VERSION:
            raise ArtifactError(f"{self.path}: catalog schema {have} is newer than this distillgate reads "
                                f"({SCHEMA_VERSION}); upgrade distillgate")
        if have < SCHEMA_VERSION:
            if not writable:
                raise ArtifactError(f"{self.path}: catalog schema {have} needs migration to {SCHEMA_VERSION}; "
                                    f"open the run once as its writer")
            self._migrate(have)

    def _connect(self, writable: bool) -> sqlite3.Connection:
        """One connection shared by the writer's threads (``self._mu`` serialises transactions and queries).
        A reader opens ``mode=ro``; in a folder it may not write (a read-only copy or mount, where SQLite cannot
        create the WAL index) it opens ``immutable=1``: nobody can be writing there."""
        from urllib.parse import quote

        def conn(uri: str | None) -> sqlite3.Connection:
            c = sqlite3.connect(uri or str(self.path), isolation_level=None, timeout=30.0, check_same_thread=False,
                                uri=uri is not None)
            c.row_factory = sqlite3.Row
            if writable:
                c.execute("PRAGMA synchronous=FULL")
                # Checkpoint the WAL every 32 pages (128 KB) instead of SQLite's 1000 (4 MB): the catalog's files
                # stay small, so a file-size limit or a nearly full disk hits the data files first, while the
                # catalog can still record the failure (a tiny run's WAL reached 150 KB with the default).
                c.execute("PRAGMA wal_autocheckpoint=32")
            c.execute("PRAGMA foreign_keys=ON")
            return c

        if writable:
            return conn(None)
        base = f"file:{quote(str(self.path.resolve()))}"
        try:
            c = conn(base + "?mode=ro")
            c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return c
        except sqlite3.OperationalError:
            if os.access(self.path.parent, os.W_OK) and os.access(self.path, os.W_OK):
                raise
            return conn(base + "?immutable=1")

    def _damaged(self, e: Exception) -> ArtifactError:
        from ..io import storage_error

        full = storage_error(e, self.path)  # disk full / I/O error: the catalog is fine, the disk is not
        if full is not None:
            return full
        run = self.path.parent.name
        return ArtifactError(f"{self.path}: not a readable run catalog ({type(e).__name__}: {e}); rebuild it from "
                             f"the version manifests with `distillgate runs repair {run} --root "
                             f"{self.path.parent.parent}`")

    @classmethod
    def initialize(cls, path: str | Path) -> "Catalog":
        """Create an empty catalog in WAL mode at the current schema (the file must not exist)."""
        path = Path(path)
        if path.exists():
            raise ArtifactError(f"{path}: catalog already exists")
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
        return cls(path, writable=True)

    def _migrate(self, have: int) -> None:
        for i in range(have, SCHEMA_VERSION):
            with self.tx():
                for stmt in MIGRATIONS[i]:
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version={i + 1}")

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits or none of it does."""
        if not self.writable:
            raise ArtifactError(f"{self.path}: run opened read-only (writer=False); writes need the writer lock")
        with self._mu:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as e:
                raise self._damaged(e) from None
            try:
                if self.guard is not None:
                    self.guard()
                yield self.conn
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.IntegrityError):
                    raise self._damaged(e) from None
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise self._damaged(e) from None

    def close(self) -> None:
        self.conn.close()

    def q(self, sql: str, *args) -> list[sqlite3.Row]:
        with self._mu:
            try:
                return self.conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise self._damaged(e) from None

    # ---- run and iterations -------------------------------------------------------------------------
    def init_run(self, run_id: str, config: dict) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute("INSERT INTO runs VALUES(?,?,?,?,0,?)",
                      (run_id, now, json.dumps(config, sort_keys=True), "created", now))

    def run_row(self) -> dict:
        rows = self.q("SELECT * FROM runs")
        if len(rows) != 1:
            raise ArtifactError(f"{self.path}: expected one run row, found {len(rows)}")
        d = dict(rows[0])
        d["config"] = json.loads(d["config"])
        d["converged"] = bool(d["converged"])
        return d

    def set_run_status(self, status: str, converged: bool | None = None) -> None:
        """Set the run's status; a run that stops (any status but ``running``) leaves no iteration ``running``:
        one still open is closed as ``failed`` (``interrupted`` when the run was), in the same transaction."""
        with self.tx() as c:
            c.execute("UPDATE runs SET status=?, updated=?, converged=COALESCE(?, converged)",
                      (status, time.time(), None if converged is None else int(converged)))
            if status != "running":
                c.execute("UPDATE iterations SET status=?, finished=? WHERE status='running'",
                          ("interrupted" if status == "interrupted" else "failed", time.time()))

    def set_converged(self, converged: bool) -> None:
        """The run's D3 verdict (the ops watch keeps it); the status is left as it is."""
        with self.tx() as c:
            c.execute("UPDATE runs SET converged=?, updated=?", (int(bool(converged)), time.time()))

    def _ensure_iteration(self, c, iteration: int) -> None:
        if not isinstance(iteration, int) or iteration < 0:
            raise ConfigError("iteration", iteration, "an integer >= 0")
        c.execute("INSERT OR IGNORE INTO iterations VALUES(?,?,NULL,'running',0)", (iteration, time.time()))

    def begin_iteration(self, iteration: int) -> None:
        with self.tx() as c:
            self._ensure_iteration(c, iteration)
            c.execute("UPDATE runs SET status='running', updated=?", (time.time(),))

    def finish_iteration(self, iteration: int, status: str = "ok", converged: bool = False) -> None:
        with self.tx() as c:
            self._ensure_iteration(c, iteration)
            c.execute("UPDATE iterations SET finished=?, status=?, converged=? WHERE iteration=?",
                      (time.time(), status, int(converged), iteration))

    def record_phase(self, iteration: int, phase: str, seconds: float, status: str = "ok") -> None:
        if status not in PHASE_STATUSES:
            raise ConfigError("phase status", status, f"one of {PHASE_STATUSES}")
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(f"phase {phase!r} seconds", seconds, "a finite number >= 0")
        with self.tx() as c:
            self._ensure_iteration(c, iteration)
            c.execute("INSERT OR REPLACE INTO phases VALUES(?,?,?,?,?)",
                      (iteration, phase, float(seconds), status, time.time()))

    def iterations(self) -> list[dict]:
        """Every iteration with its phases:
        [{iteration, started, finished, status, converged, phases: {name: {seconds, status}}}]."""
        out = []
        for r in self.q("SELECT * FROM iterations ORDER BY iteration"):
            d = dict(r)
            d["converged"] = bool(d["converged"])
            d["phases"] = {p["phase"]: {"seconds": p["seconds"], "status": p["status"]}
                           for p in self.q("SELECT * FROM phases WHERE iteration=? ORDER BY recorded", r["iteration"])}
            out.append(d)
        return out

    # ---- versions (rows written by the store's commit protocol) --------------------------------------
    def version_rows(self, status: str | None = "committed") -> list[dict]:
        sql = "SELECT * FROM versions" + (" WHERE status=?" if status else "") + " ORDER BY version_id"
        return [dict(r) for r in self.q(sql, *((status,) if status else ()))]

    def version_row(self, version_id: int) -> dict | None:
        rows = self.q("SELECT * FROM versions WHERE version_id=?", version_id)
        return dict(rows[0]) if rows else None

    def mark_version(self, version_id: int, status: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE versions SET status=? WHERE version_id=?", (status, version_id))

    # ---- aliases -------------------------------------------------------------------------------------
    def move_alias(self, c, name: str, version_id: int, reason: str) -> None:
        """Inside an open transaction ``c``: point ``name`` at ``version_id`` and log the move."""
        prev = c.execute("SELECT version_id FROM aliases WHERE name=?", (name,)).fetchone()
        now = time.time()
        c.execute("INSERT INTO aliases VALUES(?,?,?) ON CONFLICT(name) DO UPDATE SET version_id=excluded.version_id,"
                  " moved=excluded.moved", (name, version_id, now))
        c.execute("INSERT INTO alias_history(name, version_id, previous, moved, reason) VALUES(?,?,?,?,?)",
                  (name, version_id, prev[0] if prev else None, now, reason))

    def aliases(self) -> dict[str, int]:
        return {r["name"]: r["version_id"] for r in self.q("SELECT * FROM aliases ORDER BY name")}

    def alias_history(self, name: str) -> list[dict]:
        """Moves of ``name``, oldest first: [{version_id, previous, moved, reason}]."""
        return [dict(r) for r in self.q("SELECT version_id, previous, moved, reason FROM alias_history "
                                        "WHERE name=? ORDER BY id", name)]

    # ---- metrics, gates, findings, decisions, alerts --------------------------------------------------
    def record_metrics(self, version_id: int, values: Mapping[str, float], split: str = "val") -> None:
        for name, v in values.items():
            if not isinstance(name, str) or not name or isinstance(v, str) or not _is_number(v):
                raise ConfigError(f"metric {name!r}", v, "a str name with a number (NaN/inf allowed) or None")
        now = time.time()
        with self.tx() as c:
            for name, v in values.items():
                c.execute("INSERT OR REPLACE INTO metrics VALUES(?,?,?,?,?)", (version_id, name, split, _real(v), now))

    def metrics(self, version_id: int, split: str | None = None) -> dict[str, float]:
        rows = self.q("SELECT name, split, value FROM metrics WHERE version_id=?" + (" AND split=?" if split else ""),
                      version_id, *((split,) if split else ()))
        return {(r["name"] if split else f"{r['split']}/{r['name']}"): _val(r["value"]) for r in rows}

    def metrics_history(self, name: str, split: str = "val") -> list[dict]:
        """[{version_id, iteration, value}] for metric ``name`` on ``split``, in version order."""
        rows = self.q("SELECT m.version_id, v.iteration, m.value FROM metrics m JOIN versions v USING(version_id) "
                      "WHERE m.name=? AND m.split=? ORDER BY m.version_id", name, split)
        return [{"version_id": r[0], "iteration": r[1], "value": _val(r[2])} for r in rows]

    def record_gates(self, version_id: int, results: Iterable[GateResult | GateRow | Mapping]) -> None:
        """Gate rows of a version: :class:`~distillgate.schema.GateResult` verdicts (kept whole in ``detail``),
        or rows with the :class:`GateRow` fields."""
        rows = [GateRow(g.id, g.passed, g.value, g.threshold, g.dimension, g.model_dump(mode="json"))
                if isinstance(g, GateResult) else _coerce(GateRow, g) for g in results]
        now = time.time()
        with self.tx() as c:
            for g in rows:
                c.execute("INSERT OR REPLACE INTO gate_results VALUES(?,?,?,?,?,?,?,?)",
                          (version_id, g.gate, int(bool(g.passed)), _real(g.value), _real(g.threshold),
                           g.dimension, json.dumps(g.detail, sort_keys=True, default=str), now))

    def gate_results(self, version_id: int) -> list[GateRow]:
        return [GateRow(r["gate"], bool(r["passed"]), r["value"], r["threshold"], r["dimension"],
                           json.loads(r["detail"]))
                for r in self.q("SELECT * FROM gate_results WHERE version_id=? ORDER BY gate", version_id)]

    def last_gated_version(self) -> int | None:
        """The newest version with gate rows whose files are still there (not pruned by retention)."""
        r = self.q("SELECT MAX(g.version_id) FROM gate_results g JOIN versions v USING(version_id) "
                   "WHERE v.status != 'pruned'")
        return r[0][0]

    def record_findings(self, iteration: int, findings: Iterable[Finding | Mapping],
                        version_id: int | None = None) -> list[int]:
        rows = [f if isinstance(f, Finding) else Finding.from_dict(_mapping(Finding, f)) for f in findings]
        ids, now = [], time.time()
        with self.tx() as c:
            for f in rows:
                cur = c.execute("INSERT INTO findings(iteration, version_id, kind, subject, severity, message, data, "
                                "recorded) VALUES(?,?,?,?,?,?,?,?)", (iteration, version_id, f.kind, f.subject,
                                f.severity, f.message, json.dumps({**f.evidence, **({"uncertain": True} if f.uncertain else {})},
                                sort_keys=True, default=str), now))
                ids.append(cur.lastrowid)
        return ids

    def findings(self, iteration: int | None = None) -> list[dict]:
        where = "" if iteration is None else " WHERE iteration=?"
        rows = self.q(f"SELECT * FROM findings{where} ORDER BY id", *(() if iteration is None else (iteration,)))
        return [{**dict(r), "data": json.loads(r["data"])} for r in rows]

    def record_decisions(self, iteration: int, decisions: Iterable[Decision | Mapping]) -> None:
        """Decisions of ``iteration``; the reason column reads ``[rule] reason`` when the decision names its rule."""
        rows = []
        for d in decisions:
            if not isinstance(d, Decision):
                d = Decision.from_dict({"iteration": iteration, **_mapping(Decision, d)})
            rows.append(d)
        now = time.time()
        with self.tx() as c:
            for d in rows:
                if not str(d.reason).strip():
                    raise ConfigError(f"Decision({d.knob}).reason", d.reason, "a non-empty reason for every change")
                reason = f"[{d.rule}] {d.reason}" if d.rule else d.reason
                c.execute("INSERT INTO decisions(iteration, knob, old, new, reason, recorded) VALUES(?,?,?,?,?,?)",
                          (iteration, d.knob, json.dumps(d.old, default=str), json.dumps(d.new, default=str),
                           reason, now))

    def decisions(self, iteration: int | None = None) -> list[dict]:
        where = "" if iteration is None else " WHERE iteration=?"
        rows = self.q(f"SELECT * FROM decisions{where} ORDER BY id", *(() if iteration is None else (iteration,)))
        return [{**dict(r), "old": json.loads(r["old"]), "new": json.loads(r["new"])} for r in rows]

    def record_alert(self, level: str, source: str, message: str, version_id: int | None = None,
                     at: float | None = None) -> int:
        """An alert row (``at``: its time on the ops clock; None: now); returns its id."""
        if level not in SEVERITIES:
            raise ConfigError("alert level", level, f"one of {SEVERITIES}")
        with self.tx() as c:
            cur = c.execute("INSERT INTO alerts(time, level, source, message, version_id) VALUES(?,?,?,?,?)",
                            (time.time() if at is None else float(at), level, source, message, version_id))
            return cur.lastrowid

    def alerts(self) -> list[dict]:
        return [dict(r) for r in self.q("SELECT * FROM alerts ORDER BY id")]

    # ---- operations: dimension scores, work orders (SPEC D2) -----------------------------------------
    def record_dimension_scores(self, at: float, version_id: int | None, scores: Iterable[Mapping]) -> None:
        """One row per dimension: ``{dimension, status, pass_share, closeness, failing: [gate ids]}`` at ``at``."""
        with self.tx() as c:
            for d in scores:
                c.execute("INSERT INTO dimension_scores(time, version_id, dimension, status, pass_share, closeness, "
                          "failing) VALUES(?,?,?,?,?,?,?)", (float(at), version_id, d["dimension"], d["status"],
                          _real(d.get("pass_share")), _real(d.get("closeness")), json.dumps(list(d.get("failing", [])))))

    def dimension_scores(self, dimension: str | None = None) -> list[dict]:
        where = "" if dimension is None else " WHERE dimension=?"
        rows = self.q(f"SELECT * FROM dimension_scores{where} ORDER BY time, id", *(() if dimension is None else (dimension,)))
        return [{**dict(r), "failing": json.loads(r["failing"])} for r in rows]

    def record_work_order(self, wo: Mapping) -> int:
        """A work order: ``alert_id, dimension, opened, version_id, location, impact, suggested_fix`` (str),
        ``verification`` and ``root_cause`` (JSON-able); status ``open``. Returns its id."""
        for k in ("location", "impact", "suggested_fix"):
            if not str(wo.get(k) or "").strip():
                raise ConfigError(f"work order.{k}", wo.get(k), "a non-empty text")
        with self.tx() as c:
            cur = c.execute("INSERT INTO work_orders(alert_id, dimension, opened, closed, status, version_id, location, "
                            "impact, suggested_fix, verification, root_cause, closed_by) VALUES(?,?,?,NULL,'open',?,?,?,?,?,?,NULL)",
                            (wo.get("alert_id"), wo["dimension"], float(wo["opened"]), wo.get("version_id"),
                             wo["location"], wo["impact"], wo["suggested_fix"],
                             json.dumps(wo["verification"], sort_keys=True, default=str),
                             json.dumps(wo["root_cause"], sort_keys=True, default=str)))
            return cur.lastrowid

    def close_work_order(self, wo_id: int, at: float, by: str) -> None:
        with self.tx() as c:
            n = c.execute("UPDATE work_orders SET status='closed', closed=?, closed_by=? WHERE id=? AND status='open'",
                          (float(at), by, wo_id)).rowcount
        if n != 1:
            raise ConfigError("work order", wo_id, "the id of an open work order")

    def work_orders(self, status: str | None = None) -> list[dict]:
        where = "" if status is None else " WHERE status=?"
        rows = self.q(f"SELECT * FROM work_orders{where} ORDER BY id", *(() if status is None else (status,)))
        return [{**dict(r), "verification": json.loads(r["verification"]), "root_cause": json.loads(r["root_cause"])}
                for r in rows]
