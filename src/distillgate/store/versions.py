"""Versions: a manifest of logical names -> blob hashes, made visible by one catalog row (the commit marker).

Commit protocol of :meth:`VersionWriter.commit` (each numbered step is a crash point tests can SIGKILL at):

  1. blobs      every ``add_*`` streams its bytes into ``tmp/``, fsyncs, renames into ``objects/``  [after_blob]
  2. manifest   JSON written to ``versions/.<id>.json.tmp``, fsynced       [before_manifest, after_manifest_tmp]
  3. rename     ``os.replace`` to ``versions/<id>.json``, fsync the folder       [after_rename, before_marker]
  4. marker     one SQLite transaction: INSERT the ``versions`` row (with the manifest's sha256) and move
                the aliases; nothing before its COMMIT is visible to readers    [marker_uncommitted, after_marker]

A crash anywhere before the marker's COMMIT leaves blobs and maybe a manifest file that no reader can see;
the next writer deletes them on open. Readers check the manifest's sha256 against the marker and each blob's
sha256 against the manifest before returning a path.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import ArtifactError, ConfigError
from ..io import fsync_dir, sha256_bytes, writing
from .artifacts import (
    BlobStore,
    NonFiniteError,
    check_logical_name,
    check_safetensors_file_finite,
    check_tensors_finite,
)

if TYPE_CHECKING:
    from .store import RunStore

FORMAT = "distillgate.version"
FORMAT_VERSION = 1
CRASH_ENV = "DISTILLGATE_CRASH_AT"
COMMIT_STEPS = ("after_blob", "before_manifest", "after_manifest_tmp", "after_rename", "before_marker",
                "marker_uncommitted", "after_marker")
# Crash points of a retention purge (:meth:`RunStore.prune`): after the catalog marked the doomed versions,
# after each manifest deleted, after each blob deleted.
GC_STEPS = ("gc_marked", "gc_manifest", "gc_blob")
CrashHook = Callable[[str], None]


def env_crash_hook() -> CrashHook | None:
    """Test-only hook from ``DISTILLGATE_CRASH_AT=<step>[:<n>]``: SIGKILL this process at the n-th time
    (default first) a commit or a purge reaches ``step`` (one of :data:`COMMIT_STEPS` or :data:`GC_STEPS`)."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return None
    step, _, nth = spec.partition(":")
    if step not in COMMIT_STEPS + GC_STEPS or not (nth == "" or nth.isdigit()):
        raise ConfigError(CRASH_ENV, spec, f"one of {COMMIT_STEPS + GC_STEPS}, optionally followed by ':N'")
    target, seen = int(nth or 1), {}

    def hook(s: str) -> None:
        seen[s] = seen.get(s, 0) + 1
        if s == step and seen[s] == target:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _json_default(obj):
    if hasattr(obj, "model_dump"):  # pydantic
        return obj.model_dump(mode="json")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    # a numpy / torch scalar (np.bool_ from a comparison, np.float64, a 0-d tensor): its Python value; arrays
    # stay an error (their .item() raises), so nothing is silently turned into a list
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def manifest_path(run_dir: Path, version_id: int) -> Path:
    return run_dir / "versions" / f"{version_id:06d}.json"


@dataclass(frozen=True)
class Version:
    """A committed version (read side). ``files``: logical name -> {"sha256", "bytes"}."""

    version_id: int
    iteration: int | None
    parent: int | None
    kind: str
    created: float
    status: str
    files: dict
    meta: dict
    blobs: BlobStore = field(repr=False, compare=False)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.files if not prefix or n == prefix or n.startswith(prefix.rstrip("/") + "/"))

    def path_of(self, name: str, deep: bool = False) -> Path:
        """Path of the blob behind ``name``, after checking its sha256 (treat it as read-only)."""
        entry = self.files.get(name)
        if entry is None:
            raise ArtifactError(f"version {self.version_id}: no file {name!r} (has {self.names()[:20]})")
        where = f"version {self.version_id} file {name!r}"
        return self.blobs.verified_path(entry["sha256"], entry["bytes"], where, deep)

    def load_json(self, name: str):
        return json.loads(self.path_of(name).read_text())

    def load_tensors(self, name: str) -> dict:
        """dict[str, Tensor] from a safetensors file of this version (verified first)."""
        from safetensors.torch import load_file

        return load_file(str(self.path_of(name)))

    def verify(self, deep: bool = True) -> None:
        """Check every file of the version; :class:`ArtifactError` names the first bad one."""
        for name in self.names():
            self.path_of(name, deep=deep)

    def checkout(self, prefix: str, dest: str | os.PathLike, link: bool = True, replace: bool = False) -> Path:
        """Materialise the files under ``prefix`` as a plain folder ``dest`` (e.g. a Hugging Face model folder
        that ``from_pretrained`` loads). ``link=True`` hard-links the verified, read-only blobs (no bytes
        copied); a failed link (other file system) falls back to a copy. If ``dest`` exists: returned as is
        when it already is this checkout (same hard-linked blobs, nothing else), replaced when
        ``replace=True``, else :class:`ArtifactError`."""
        import shutil
        import tempfile

        names = self.names(prefix)
        if not names:
            raise ArtifactError(f"version {self.version_id}: nothing under {prefix!r}")
        dest = Path(dest)
        if dest.exists() and not replace:
            if self._is_checkout(prefix, dest):
                return dest
            raise ArtifactError(f"{dest}: already exists and is not a linked checkout of version {self.version_id} "
                                f"{prefix!r}; remove it or pass replace=True")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            for name in names:
                rel = name[len(prefix.rstrip("/")) + 1:] if name != prefix else Path(name).name
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                src = self.path_of(name)
                try:
                    if not link:
                        raise OSError
                    os.link(src, out)
                except OSError:
                    shutil.copyfile(src, out)
            if dest.exists():  # replace=True: swap the old folder out, then delete it
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest


    def _is_checkout(self, prefix: str, dest: Path) -> bool:
        """True if ``dest`` holds exactly this version's files under ``prefix`` as hard links to verified blobs."""
        cut = len(prefix.rstrip("/")) + 1
        want = {n[cut:] if n != prefix else Path(n).name: n for n in self.names(prefix)}
        have = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
        if have != set(want):
            return False
        try:
            return all(os.path.samefile(dest / rel, self.path_of(n)) for rel, n in want.items())
        except (OSError, ArtifactError):
            return False


def read_version(run_dir: Path, blobs: BlobStore, row: dict) -> Version:
    """Load the manifest of a catalog ``versions`` row, checking it against the sha256 in the marker."""
    vid = row["version_id"]
    path = manifest_path(run_dir, vid)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"version {vid}: manifest {path} unreadable ({e.strerror})") from None
    if sha256_bytes(data) != row["manifest_sha256"]:
        raise ArtifactError(f"version {vid}: manifest {path} sha256 mismatch (corrupted or modified after commit)")
    m = json.loads(data)
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"version {vid}: {path} has format {m.get('format')!r} v{m.get('format_version')}, "
                            f"this distillgate reads {FORMAT!r} v{FORMAT_VERSION}")
    return Version(vid, row["iteration"], row["parent"], row["kind"], row["created"], row["status"],
                   m["files"], m.get("meta", {}), blobs)


def _publish_exclusive(tmp: Path, final: Path, version_id: int) -> None:
    """Put ``tmp`` at ``final`` only if nothing is there (a hard link is create-exclusive; a writer's open
    already deleted every uncommitted manifest, so an existing one belongs to another writer)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ArtifactError(f"{final}: version {version_id}'s manifest already exists (written by another writer "
                            f"of this run?); refusing to replace it") from None
    except OSError:                                   # no hard links on this file system: check, then rename
        if final.exists():
            raise ArtifactError(f"{final}: version {version_id}'s manifest already exists; refusing to replace it")
        os.replace(tmp, final)


class VersionWriter:
    """Collects the files of one new version; nothing is visible until :meth:`commit` returns.

    >>> with store.begin_version(iteration=3, kind="candidate") as vw:
    ...     vw.add_dir("student", model_dir)
    ...     vw.add_json("recipe.json", recipe)
    ...     vid = vw.commit()                       # moves alias "current" by default
    Leaving the ``with`` block without commit() aborts the version (and raises if no exception is pending).
    """

    def __init__(self, store: "RunStore", version_id: int, iteration: int | None, parent: int | None, kind: str,
                 meta: dict | None, crash_hook: CrashHook | None):
        self.store, self.version_id, self.iteration, self.parent, self.kind = store, version_id, iteration, parent, kind
        self.meta = dict(meta or {})
        self.files: dict[str, dict] = {}
        self._hook = crash_hook or env_crash_hook() or (lambda step: None)
        self._done = False
        self._published: str | None = None  # sha256 of the manifest we put at versions/<id>.json

    def _add(self, name: str, sha: str, nbytes: int) -> str:
        self.files[name] = {"sha256": sha, "bytes": nbytes}
        self._hook("after_blob")
        return sha

    def _claim(self, name: str) -> str:
        if self._done:
            raise ArtifactError(f"version {self.version_id}: already committed or aborted")
        check_logical_name(name)
        if name in self.files:
            raise ConfigError("logical name", name, f"a name not yet used in version {self.version_id}")
        return name

    def add_file(self, name: str, path: str | os.PathLike, move: bool = False, check_finite: bool = True) -> str:
        """Add the file ``path`` as ``name``; returns its sha256. ``*.safetensors`` files are scanned for
        NaN/inf unless ``check_finite=False``. ``move=True`` renames the file in instead of copying it."""
        self._claim(name)
        if check_finite and str(path).endswith(".safetensors"):
            check_safetensors_file_finite(path, f"version {self.version_id} file {name!r}")
        return self._add(name, *self.store.blobs.put_file(path, move=move))

    def add_dir(self, prefix: str, folder: str | os.PathLike, move: bool = False) -> list[str]:
        """Add every file under ``folder`` as ``prefix/<relative path>`` (e.g. a saved model folder)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: not a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise ArtifactError(f"{folder}: empty folder")
        names = [self._claim(f"{prefix}/{p.relative_to(folder).as_posix()}") for p in files]
        for p in files:
            if p.suffix == ".safetensors":
                check_safetensors_file_finite(p, f"version {self.version_id} folder {prefix!r}")
        for n, p in zip(names, files, strict=True):
            self._add(n, *self.store.blobs.put_file(p, move=move))
        return names

    def add_json(self, name: str, obj, allow_nan: bool = True) -> str:
        """Add ``obj`` as JSON. NaN/inf are written as Python's json does (NaN, Infinity) so that a diverged
        metric is recorded, not lost; ``allow_nan=False`` refuses them with :class:`NonFiniteError`. Weights
        never go through JSON: tensors use :meth:`add_tensors`, which always refuses NaN/inf."""
        self._claim(name)
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=allow_nan, default=_json_default)
        except ValueError as e:
            raise NonFiniteError(f"version {self.version_id} file {name!r}: {e}; refusing to commit NaN/inf") from None
        return self._add(name, *self.store.blobs.put_bytes((text + "\n").encode()))

    def add_tensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None) -> str:
        """Add ``tensors`` (dict[str, Tensor], any shapes) as a safetensors file; refuses NaN/inf with
        :class:`NonFiniteError` naming the tensor."""
        from safetensors.torch import save

        self._claim(name)
        check_tensors_finite(tensors, f"version {self.version_id} file {name!r}")
        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
        return self._add(name, *self.store.blobs.put_bytes(data))

    def add_ref(self, name: str, sha256: str, nbytes: int) -> None:
        """Reuse an existing blob (rollback copies a manifest this way: no bytes move)."""
        self._claim(name)
        self.store.blobs.verified_path(sha256, nbytes, f"version {self.version_id} file {name!r}")
        self.files[name] = {"sha256": sha256, "bytes": nbytes}

    def commit(self, aliases: Sequence[str] = ("current",), reason: str = "") -> int:
        """Make the version visible (see the module docstring for the protocol); returns its id."""
        if self._done:
            raise ArtifactError(f"version {self.version_id}: already committed or aborted")
        if not self.files:
            raise ArtifactError(f"version {self.version_id}: nothing added; refusing to commit an empty version")
        store, run_dir = self.store, self.store.dir
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "run_id": store.run_id,
                    "version_id": self.version_id, "iteration": self.iteration, "parent": self.parent,
                    "kind": self.kind, "created": time.time(), "files": self.files, "meta": self.meta}
        data = (json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n").encode()
        final = manifest_path(run_dir, self.version_id)
        final.parent.mkdir(exist_ok=True)
        self._hook("before_manifest")
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with writing(final), open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._hook("after_manifest_tmp")
        try:
            store.lock.check()            # a lost lock: another writer may own versions/<id>.json now
            _publish_exclusive(tmp, final, self.version_id)
        finally:
            tmp.unlink(missing_ok=True)
        self._published = sha256_bytes(data)
        self._hook("after_rename")
        fsync_dir(final.parent)
        self._hook("before_marker")
        with store.catalog.tx() as c:
            if self.iteration is not None:
                c.execute("INSERT OR IGNORE INTO iterations VALUES(?,?,NULL,'running',0)",
                          (self.iteration, time.time()))
            c.execute("INSERT INTO versions VALUES(?,?,?,?,?,?,?,?,?)",
                      (self.version_id, self.iteration, self.parent, self.kind, manifest["created"], "committed",
                       sha256_bytes(data), len(self.files), sum(e["bytes"] for e in self.files.values())))
            for a in aliases:
                store.catalog.move_alias(c, a, self.version_id, reason or f"commit {self.kind}")
            self._hook("marker_uncommitted")
        self._finish()  # before the hook: the version is committed now, whatever happens next
        self._hook("after_marker")
        return self.version_id

    def abort(self) -> None:
        """Drop the version; its blobs stay inert until the next ``gc``. Only a manifest this writer published
        is deleted, and only while no commit marker names it: never another writer's."""
        if not self._done:
            path = manifest_path(self.store.dir, self.version_id)
            try:
                ours = self._published is not None and sha256_bytes(path.read_bytes()) == self._published
            except OSError:
                ours = False
            if ours and self.store.catalog.version_row(self.version_id) is None:
                path.unlink(missing_ok=True)
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.store._active_writer = None

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        self.abort()
        if exc_type is None:
            raise ArtifactError(f"version {self.version_id}: the with-block ended without commit(); aborted")
