"""Free space on the filesystem of a run's outputs: checked before a checkpoint or an export is
written, and a write that still ran out (another writer filled the disk meanwhile) reported the
same way, as `NoSpaceError` naming the folder and the bytes needed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from deit.errors import NoSpaceError

# Metadata, manifests and filesystem blocks beside the arrays themselves.
MARGIN = 1 << 20


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def no_space(where: str | os.PathLike, needed: int, free: int | None = None) -> NoSpaceError:
    free = free_bytes(where) if free is None else free
    return NoSpaceError(
        f"no space left on the device for {where}: it needs about {_mib(needed + MARGIN)}, "
        f"{_mib(free)} are free; free some space, then resume the run"
    )


def check(where: str | os.PathLike, needed: int, free: int | None = None) -> None:
    """`NoSpaceError` unless `needed` bytes (plus a margin) fit where `where` is written;
    `free`: the free bytes already measured (the least over the processes)."""
    free = free_bytes(where) if free is None else free
    if free < needed + MARGIN:
        raise no_space(where, needed, free)


def is_no_space(err: BaseException) -> bool:
    """ENOSPC, also as Orbax/TensorStore pass it on (a ValueError quoting the OS error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os_error_code='28'" in text
