"""Content-addressed blobs of one run: ``<run>/objects/sha256/ab/cdef...`` (git-style, immutable, read-only).

A blob enters in three steps: stream the source into ``<run>/tmp/`` while hashing it (one read pass),
fsync, then ``os.replace`` into its content address and fsync the parent folder. A blob that already exists
is reused (deduplication across versions: a rollback or an unchanged tokenizer costs no bytes) after its
own sha256 is re-checked, so a corrupted blob is repaired rather than silently referenced again.

A blob is only *reachable* through a committed version manifest; blobs left by a crashed commit are inert
and :meth:`BlobStore.gc` removes them. Nothing here reads a blob without checking its sha256 first
(:meth:`BlobStore.verified_path`), with an in-process cache keyed by (inode, size, mtime, ctime) so that a
file verified once is not re-hashed on every read; ``deep=True`` forces a re-hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import ArtifactError, ConfigError
from ..io import fsync_dir, writing

_CHUNK = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.@+=-]+(/[A-Za-z0-9_.@+=-]+)*$")


class NonFiniteError(ArtifactError):
    """A tensor about to be committed holds NaN or inf values (nothing non-finite is ever committed)."""


def check_logical_name(name: str) -> str:
    """A logical name is a relative POSIX path such as ``student/model.safetensors`` (no '..', no '/' at ends)."""
    if not isinstance(name, str) or not _NAME.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise ConfigError("logical name", name, "a relative path of [A-Za-z0-9_.@+=-] parts joined by '/', "
                                                "without '.' or '..' parts, e.g. 'student/model.safetensors'")
    return name


def check_tensors_finite(tensors: dict, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor in ``tensors`` with NaN/inf values."""
    import torch

    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{where}[{key!r}]", type(t).__name__, "a torch.Tensor")
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise NonFiniteError(f"{where}: tensor {key!r} {tuple(t.shape)} has {bad} non-finite values "
                                     f"(NaN/inf); refusing to commit it")


def check_safetensors_file_finite(path: str | os.PathLike, where: str) -> None:
    """Scan a .safetensors file tensor by tensor (peak memory: one tensor) for NaN/inf."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                check_tensors_finite({key: f.get_tensor(key)}, where)
    except NonFiniteError:
        raise
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise ArtifactError(f"{where}: {path} is not a readable safetensors file ({e})") from e


class BlobStore:
    def __init__(self, run_dir: str | os.PathLike):
        run_dir = Path(run_dir)
        self.root = run_dir / "objects" / "sha256"
        self.tmp = run_dir / "tmp"
        self._verified: dict[str, tuple] = {}

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha[2:]

    def _stat_key(self, p: Path) -> tuple:
        s = p.stat()
        return (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)

    def _check(self, sha: str, nbytes: int) -> str | None:
        """None if blob ``sha`` is present, of size ``nbytes`` and hashes to ``sha``; else what is wrong."""
        p = self.path(sha)
        if not p.is_file():
            return "missing"
        key = self._stat_key(p)
        if key[1] != nbytes:
            return f"size {key[1]} != manifest {nbytes} (truncated?)"
        if self._verified.get(sha) == key:
            return None
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != sha:
            return "sha256 mismatch (corrupted or modified after commit)"
        self._verified[sha] = key
        return None

    def verified_path(self, sha: str, nbytes: int, where: str, deep: bool = False) -> Path:
        """The blob's path after checking its sha256; :class:`ArtifactError` naming ``where`` otherwise."""
        if deep:
            self._verified.pop(sha, None)
        problem = self._check(sha, nbytes)
        if problem:
            raise ArtifactError(f"{where}: blob {self.path(sha)} {problem}")
        return self.path(sha)

    def _admit(self, tmp: Path, sha: str, nbytes: int) -> None:
        """Move the fsynced temp file ``tmp`` to its content address (or drop it if a valid copy exists)."""
        dest = self.path(sha)
        if dest.exists() and self._check(sha, nbytes) is None:
            tmp.unlink()
            return
        created = not dest.parent.exists()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if created:
            fsync_dir(self.root)
        self._verified[sha] = self._stat_key(dest)

    def put_file(self, src: str | os.PathLike, move: bool = False) -> tuple[str, int]:
        """Admit the file ``src``; returns (sha256, bytes). ``move=True`` renames it in instead of copying
        (same file system; the caller gives the file up). A write failure is a StorageError naming the file."""
        with writing(f"{self.tmp} (blob of {src})"):
            return self._put_file(Path(src), move)

    def _put_file(self, src: Path, move: bool) -> tuple[str, int]:
        if not src.is_file():
            raise ArtifactError(f"{src}: not a file")
        self.tmp.mkdir(parents=True, exist_ok=True)
        h, n = hashlib.sha256(), 0
        if move:
            with open(src, "rb+") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                os.fsync(f.fileno())
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
            try:
                os.replace(src, tmp)
            except OSError:  # other file system: fall back to a copy
                tmp.unlink(missing_ok=True)
                return self._put_file(src, move=False)
        else:
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob.", suffix=".tmp")
            tmp = Path(name)
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        n += len(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        sha = h.hexdigest()
        self._admit(tmp, sha, n)
        return sha, n

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        with writing(f"{self.tmp} (a {len(data):,}-byte blob)"):
            return self._put_bytes(data)

    def _put_bytes(self, data: bytes) -> tuple[str, int]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob.", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        sha = hashlib.sha256(data).hexdigest()
        self._admit(Path(name), sha, len(data))
        return sha, len(data)

    def clean_tmp(self) -> int:
        """Remove staging leftovers of crashed writers (call only while holding the writer lock)."""
        if not self.tmp.exists():
            return 0
        n = 0
        for p in self.tmp.iterdir():
            n += 1
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return n

    def gc(self, referenced: set[str], hook=None) -> tuple[int, int]:
        """Delete blobs not in ``referenced`` (writer only). Returns (blobs removed, bytes freed). Each unlink
        is atomic, so a kill part-way leaves some unreferenced blobs for the next gc, never a half blob.
        ``hook(step)`` is called after each deletion (crash-point tests)."""
        removed = freed = 0
        if not self.root.exists():
            return 0, 0
        for sub in sorted(self.root.iterdir()):
            for p in sorted(sub.iterdir()):
                if sub.name + p.name not in referenced:
                    freed += p.stat().st_size
                    p.unlink()
                    self._verified.pop(sub.name + p.name, None)
                    removed += 1
                    if hook is not None:
                        hook("gc_blob")
        return removed, freed

    def total_bytes(self) -> int:
        """Bytes held by every blob of the run (what the run costs on disk, shared blobs counted once)."""
        if not self.root.exists():
            return 0
        return sum(p.stat().st_size for sub in self.root.iterdir() for p in sub.iterdir())

    def all_hashes(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {sub.name + p.name for sub in self.root.iterdir() for p in sub.iterdir()}
