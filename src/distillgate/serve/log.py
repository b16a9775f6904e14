"""The gateway's request log: one SQLite file per run, ``<run>/serve/requests.sqlite`` (:func:`log_path`).

Every request the gateway answers (or refuses) becomes exactly one row, written once its outcome is known, in
one transaction: a reader never sees a half-written row. A request refused before an arm is chosen (401 bad
token; 400 malformed JSON, bad messages or max_tokens; 404 unknown model; 413 oversized body) gets its 4xx and
is *not* logged: there is no arm or backend outcome to attribute (``distillgate_refused_total`` counts it).
Errors after routing are logged with their status: the backend's own 4xx/5xx, 502 unreachable or failed
mid-stream, 499 client gone mid-stream.

The file is separate from ``catalog.sqlite`` on purpose: the gateway must not take the run's writer lock (the
loop may be running), and the log grows with traffic while the catalog stays small. WAL journal, so readers
(the ``production`` stage, KPIs, reports) read while the gateway writes; ``synchronous=NORMAL`` (a power cut
can lose the last few rows, never corrupt the file; the rows are telemetry, not artifacts).

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`), table ``requests``:

=====================  =======  ==============================================================================
column                 type     meaning
=====================  =======  ==============================================================================
request_id             TEXT PK  the gateway's id (``chatcmpl-<hex>``), sent back in the ``X-Request-Id`` header
ts                     REAL     unix seconds (float) when the gateway received the request
user_id                TEXT     header ``X-User-Id``, else the body's ``user``; NULL if neither
session_id             TEXT     header ``X-Session-Id``; NULL if absent
experiment             TEXT     experiment name the arm was drawn in (config ``serving.experiment``)
arm                    TEXT     arm served (e.g. ``control`` / ``candidate``); assignment is sticky per
                                user (or session when there is no user), deterministic (murmur3 hashing);
                                NULL for a G-O1 degraded response (no arm served it)
model_version          TEXT     version served: ``v<id>`` of the run store, ``teacher``, or a URL backend's label;
                                the fallback's when the breaker sent it there; ``distillgate-degraded`` (G-O1)
route                  TEXT     ``/v1/chat/completions``
stream                 INTEGER  1 if the client asked for server-sent events, else 0
status                 INTEGER  HTTP status of the outcome (200, 4xx, 5xx; a stream that broke after its 200
                                header: 502 backend / 499 client)
error                  TEXT     NULL on success, else a one-line reason (backend error, timeout, ...)
finish_reason          TEXT     ``stop`` / ``length`` from the backend; NULL on error
prompt_tokens          INTEGER  from the backend's ``usage``; NULL if it did not report it
completion_tokens      INTEGER  from the backend's ``usage`` (streaming: number of content chunks if no usage)
ttft_ms                REAL     ms from receipt to the first content byte sent to the client (non-streaming:
                                equal to latency_ms)
latency_ms             REAL     ms from receipt to the last chunk relayed (streaming) or to the whole body
                                handed to the server (non-streaming)
request                TEXT     the request body as JSON (messages, sampling parameters)
response               TEXT     the assistant's text (streaming: the chunks joined); NULL on error
shadow_model_version   TEXT     version the request was shadow-called on (production model); NULL if none
shadow_response        TEXT     the shadow's text; NULL if no shadow call or it failed
shadow_latency_ms      REAL     the shadow call's latency; NULL if none
shadow_error           TEXT     why the shadow call failed; NULL otherwise
=====================  =======  ==============================================================================

Indexes: ``ts``, ``(arm, ts)``, ``user_id``, ``session_id``. Read with :func:`read_requests` (plain dicts) or
any SQLite client (``sqlite3 requests.sqlite 'select arm, avg(latency_ms) from requests group by arm'``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ArtifactError

SCHEMA_VERSION = 1
LOG_DIR = "serve"
LOG_NAME = "requests.sqlite"


@dataclass
class RequestRecord:
    """One row of ``requests`` (see the module docstring for each column)."""

    request_id: str
    ts: float
    route: str
    status: int
    user_id: str | None = None
    session_id: str | None = None
    experiment: str | None = None
    arm: str | None = None
    model_version: str | None = None
    stream: bool = False
    error: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    request: dict | None = None
    response: str | None = None
    shadow_model_version: str | None = None
    shadow_response: str | None = None
    shadow_latency_ms: float | None = None
    shadow_error: str | None = None


COLUMNS = tuple(f.name for f in fields(RequestRecord))
_TYPES = {"request_id": "TEXT PRIMARY KEY", "ts": "REAL NOT NULL", "route": "TEXT NOT NULL",
          "status": "INTEGER NOT NULL", "stream": "INTEGER NOT NULL", "prompt_tokens": "INTEGER",
          "completion_tokens": "INTEGER", "ttft_ms": "REAL", "latency_ms": "REAL", "shadow_latency_ms": "REAL"}
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS requests (" + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS) + ")",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts)",
    "CREATE INDEX IF NOT EXISTS requests_arm_ts ON requests(arm, ts)",
    "CREATE INDEX IF NOT EXISTS requests_user ON requests(user_id)",
    "CREATE INDEX IF NOT EXISTS requests_session ON requests(session_id)",
]
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


def log_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/serve/requests.sqlite``."""
    return Path(run_dir) / LOG_DIR / LOG_NAME


def _row(rec: RequestRecord) -> tuple:
    d = dict(rec.__dict__)  # shallow: asdict() deep-copies the request body (0.2 ms a row)
    d["stream"] = int(bool(d["stream"]))
    if d["request"] is not None:
        d["request"] = json.dumps(d["request"], ensure_ascii=False, separators=(",", ":"))
    return tuple(d[c] for c in COLUMNS)


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0, check_same_thread=False)
    have = conn.execute("PRAGMA user_version").fetchone()[0]
    if have > SCHEMA_VERSION:
        conn.close()
        raise ArtifactError(f"{path}: request log schema {have} is newer than this distillgate's "
                            f"({SCHEMA_VERSION}); upgrade distillgate")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    for stmt in SCHEMA:
        conn.execute(stmt)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("COMMIT")
    return conn


class RequestLog:
    """Appends :class:`RequestRecord` rows from a background thread, so the gateway's event loop never waits on
    SQLite. :meth:`add` only appends to a queue (no lock, no thread wake-up: the gateway pays microseconds);
    every ``interval_s`` the thread commits whatever is queued in one transaction (each row whole or absent).
    :meth:`flush` waits until everything added before it is committed; :meth:`close` flushes."""

    def __init__(self, path: str | os.PathLike, interval_s: float = 0.05):
        self.path = Path(path)
        self.interval_s = interval_s
        self._conn = _open(self.path)
        self._rows: collections.deque = collections.deque()  # append/popleft are atomic: no lock needed
        self._waiters: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="distillgate-request-log", daemon=True)
        self._thread.start()

    def add(self, rec: RequestRecord) -> None:
        if self._error is not None:
            raise ArtifactError(f"{self.path}: request log writer failed: {self._error}")
        self._rows.append(_row(rec))

    def flush(self, timeout: float = 30.0) -> None:
        done = threading.Event()
        self._waiters.append(done)
        self._wake.set()
        if not done.wait(timeout):
            raise ArtifactError(f"{self.path}: request log did not flush within {timeout:.0f} s")
        if self._error is not None:
            raise ArtifactError(f"{self.path}: request log writer failed: {self._error}")

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop = True
            self._wake.set()
            self._thread.join(timeout=30.0)
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def _drain(self, q: collections.deque) -> list:
        out = []
        while True:
            try:
                out.append(q.popleft())
            except IndexError:
                return out

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stop = self._stop
            waiters = self._drain(self._waiters)  # before the rows: every row added before flush() is in
            batch = self._drain(self._rows)
            if batch and self._error is None:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany(_INSERT, batch)
                    self._conn.execute("COMMIT")
                except sqlite3.Error as e:  # disk full, I/O error: rows lost, reported on the next add/flush
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                    self._error = e
            for w in waiters:
                w.set()
            if stop:
                return


def read_requests(path: str | os.PathLike, *, since: float | None = None, arm: str | None = None,
                  where: str = "", params: tuple = ()) -> list[dict]:
    """Rows of ``requests`` as dicts (``request`` decoded from JSON, ``stream`` as bool), oldest first.
    ``since``: only rows with ``ts >= since``; ``arm``: only that arm; ``where``/``params``: an extra SQL
    condition with ``?`` placeholders (e.g. ``where="status = ?", params=(200,)``)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no request log (the gateway writes it when `distillgate serve` runs)")
    conds, args = [], []
    if since is not None:
        conds.append("ts >= ?")
        args.append(since)
    if arm is not None:
        conds.append("arm = ?")
        args.append(arm)
    if where:
        conds.append(f"({where})")
        args.extend(params)
    sql = f"SELECT {', '.join(COLUMNS)} FROM requests" + (f" WHERE {' AND '.join(conds)}" if conds else "") + \
        " ORDER BY ts, request_id"
    with contextlib.closing(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30.0)) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(sql, args)]
    for r in rows:
        r["stream"] = bool(r["stream"])
        if r["request"] is not None:
            r["request"] = json.loads(r["request"])
    return rows

