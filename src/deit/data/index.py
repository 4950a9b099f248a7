"""ImageFolder listing: a parallel directory scan, cached as a small index that later starts reuse.

The layout and order are torchvision's `ImageFolder`: `root/<class>/**/<image>`, classes in sorted
folder order, then folder by folder in sorted path order, files sorted within each; hidden files
and folders (a leading dot) and files without an image suffix (torchvision's, and `.gif`) are
ignored. Nothing is decoded here: an unreadable image
is found when the pipeline reads it (see `pipeline.py`), or up front by `deit data check`.

The index lives in `cache_home()/index/<hash of the folder's real path>/`: `meta.json` (classes,
counts, the modification time of every folder scanned) and two `.npy` arrays (relative paths,
labels) that worker processes memory-map, so each reads only the records it is handed. A start
compares the folders' modification times with the index, one `stat` per folder: adding, removing
or renaming a file changes its folder's time, and the split is then scanned again. A folder whose
time is within 2 s of the scan that wrote the index, or later, counts as changed (a file added in
the same clock tick as the scan would otherwise go unseen; git's "racily clean" entries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deit.data.config import IMAGE_SUFFIXES, cache_home
from deit.data.host import decode_image
from deit.errors import InputError

log = logging.getLogger("deit")

INDEX_VERSION = 1
# np.load is not safe to call from several threads at once (seen on Python 3.11).
OPEN_LOCK = threading.Lock()
SCAN_THREADS = 16  # directory listing waits on the file system, not the CPU
SHOWN_FILES = 2
RACY_MARGIN_NS = 2_000_000_000


def _scan_class(folder: str) -> tuple[list[str], dict[str, list[int]]]:
    """Image files under `folder` (relative, sorted) and `{folder: [mtime_ns, size]}` of every
    folder walked, symlinked folders followed as torchvision does."""
    files, dirs, todo = [], {}, [("", folder)]
    while todo:
        rel, path = todo.pop()
        st = os.stat(path)
        dirs[path] = [st.st_mtime_ns, st.st_size]
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}{entry.name}"
                if entry.is_dir():
                    todo.append((f"{name}/", entry.path))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    files.append(name)
    # torchvision's order: folder by folder (sorted paths), files sorted within each.
    return sorted(files, key=lambda f: os.path.split(f)), dirs


def class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise InputError(
            f"{root} is not a folder; expected PATH/train/<class>/ and PATH/val/<class>/"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    return classes


def _unchanged(dirs: dict[str, list[int]], scanned_ns: int) -> bool:
    try:
        return all(
            [(st := os.stat(d)).st_mtime_ns, st.st_size] == stamp and stamp[0] < scanned_ns
            for d, stamp in dirs.items()
        )
    except OSError:
        return False


class FolderSource:
    """One split of an ImageFolder through its index; see the module docstring."""

    def __init__(self, root: Path, index_dir: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.index_dir = index_dir
        self.classes: list[str] = meta["classes"]
        self.counts: list[int] = meta["counts"]
        self._files = {k: meta[k] for k in ("paths", "labels")}
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            with OPEN_LOCK:  # grain's reading threads get here together
                if key not in self._arrays:
                    path = self.index_dir / self._files[key]
                    self._arrays[key] = np.load(path, mmap_mode="r")
        return self._arrays[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}}

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def listing(self) -> str:
        """Names this exact listing (a digest of every path): a changed folder gets another."""
        return self._files["paths"]

    @property
    def labels(self) -> np.ndarray:
        return self._array("labels")

    def relative(self, index: int) -> str:
        return self._array("paths")[index].decode("utf-8", "surrogateescape")

    def name(self, index: int) -> str:
        return str(self.root / self.relative(index))

    def load(self, index: int) -> np.ndarray:
        return decode_image(self.name(index))

    def read_bytes(self, index: int) -> bytes:
        return (self.root / self.relative(index)).read_bytes()

    def summary(self, note: str) -> str:
        """One line: classes, counts and the first/last few files."""
        n, lo, hi = len(self), min(self.counts), max(self.counts)
        shown = [self.relative(i) for i in range(min(SHOWN_FILES, n))]
        last = [self.relative(i) for i in range(max(n - SHOWN_FILES, SHOWN_FILES), n)]
        files = ", ".join(shown) + (" ... " + ", ".join(last) if last else "")
        return (
            f"{self.root}: {len(self.classes)} classes, {n:,} images ({lo:,}-{hi:,} per class; "
            f"{note}): {files}"
        )


def _scan(root: Path, classes: list[str]) -> dict[str, Any]:
    """The listing of `root` as index metadata plus its `paths` and `labels` arrays."""
    # Folder times come from a coarser clock than time_ns (and NFS from the server's): a margin.
    tick, scanned_ns = time.perf_counter(), time.time_ns() - RACY_MARGIN_NS
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scans = list(pool.map(_scan_class, [str(root / c) for c in classes]))
    dirs = {str(root): [(st := os.stat(root)).st_mtime_ns, st.st_size]}
    rel, labels, counts = [], [], []
    for label, (name, (files, walked)) in enumerate(zip(classes, scans, strict=True)):
        if not files:
            raise InputError(
                f"class folder {root / name} holds no images; expected files ending in "
                f"{', '.join(IMAGE_SUFFIXES)}"
            )
        rel += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
        counts.append(len(files))
        dirs.update(walked)
    paths = np.array([p.encode("utf-8", "surrogateescape") for p in rel])
    digest = hashlib.sha1(paths.tobytes()).hexdigest()[:12]
    return {
        "version": INDEX_VERSION,
        "root": str(root),
        "classes": classes,
        "counts": counts,
        "paths": f"paths-{digest}.npy",
        "labels": f"labels-{digest}.npy",
        "dirs": dirs,
        "scanned_ns": scanned_ns,
        "scan_seconds": time.perf_counter() - tick,
        "arrays": {"paths": paths, "labels": np.asarray(labels, np.int32)},
    }


def _write_index(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    arrays = meta.pop("arrays")
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        tmp = folder / f".{meta[key]}.{os.getpid()}.tmp"
        with tmp.open("wb") as f:
            np.save(f, array)
        os.replace(tmp, folder / meta[key])
    tmp = folder / f".meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, folder / "meta.json")  # last: its presence means the index is whole
    return meta


def index_folder(root: str | Path, classes: list[str] | None = None) -> FolderSource:
    """The split folder `root` (`root/<class>/...`) as a `FolderSource`, from its index when the
    folders are unchanged since it was written, else from a new scan (which rewrites it).

    `classes` fixes the class list (val takes train's); by default the sorted class folders.
    """
    root = Path(root).absolute()
    found = class_folders(root)
    classes = classes or found
    key = hashlib.sha1(os.path.realpath(root).encode("utf-8", "surrogateescape")).hexdigest()
    folder = cache_home() / "index" / key[:20]
    meta, note = None, "indexed"
    with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: scan again
        meta = json.loads((folder / "meta.json").read_text())
    if meta is not None:
        same = meta.get("version") == INDEX_VERSION and meta.get("classes") == classes
        if same and _unchanged(meta["dirs"], meta.get("scanned_ns", 0)) and found == classes:
            note = "index reused"
        else:
            log.info(f"note: {root} changed since its index was written; indexing it again")
            meta = None
    if meta is None:
        meta = _scan(root, classes)
        try:
            meta = _write_index(folder, meta)
        except OSError as err:
            raise InputError(
                f"cannot write the folder index in {folder} ({err.strerror}); expected a "
                "writable cache folder: set DEIT_HOME to one"
            ) from err
    source = FolderSource(root, folder, meta)
    log.info(source.summary(note))
    return source


def image_folder(root: str | Path) -> tuple[FolderSource, FolderSource]:
    """ImageFolder layout `root/{train,val}/<class>/<image>` as (train, val) sources."""
    root = Path(root)
    classes = class_folders(root / "train")
    val_classes = class_folders(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise InputError(
            f"train and val class folders differ: only in train {only_train}, only in val "
            f"{only_val}; expected the same classes in both"
        )
    return index_folder(root / "train", classes), index_folder(root / "val", classes)
