"""The loop under torchrun (SPEC W2): every rank runs the same loop, rank 0 alone writes the run store.

Every rank executes the same phases on the same data with the same seeds; the work is split inside them
(teacher answers and targets by batch, training by micro-batch with all-reduced gradients, see
:mod:`distillgate.train.distributed`), so every rank holds the same student and loop state. Rank 0 owns the
store: it creates or opens it as the writer and commits each iteration. The other ranks open it read-only
through :class:`FollowerStore`: catalog records are dropped (rank 0 writes the same ones), anything else that
would write raises, and an audit hook refuses any write a library might attempt under the run folder. Their
scratch files (training checkpoints, a resumed student) go to a private folder outside the store.

A rank that dies makes the others fail: torchrun's agent stops the remaining workers and exits non-zero, and
every collective has a timeout (``distributed.timeout_s``) for launchers that do not. The run is then
``--resume``-d like any other, from the last version rank 0 committed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import ArtifactError
from ..train import distributed as dist

# catalog writes rank 0 makes with the same values; on the other ranks they are dropped
_RECORDS = frozenset({"set_run_status", "begin_iteration", "finish_iteration", "record_phase", "record_metrics",
                      "record_gates", "record_findings", "record_decisions", "record_alert"})
_FORBIDDEN = frozenset({"begin_version", "set_alias", "rollback", "prune", "gc", "repair_blob", "revalidate",
                        "work_dir"})


def _noop(*args, **kwargs) -> None:
    return None


class FollowerStore:
    """A non-zero rank's view of the run store: committed artifacts, read-only."""

    def __init__(self, store):
        self._store = store
        self.scratch = Path(tempfile.mkdtemp(prefix=f"distillgate-{store.run_id}-rank{dist.rank()}-"))

    def __getattr__(self, name):
        if name in _RECORDS:
            return _noop
        if name in _FORBIDDEN:
            raise ArtifactError(f"rank {dist.rank()}: run store {name}() refused: only rank 0 writes the run store")
        return getattr(self._store, name)

    def close(self) -> None:
        self._store.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def work_root(store) -> Path:
    """Where the loop keeps scratch files: ``<run>/work`` on rank 0, a private folder on the others."""
    return Path(getattr(store, "scratch", None) or Path(store.dir) / "work")


def open_store(cfg, root: str | None, resume_run: str | None):
    """The run store for this rank: rank 0 creates (or opens for ``--resume``) it as the writer and tells the
    others the run id; the others open it read-only once it exists."""
    from ..store import RunStore

    store = None
    if dist.is_main():
        try:
            store = RunStore.open(root, resume_run, writer=True) if resume_run is not None else \
                RunStore.create(root, cfg.model_dump(), run_id=cfg.run_id)
            info = (str(store.dir.parent), store.run_id, None)
        except Exception as e:  # tell the others why, so every rank fails with the same error
            info = (None, None, f"{type(e).__name__}: {e}")
            dist.broadcast_object(info)
            raise
    else:
        info = None
    info = dist.broadcast_object(info)
    if dist.is_main():
        return store
    if info[2] is not None:
        raise ArtifactError(f"rank {dist.rank()}: rank 0 could not open the run store ({info[2]})")
    follower = FollowerStore(RunStore.open(info[0], info[1], writer=False))
    guard_writes(Path(follower.dir))
    return follower


_GUARDED: list[str] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def guard_writes(folder: Path) -> None:
    """From now on, refuse (PermissionError) any file write, rename, removal or folder creation under
    ``folder`` in this process (a :func:`sys.addaudithook`: it cannot be removed, so only followers call it)."""
    if not _GUARDED:
        sys.addaudithook(_audit)
    _GUARDED.append(os.path.abspath(folder) + os.sep)


def _inside(path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    p = os.path.abspath(os.fsdecode(path))
    return any(p.startswith(g) or p + os.sep == g for g in _GUARDED)


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        hit = writes and _inside(path)
    elif event == "os.rename":
        hit = _inside(args[0]) or _inside(args[1])
    elif event in ("os.link", "os.symlink"):  # a link *to* a committed blob leaves the store as it was
        hit = _inside(args[1])
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.chmod", "os.utime"):
        hit = _inside(args[0])
    else:
        return
    if hit:
        raise PermissionError(f"rank {dist.rank()}: {event} {args[0]!r} refused: only rank 0 writes the run store")
