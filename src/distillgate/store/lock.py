"""One writer per run: an exclusive ``fcntl.flock`` on ``<run>/run.lock``.

Why flock and not a pid file: the kernel drops the lock when the holder's last file descriptor closes,
which includes SIGKILL and OOM kills, so there is never a stale lock to break by hand. The holder writes
``{"pid", "host", "since", "argv"}`` into the lock file only so that a second writer can say *who* holds it;
the file's content is advisory, the flock is the lock.

Caveats: flock is local to one machine (on NFS it may be emulated or absent; keep runs on local disk or a
file system with working flock). Two opens of the same file in one process are two open file descriptions,
so a second writer in the same process fails too, which is what we want.

The lock is the flock on the *open file description*, not the path: if someone deletes or replaces
``run.lock`` while we hold it, a second writer can create a new file and lock that. :meth:`RunLock.check`
detects it (the path no longer names the inode we hold) and the store calls it inside every write transaction
and before a version manifest is published, so the first writer stops before it commits anything more.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import LockHeldError, LockLostError

LOCK_NAME = "run.lock"


def _holder_text(info: dict) -> str:
    if not info:
        return "an unknown process (it is still writing its name into the lock file)"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {when}"


def read_holder(path: str | os.PathLike) -> dict:
    """The holder record written by the current (or last) lock holder; {} if none or unreadable."""
    try:
        text = Path(path).read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Exclusive, non-blocking writer lock on ``path``.

    >>> lock = RunLock(run_dir / "run.lock", run_id="r1").acquire()   # raises LockHeldError if held
    >>> ...; lock.release()
    """

    def __init__(self, path: str | os.PathLike, run_id: str = ""):
        self.path = Path(path)
        self.run_id = run_id
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        for _ in range(8):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                info = read_holder(self.path)
                raise LockHeldError(
                    f"run {self.run_id or self.path.parent.name}: the writer lock {self.path} is held by "
                    f"{_holder_text(info)}; one writer per run: wait for it to finish, stop it, or open the run "
                    f"read-only (writer=False)"
                ) from None
            if self._names(fd):
                break
            os.close(fd)  # the file was deleted or replaced between our open and our flock: lock the new one
        else:
            raise LockHeldError(f"{self.path}: the lock file keeps being replaced; is another process deleting it?")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _names(self, fd: int) -> bool:
        """True while ``self.path`` is the file ``fd`` is open on (same device and inode)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino) and held.st_nlink > 0

    def check(self) -> None:
        """Raise :class:`LockLostError` unless we hold the lock and ``path`` still names the locked file."""
        if self._fd is None:
            raise LockLostError(f"{self.path}: this process does not hold the writer lock")
        if not self._names(self._fd):
            try:
                now = f"now inode {os.stat(self.path).st_ino} (another writer's?)"
            except FileNotFoundError:
                now = "now missing"
            raise LockLostError(f"{self.path}: the writer lock file was deleted or replaced while this process "
                                f"held it (inode {os.fstat(self._fd).st_ino}, {now}); another writer may have "
                                f"opened run {self.run_id or self.path.parent.name}: stopping before the next "
                                f"commit. Never delete run.lock by hand: the kernel frees it when its holder dies")

    def release(self) -> None:
        """Clear the holder record and drop the lock (the kernel does the same if we die first)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
