"""One live run per output folder: `OUTPUT/run.lock`, held by process 0 of the run that writes
the folder, records its pid and host.

The lock is an `flock` on that file, which the kernel drops when the process dies however it
dies, so a lock left by a killed run is free again; the file's contents then name the dead
holder, and the new run takes it over with a note. A live holder makes `RunLock.acquire` refuse,
before anything in the folder is touched.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from deit.errors import InputError

log = logging.getLogger("deit")

LOCK = "run.lock"


class RunLock:
    """`with RunLock(output):` the body runs holding the folder's lock."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder).absolute() / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise InputError(
                    f"{self.path.parent} is in use by a live run ({_describe(holder)}); wait "
                    "for it to end, or choose another output folder"
                ) from None
            try:  # a holder that released (and removed) the file meanwhile: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        if previous:
            log.warning(
                f"took over the lock of {self.path.parent} from a run that is no longer alive "
                f"({_describe(previous)})"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: see the inode check above
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:  # cut short by a kill while it was written
        return {"pid": "?", "host": "?"}


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"
