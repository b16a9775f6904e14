"""Atomic, checksummed artifact I/O shared by every module that writes to disk.

Contract (DESIGN "Contracts worth keeping"): a directory artifact is written into a temporary sibling
folder, every file is fsynced, a ``MANIFEST.json`` with each file's sha256 and the format version is written
last, then the folder is renamed into place (an atomic rename on POSIX) and the parent directory fsynced.
Readers call :func:`verify_manifest` and never read a folder without a valid manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, InputError, StorageError

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20
# Documented input limits (README "Reliability"): checked before anything reads the file.
MAX_CONFIG_BYTES = 1 << 20          # a run YAML
MAX_INPUT_FILE_BYTES = 256 << 20    # a prompts JSONL, an eval text file, a calibration file
_MEMO_NAME = "sha256-memo.json"
_MEMO_MAX = 4096
_memo: dict[str, str] = {}
log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_CAUSES = {"ENOSPC": "no space left on the device", "EFBIG": "file too large (a file-size limit, e.g. ulimit -f)",
           "EDQUOT": "disk quota exceeded", "EROFS": "read-only file system", "EIO": "I/O error of the device",
           "EACCES": "permission denied", "EPERM": "operation not permitted"}


def io_cause(exc: BaseException) -> str | None:
    """A short cause for a write failure (OSError, safetensors' IoError, SQLite's "disk is full"), or None
    when ``exc`` is not one."""
    import errno as _errno
    import re

    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        m = re.search(r"(?:code: |os error )(\d+)", str(exc))  # safetensors: "I/O error: ... (os error 27)"
        if m and type(exc).__name__ == "SafetensorError":
            code = int(m.group(1))
    if code is not None:
        name = _errno.errorcode.get(code, str(code))
        return f"{_CAUSES.get(name, os.strerror(code).lower())} ({name})"
    if type(exc).__name__ == "OperationalError" and ("disk is full" in str(exc) or "disk I/O" in str(exc)):
        return f"{exc} (SQLite)"
    return None


def storage_error(exc: BaseException, path: str | os.PathLike) -> StorageError | None:
    """:class:`StorageError` "``<file>``: could not write: ``<cause>``" for a write failure, else None.
    The file is the one the exception names when it names one, else ``path``."""
    cause = io_cause(exc)
    if cause is None:
        return None
    where = getattr(exc, "filename", None) or path
    return StorageError(f"{where}: could not write: {cause}")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write failure inside the block into a :class:`StorageError` naming ``path`` (or the file the
    error names) and the cause; other errors pass through unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, StorageError):
            raise
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from e


def file_stamp(path: str | os.PathLike) -> str:
    """What identifies one version of a file without reading it: resolved path, size, mtime, ctime, inode.
    ctime is in it because a rewrite that restores mtime (``cp -p``, ``touch -r``) still moves ctime."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def sha256_file_cached(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised by :func:`file_stamp` in ``$DISTILLGATE_HOME/sha256-memo.json``
    (a start then costs a stat per file instead of a read: SmolLM2's 540 MB take ~1.5 s to hash here).
    A changed file has a new stamp, so a stale hash is never returned for it."""
    stamp = file_stamp(path)
    if stamp in _memo:
        return _memo[stamp]
    memo_path = distillgate_home() / _MEMO_NAME
    try:
        disk = json.loads(memo_path.read_text())
        disk = disk if isinstance(disk, dict) else {}
    except (OSError, ValueError):
        disk = {}
    digest = disk.get(stamp)
    if not (isinstance(digest, str) and len(digest) == 64):
        digest = sha256_file(path)
        if file_stamp(path) != stamp:                 # changed while we read it: hash it, never memoise it
            return digest
        disk[stamp] = digest
        if len(disk) > _MEMO_MAX:
            disk = dict(list(disk.items())[-_MEMO_MAX:])
        try:                                          # a cache of a cache: best effort, atomic
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk, indent=0))
            os.replace(tmp, memo_path)
        except OSError as e:
            log.debug("could not memoise sha256 in %s: %s", memo_path, e)
    _memo[stamp] = digest
    return digest


def _not_utf8(path, e: UnicodeDecodeError, data: bytes, line_base: int = 1) -> InputError:
    line = line_base + data.count(b"\n", 0, e.start)
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return InputError(f"{path}: line {line}, column {col}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                      f"save the file as UTF-8")


def read_text_utf8(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """The file's text; :class:`InputError` naming the file and where, for non-UTF-8 bytes, a file over
    ``max_bytes`` (checked before reading it) or an unreadable file."""
    try:
        if max_bytes is not None and os.stat(path).st_size > max_bytes:
            raise InputError(f"{path}: {os.stat(path).st_size:,} bytes, over the limit of {max_bytes:,}")
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e, data) from None


def iter_utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, streamed; :class:`InputError` naming the line and column of a
    non-UTF-8 byte (instead of a raw ``UnicodeDecodeError``)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, raw, lineno) from None


def read_json_report(path: str | os.PathLike, flag: str, how: str) -> Any:
    """The JSON file a ``flag`` option names (a drill or bench report), parsed: InputError ``"<flag> <path>: no
    such file (<how>)"`` or ``"<flag> <path>: not JSON (...)"``; the caller checks the fields."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{flag} {p}: no such file ({how})")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{flag} {p}: not JSON ({e})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_manifest(folder: str | os.PathLike, kind: str, format_version: int, meta: dict | None = None) -> dict:
    """Hash every file under ``folder`` (except the manifest) and write ``MANIFEST.json`` atomically."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"kind": kind, "format_version": format_version, "files": files, "meta": meta or {}}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST} (artifact missing or never committed)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from e


def verify_manifest(
    folder: str | os.PathLike, kind: str | None = None, format_version: int | None = None, deep: bool = True
) -> dict:
    """Check that ``folder`` is a committed artifact whose files match their sha256. Returns the manifest.

    Raises :class:`ArtifactError` naming the first file that is missing, truncated, or altered.
    ``deep=False`` checks presence and sizes only (fast path for large, recently verified folders).
    """
    folder = Path(folder)
    m = read_manifest(folder)
    if kind is not None and m.get("kind") != kind:
        raise ArtifactError(f"{folder}: artifact kind {m.get('kind')!r}, expected {kind!r}")
    if format_version is not None and m.get("format_version") != format_version:
        raise ArtifactError(
            f"{folder}: format_version {m.get('format_version')!r}, this distillgate reads {format_version}"
        )
    for rel, info in m.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != info["bytes"]:
            raise ArtifactError(f"{p}: size {p.stat().st_size} != manifest {info['bytes']} (truncated?)")
        if deep and sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"{p}: sha256 mismatch (corrupted or modified after commit)")
    return m


def _same_files(a: dict, b: dict) -> bool:
    return {k: v["sha256"] for k, v in a.get("files", {}).items()} == \
        {k: v["sha256"] for k, v in b.get("files", {}).items()}


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, kind: str, format_version: int, meta: dict | None = None,
               overwrite: bool = False, exist_ok: bool = False) -> Iterator[Path]:
    """Build a directory artifact in a temp sibling; on success write its manifest and rename into place.

    >>> with atomic_dir(out, kind="student", format_version=1) as tmp:
    ...     model.save_pretrained(tmp)
    On an exception the temp folder is removed and ``final`` is untouched.

    Publishing is create-exclusive: ``rename(tmp, final)`` fails when ``final`` exists (a non-empty folder), so
    two writers never interleave. Then:

    * ``exist_ok=True`` (caches keyed by their inputs): a committed ``final`` that verifies wins and ours is
      dropped (a concurrent writer computed the same key first); one that does not verify (a crash leftover,
      corruption) is replaced. Entering with a committed ``final`` is fine too.
    * ``overwrite=True``: ``final`` is swapped out (renamed to a unique sibling, then deleted) and ours goes in.
    * neither: :class:`ArtifactError` "already exists", at entry or when another writer got there first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (overwrite or exist_ok):
        raise ArtifactError(f"{final}: already exists (refusing to overwrite)")
    with writing(final):
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        with writing(final):  # a full disk or a file-size limit while the caller writes: one typed error
            yield tmp
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            ours = write_manifest(tmp, kind, format_version, meta)
            _publish(tmp, final, ours, overwrite, exist_ok)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path, ours: dict, overwrite: bool, exist_ok: bool) -> None:
    for _ in range(16):  # each retry means another writer moved ``final`` between our two calls
        try:
            os.rename(tmp, final)  # atomic; EEXIST/ENOTEMPTY when final is a non-empty folder
            fsync_dir(final.parent)
            return
        except FileNotFoundError:
            raise
        except OSError as e:
            if not final.exists():
                if isinstance(e, (IsADirectoryError, NotADirectoryError, PermissionError)):
                    raise
                continue
        if exist_ok and not overwrite:
            try:
                theirs = verify_manifest(final, kind=ours["kind"], format_version=ours["format_version"])
            except ArtifactError as e:
                log.warning("%s: replacing an unusable artifact (%s)", final, e)
            else:
                if not _same_files(theirs, ours):
                    log.info("%s: a concurrent writer committed it first (other bytes, same key); using theirs",
                             final)
                return
        elif not overwrite:
            raise ArtifactError(f"{final}: already exists (refusing to overwrite; another writer committed it "
                                f"first)")
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            continue
        shutil.rmtree(old, ignore_errors=True)
    raise ArtifactError(f"{final}: could not publish after 16 attempts (other writers keep replacing it)")


def distillgate_home() -> Path:
    """Root of caches (imported models, teacher targets, eval caches): $DISTILLGATE_HOME or ~/.cache/distillgate."""
    return Path(os.environ.get("DISTILLGATE_HOME", Path.home() / ".cache" / "distillgate"))
