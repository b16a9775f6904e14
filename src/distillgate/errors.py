"""Typed errors. Every user-facing failure names the field or file, the value, and what is allowed."""

from __future__ import annotations


class DistillgateError(Exception):
    """Base class: the CLI prints these as one clean message (no traceback) and exits 2."""


class ConfigError(DistillgateError):
    """A config field (or CLI argument) holds a value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; allowed: {allowed}")


class InputError(DistillgateError):
    """A file or model given as input is missing, unreadable, or incompatible."""


class ArtifactError(DistillgateError):
    """An artifact on disk is missing, uncommitted, or fails its checksum manifest."""


class CacheMismatchError(ArtifactError):
    """A cached artifact was built from other inputs (teacher, tokenizer, data, k) than the ones asked for."""


class StorageError(DistillgateError):
    """Writing to disk failed (no space left, a file-size limit, an I/O error, a read-only file system): the
    message names the file and the cause. What was committed before stays committed."""


class LockHeldError(DistillgateError):
    """Another process holds the writer lock of a run."""


class LockLostError(DistillgateError):
    """This process held a run's writer lock, but the lock file was deleted or replaced under it: another
    writer may have taken the run, so nothing more is committed."""


def reject_unknown(values, allowed, what: str) -> None:
    """ValueError (inside a pydantic validator: the field's error) naming the ``values`` not in ``allowed``."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what}(s) {bad}; allowed: {list(allowed)}")
