"""One writer per run dir: an exclusive lock file, held while a stage writes there.

Two runs writing into one folder mix their files (one run's record and adapter beside the other's calibration
set and overrides) and both end well, so the second writer is refused instead. The lock is a file created with
``O_CREAT | O_EXCL`` in the run dir, holding the pid, host and start time of its holder; it is removed when the
holder ends. A holder killed with ``kill -9`` leaves it behind: a later run on the same host finds its pid gone
(or reused by another process), reports the lock as stale and takes it over; a lock written on another host
cannot be checked from here, so it is refused with that host named and how to remove it.

Only the first process of a launched job locks (``RANK`` and ``LOCAL_RANK`` unset or 0): the other ranks of a
torchrun or DDP job write their parts into the same run dir by design. Locks are re-entrant within a process
(the CLI takes one before Hydra writes ``.hydra/``, the run record takes it again). Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtransfer.errors import ArtifactError

log = logging.getLogger(__name__)

LOCK_FILE = ".fmtransfer.lock"
_TAKEOVER = ".takeover"
_UNREADABLE_RETRIES = 10  # a lock just created may not hold its content yet: read again for ~0.5 s


@dataclass
class _Held:
    path: Path
    token: str
    depth: int = 1


_HELD: dict[str, _Held] = {}


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), None elsewhere: with the pid it
    names one process, so a pid reused by another process is not mistaken for the lock's holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` on this host is the one that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def launched_non_zero_rank() -> bool:
    """True in a process that a launcher started as a rank other than the first (RANK or LOCAL_RANK set, not 0)."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in ("RANK", "LOCAL_RANK"))


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def _describe(info: dict[str, Any]) -> str:
    return (f"{info.get('stage') or 'a run'} (pid {info.get('pid')} on host {info.get('host')}, since "
            f"{info.get('started')})")


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None while it is empty or half-written."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can sync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create(path: Path, stage: str | None) -> str:
    """Create the lock file, failing with FileExistsError if there is one; returns its token."""
    token = secrets.token_hex(8)
    pid = os.getpid()
    info = {"pid": pid, "host": socket.gethostname(), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"), "stage": stage, "process_start": _process_start(pid), "token": token}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return token


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's content, read again while a creator may still be writing it; None if the file went away.

    Raises:
        ArtifactError: the file stays empty or unreadable.
    """
    for _ in range(_UNREADABLE_RETRIES):
        if not path.exists():
            return None
        if (info := _read(path)) is not None:
            return info
        time.sleep(0.05)
    raise ArtifactError(f"{path.parent} is locked by {path}, which is unreadable (not a lock written by fmtransfer, "
                        f"or one cut short); if no run is writing into {path.parent}, remove {path} and start again")


def _take_over(path: Path, stale: dict[str, Any], stage: str | None) -> str | None:
    """Replace the stale lock ``stale`` by one of ours; None if another process changed it meanwhile.

    A second file, created exclusively, makes the check-remove-create one step among processes that all found
    the same stale lock, so only one of them removes it.
    """
    guard = path.with_name(path.name + _TAKEOVER)
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ArtifactError(f"{path.parent}: another process is taking over the stale lock {path} ({guard} exists); "
                            f"if none is, remove {guard} and start again") from None
    os.close(fd)
    try:
        if _read(path) != stale:
            return None
        path.unlink()
        try:
            return _create(path, stage)
        except FileExistsError:
            return None
    finally:
        guard.unlink()


def acquire(run_dir: str | Path, stage: str | None = None) -> bool:
    """Take the lock of ``run_dir`` (created if missing) for this process.

    Returns:
        True if this call holds it (release it with :func:`release`); False in a non-zero rank of a launched job,
        which never locks.

    Raises:
        ArtifactError: a live process on this host holds it, or a process on another host does (named, with the
            file to remove if that run is dead), or the lock file is unreadable.
    """
    if launched_non_zero_rank():
        return False
    run_dir = Path(run_dir)
    key = _key(run_dir)
    if key in _HELD:
        _HELD[key].depth += 1
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    host = socket.gethostname()
    while True:
        try:
            _HELD[key] = _Held(path, _create(path, stage))
            return True
        except FileExistsError:
            pass
        info = _holder(path)
        if info is None:
            continue  # released meanwhile
        if info.get("host") != host:
            raise ArtifactError(f"{run_dir} is in use by {_describe(info)}; this is host {host}, which cannot tell "
                                f"whether that process still runs. Two runs in one directory would mix their files: "
                                f"write elsewhere (hydra.run.dir=... or run_dir=...), or if that run is dead, remove "
                                f"{path} and start again")
        if _alive(int(info["pid"]), info.get("process_start")):
            raise ArtifactError(f"{run_dir} is in use by {_describe(info)}, which is still running. Two runs in one "
                                f"directory would mix their files: wait for it to end, or write elsewhere "
                                f"(hydra.run.dir=... or run_dir=...)")
        token = _take_over(path, info, stage)
        if token is not None:
            log.warning(f"{run_dir}: took over a stale lock: {_describe(info)} is no longer running (killed?); "
                        f"its files in this directory are what it left")
            _HELD[key] = _Held(path, token)
            return True


def release(run_dir: str | Path) -> None:
    """Release this process's hold on ``run_dir`` (the file goes when the outermost hold ends)."""
    key = _key(Path(run_dir))
    held = _HELD.get(key)
    if held is None:
        return
    held.depth -= 1
    if held.depth > 0:
        return
    del _HELD[key]
    info = _read(held.path)
    if info is not None and info.get("token") == held.token:  # never remove a lock another process took over
        with contextlib.suppress(FileNotFoundError):
            held.path.unlink()


def release_all() -> None:
    """Release every lock this process holds (the CLI's last word, however the stage ended)."""
    for key in list(_HELD):
        _HELD[key].depth = 1
        release(key)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, stage: str | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; see :func:`acquire`."""
    held = acquire(run_dir, stage)
    try:
        yield
    finally:
        if held:
            release(run_dir)
