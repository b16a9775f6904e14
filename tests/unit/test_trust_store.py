"""Issue 15, the run store under hostile conditions: a deleted lock file, read-only folders, a garbage catalog,
a corrupt shared blob, a full disk."""

from __future__ import annotations

import os

import pytest

from distillgate.errors import LockLostError
from distillgate.store import RunStore


def _commit(store, text: str, iteration: int = 0) -> int:
    with store.begin_version(iteration) as vw:
        vw.add_json("x.json", {"text": text})
        return vw.commit()


def test_deleted_lock_stops_the_first_writer_and_its_abort_keeps_the_second_writers_manifest(tmp_path):
    a = RunStore.create(tmp_path, {}, run_id="r")
    _commit(a, "a1")
    vw = a.begin_version(1)                           # A is writing version 2 ...
    vw.add_json("x.json", {"text": "a2"})
    os.unlink(tmp_path / "r" / "run.lock")            # ... when someone deletes the lock file
    b = RunStore.open(tmp_path, "r", writer=True)     # so a second writer gets in
    assert _commit(b, "b2", iteration=1) == 2
    with pytest.raises(LockLostError, match="deleted or replaced"):
        vw.commit()
    vw.abort()
    with pytest.raises(LockLostError):                # and every later write of A is refused too
        a.set_run_status("failed")
    a.close()
    v = b.get_version(2)
    v.verify(deep=True)                               # B's committed manifest survived A's abort
    assert v.load_json("x.json") == {"text": "b2"}
    b.close()


def test_replaced_lock_file_is_detected(tmp_path):
    a = RunStore.create(tmp_path, {}, run_id="r")
    lock = tmp_path / "r" / "run.lock"
    os.replace(lock, tmp_path / "old.lock")
    lock.write_text("")
    with pytest.raises(LockLostError, match="now inode"):
        _commit(a, "x")
    a.close()
