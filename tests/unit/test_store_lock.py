"""One writer per run: a second writer fails fast naming the holder; the kernel frees the lock on SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from distillgate.errors import LockHeldError
from distillgate.store import RunStore
from distillgate.store.lock import read_holder

HOLDER = textwrap.dedent("""
    import sys, time
    from distillgate.store import RunStore
    s = RunStore.open(sys.argv[1], "r", writer=True)
    print("READY", flush=True)
    time.sleep(120)
""")


def test_second_writer_in_process_fails_naming_holder(tmp_path):
    s = RunStore.create(tmp_path, {}, run_id="r")
    holder = rf"run r: .*held by pid {os.getpid()} on host {socket.gethostname()} since"
    with pytest.raises(LockHeldError, match=holder):
        RunStore.open(tmp_path, "r", writer=True)
    with RunStore.open(tmp_path, "r") as reader:  # readers never need the lock
        assert reader.info()["run_id"] == "r"
    s.close()
    assert read_holder(tmp_path / "r" / "run.lock") == {}  # a clean release clears the holder record
    RunStore.open(tmp_path, "r", writer=True).close()


def test_lock_freed_when_holder_is_sigkilled(tmp_path):
    RunStore.create(tmp_path, {}, run_id="r").close()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        with pytest.raises(LockHeldError, match=rf"held by pid {proc.pid} on host"):
            RunStore.open(tmp_path, "r", writer=True)
        assert read_holder(tmp_path / "r" / "run.lock")["pid"] == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with RunStore.open(tmp_path, "r", writer=True) as s:  # no stale lock to break by hand
        assert read_holder(tmp_path / "r" / "run.lock")["pid"] == os.getpid()
        assert s.writer


def test_writer_info_reports_live_and_dead_holders(tmp_path):
    RunStore.create(tmp_path, {}, run_id="r").close()
    with RunStore.open(tmp_path, "r") as reader:
        assert reader.writer_info() == {}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "READY"
            info = reader.writer_info()
            assert (info["pid"], info["alive"]) == (proc.pid, True)
        finally:
            proc.kill()
            proc.wait()
        assert reader.writer_info()["alive"] is False  # stale record, but the kernel already freed the lock
