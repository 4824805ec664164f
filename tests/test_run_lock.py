"""The run directory's lock (`gsa_jax.run_lock`), in process: who may take it, what a refusal
says, when a lock is stale, that it is released on errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from gsa_jax import run_lock
from gsa_jax.run_lock import RunDirLocked


def write_lock(run_dir, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / run_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **owner}))
    return path


def exited_pid() -> int:
    """The pid of a process that has already exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_lock_is_created_with_the_owner_and_removed_on_release(tmp_path):
    run_dir = tmp_path / "new" / "run"            # created by the lock
    with run_lock.locked(run_dir):
        owner = json.loads((run_dir / run_lock.LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert owner["started"] and owner["process_start"] == run_lock._process_start(os.getpid())
        # A second taker in the same state as another process: refused while held.
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            run_lock.acquire(run_dir)
    assert not (run_dir / run_lock.LOCK_NAME).exists()


def test_released_when_the_block_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock.locked(tmp_path):
            1 / 0
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_live_owner_refuses_and_keeps_its_lock(tmp_path):
    path = write_lock(tmp_path, pid=os.getppid())   # the process that started this test
    before = path.read_text()
    with pytest.raises(RunDirLocked) as info:
        run_lock.acquire(tmp_path)
    message = str(info.value)
    assert "in use by another trainer" in message and f"pid {os.getppid()}" in message
    assert str(path) in message and "\n" not in message
    assert path.read_text() == before


def test_another_hosts_lock_is_refused(tmp_path):
    path = write_lock(tmp_path, pid=os.getpid(), host="some-other-host.example")
    with pytest.raises(RunDirLocked, match="another host .*some-other-host.*remove the lock"):
        run_lock.acquire(tmp_path)
    assert path.exists()


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    pid = exited_pid()
    write_lock(tmp_path, pid=pid)
    with caplog.at_level("WARNING"):
        path = run_lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and f"pid {pid}" in r.getMessage()
               for r in caplog.records)
    run_lock.release(path)
    assert not path.exists()


def test_a_reused_pid_is_not_its_old_owner(tmp_path):
    """The lock's pid runs, but started at another time than the lock's owner did: stale."""
    start = run_lock._process_start(os.getppid())
    if start is None:
        pytest.skip("no /proc process start times on this system")
    write_lock(tmp_path, pid=os.getppid(), process_start=str(int(start) + 1))
    path = run_lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    run_lock.release(path)


def test_an_unreadable_lock_is_refused(tmp_path):
    (tmp_path / run_lock.LOCK_NAME).write_text("{not json")
    with pytest.raises(RunDirLocked, match="cannot be read"):
        run_lock.acquire(tmp_path)


def test_release_leaves_another_owners_lock(tmp_path):
    path = write_lock(tmp_path, pid=os.getppid())
    run_lock.release(path)
    assert path.exists()
