"""The run store: a folder per run with a SQLite catalog, content-addressed blobs, atomic versions, one
writer (flock), aliases and rollback. Entry point: :class:`RunStore` (``RunStore.create`` / ``RunStore.open``).
"""

from .artifacts import NonFiniteError
from ..schema import Decision, Finding, GateResult
from .catalog import GateRow
from .lock import RunLock
from .store import ResumePoint, RunStore, list_runs
from .versions import COMMIT_STEPS, CRASH_ENV, Version, VersionWriter

__all__ = ["RunStore", "list_runs", "ResumePoint", "Version", "VersionWriter", "GateResult", "GateRow", "Finding",
           "Decision", "NonFiniteError", "RunLock", "COMMIT_STEPS", "CRASH_ENV"]
