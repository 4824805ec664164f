"""One trainer per run directory: a lock file `<run_dir>/train.lock` holding the owner's pid,
host and start time (JSON).

    acquire:  create the file exclusively (O_CREAT | O_EXCL): only one process can succeed.
    held:     RunDirLocked (one line: who holds it, since when, which file).
    stale:    the owner ran on this host and its pid is gone (or is now another process, by its
              start time in /proc): the lock is taken over with a warning.
    release:  the owner removes the file on exit, also on an error; a killed owner leaves it
              behind as a stale lock.

A lock written from another host cannot be checked from here: it is refused, and the message
says to remove the file if that trainer is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import socket
import time
from typing import Iterator, Optional

from gsa_jax.errors import RunError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunDirLocked(RunError):
    """Another trainer holds the run directory."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so split after its ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(owner: dict) -> bool:
    """Whether the lock's owner (on this host) still runs."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    started = owner.get("process_start")
    now = _process_start(pid)
    return started is None or now is None or started == now  # a reused pid is another process


def _describe(owner: dict, path: pathlib.Path) -> str:
    return (f"pid {owner.get('pid')} on host {owner.get('host')!r}, started "
            f"{owner.get('started')}; lock file {path}")


def _read(path: pathlib.Path) -> Optional[dict]:
    """The lock's content; None when the file vanished; {} when it is not a JSON object yet
    (its owner is between creating and writing it) or is damaged."""
    for attempt in range(3):
        try:
            owner = json.loads(path.read_text())
            if isinstance(owner, dict):
                return owner
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.2 * (attempt + 1))
    return {}


def _try_create(path: pathlib.Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(run_dir: str | os.PathLike) -> pathlib.Path:
    """Creates the run directory if needed and takes its lock; returns the lock file's path.

    Raises RunDirLocked when a live trainer (or one on another host) holds it."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "process_start": _process_start(os.getpid())}
    for _ in range(5):  # a lost race with another process taking a stale lock: look again
        if _try_create(path, record):
            return path
        owner = _read(path)
        if owner is None:
            continue  # released meanwhile
        if not owner:
            raise RunDirLocked(f"{path} exists but cannot be read; if no trainer uses "
                               f"{run_dir}, remove the file")
        if owner.get("host") != host:
            raise RunDirLocked(f"{run_dir} is locked by a trainer on another host "
                               f"({_describe(owner, path)}); if it no longer runs, remove "
                               f"the lock file")
        if _alive(owner):
            raise RunDirLocked(f"{run_dir} is in use by another trainer "
                               f"({_describe(owner, path)}); wait for it to finish, or use "
                               f"another run_dir")
        # Stale: move it out of the way under a name of our own. Of two processes taking it
        # over, one renames it; the other finds nothing to rename, or the first one's new lock,
        # which it puts back.
        aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        moved = _read(aside) or {}
        if moved == owner:
            aside.unlink(missing_ok=True)
            log.warning("taking over the stale lock of a trainer that no longer runs (%s)",
                        _describe(owner, path))
            continue
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            os.replace(aside, path)
        aside.unlink(missing_ok=True)
    raise RunDirLocked(f"could not take the lock {path}: other processes keep taking it")


def release(path: pathlib.Path) -> None:
    """Removes the lock file if this process still owns it."""
    owner = _read(path) if path.exists() else None
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Holds the run directory's lock for the block (nothing when not `enabled`: only process
    0 of a multi-process run takes it)."""
    if not enabled:
        yield
        return
    path = acquire(run_dir)
    try:
        yield
    finally:
        release(path)
