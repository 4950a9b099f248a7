"""Packed shards for big data: an ImageFolder's encoded images and labels in ArrayRecord files.

`pack(folder, out)` writes `out/{train,val}-SSSSS-of-NNNNN.array_record` (grain's native
random-access format; each record is a small header, the original file name and the file's
bytes, unchanged), `{split}-labels.npy`, and last `shards.json`, which lists every shard with its
record count and byte size. Records keep the folder index's order, so record `i` of a split is
image `i` of `index.FolderSource` and both give the same batches.

A pack is resumable rather than atomic: shards are written under a temporary name and renamed
when closed, a marker file names the folder being packed, and `shards.json` appears only when
every shard is in place, so a killed pack never leaves a set that trains; running the same
command again keeps the finished shards and writes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deit.data.host import decode_image
from deit.data.index import OPEN_LOCK, FolderSource, image_folder
from deit.errors import InputError

log = logging.getLogger("deit")

MANIFEST = "shards.json"
MARKER = ".deit-pack.json"
FORMAT = "deit-imagefolder-v1"
WRITER_OPTIONS = (
    "group_size:1,uncompressed"  # one record per chunk: random access; JPEGs don't shrink
)
RECORDS_PER_SHARD = 10_000  # ~1 GB of ImageNet JPEGs per shard
_HEADER = struct.Struct("<iH")  # label, length of the UTF-8 file name


def encode_record(label: int, name: str, data: bytes) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    return _HEADER.pack(label, len(raw)) + raw + data


def decode_record(record: bytes) -> tuple[int, str, bytes]:
    label, size = _HEADER.unpack_from(record)
    start = _HEADER.size
    name = record[start : start + size].decode("utf-8", "surrogateescape")
    return label, name, record[start + size :]


def is_shard_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file() or (Path(path) / MARKER).is_file()


def _shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.array_record" for i in range(count)]


class ShardSource:
    """One split of a packed shard set; opens its shards lazily (in each worker process)."""

    def __init__(self, folder: Path, split: str, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.split = split
        info = manifest["splits"][split]
        self.classes: list[str] = manifest["classes"]
        self.shards: list[dict[str, Any]] = info["shards"]
        self._labels_file = info["labels"]
        self._reader: Any = None
        self._labels: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_labels": None}

    def __len__(self) -> int:
        return sum(s["records"] for s in self.shards)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            with OPEN_LOCK:  # grain's reading threads get here together
                if self._labels is None:
                    self._labels = np.load(self.folder / self._labels_file, mmap_mode="r")
        return self._labels

    def record(self, index: int) -> tuple[int, str, bytes]:
        if self._reader is None:
            import grain

            with OPEN_LOCK:
                if self._reader is None:
                    paths = [str(self.folder / s["file"]) for s in self.shards]
                    self._reader = grain.sources.ArrayRecordDataSource(paths)
        return decode_record(self._reader[int(index)])

    def name(self, index: int) -> str:
        return f"{self.folder}/{self.split}[{index}] ({self.record(index)[1]})"

    def load(self, index: int) -> np.ndarray:
        try:
            return decode_image(self.record(index)[2])
        except ValueError as err:
            reason = str(err).split(": ", 1)[-1]
            raise InputError(f"cannot decode image {self.name(index)}: {reason}") from err

    def summary(self) -> str:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return (
            f"{self.folder} [{self.split}]: {len(self.classes)} classes, {len(self):,} images "
            f"({counts.min():,}-{counts.max():,} per class) in {len(self.shards)} shard(s)"
        )


def open_shards(folder: str | Path) -> tuple[ShardSource, ShardSource]:
    """(train, val) of a shard set, after checking that every listed shard is there, whole."""
    folder = Path(folder).absolute()
    if not (folder / MANIFEST).is_file():
        raise InputError(
            f"{folder} holds an unfinished pack (no {MANIFEST}); run the same deit data pack "
            "command again to finish it"
        )
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise InputError(
            f"{folder / MANIFEST} is format {manifest.get('format')!r}; expected {FORMAT!r}"
        )
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise InputError(
                    f"shard {path} is missing; expected the {len(info['shards'])} {split} "
                    f"shards listed in {MANIFEST}"
                )
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise InputError(
                    f"shard {path} is {size:,} bytes; expected {shard['bytes']:,} (truncated or "
                    "changed since it was packed): copy it again or pack again"
                )
    sources = ShardSource(folder, "train", manifest), ShardSource(folder, "val", manifest)
    for source in sources:
        log.info(source.summary())
    return sources


def _write_shard(source: FolderSource, lo: int, hi: int, path: Path, done: Any) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    try:
        for i in range(lo, hi):
            writer.write(
                encode_record(int(source.labels[i]), source.relative(i), source.read_bytes(i))
            )
            done(1)
    finally:
        writer.close()
    os.replace(tmp, path)


def pack(
    folder: str | Path,
    out: str | Path,
    *,
    records_per_shard: int = RECORDS_PER_SHARD,
    threads: int = 8,
    progress: bool = True,
) -> Path:
    """Pack the ImageFolder `folder` into shards under `out` (new or empty, or an unfinished
    pack of the same folder, which is continued). Returns `out`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from deit.progress import RateColumn

    if records_per_shard < 1:
        raise InputError(f"records_per_shard {records_per_shard}; expected 1 or more")
    out = Path(out).absolute()
    train, val = image_folder(folder)
    marker = {
        "folder": str(Path(folder).absolute()),
        "records_per_shard": records_per_shard,
        # The listing each shard was cut from: a folder changed since means start again.
        "listings": [train.listing, val.listing],
    }
    if out.exists() and any(out.iterdir()):
        previous = None
        if (out / MARKER).is_file():
            previous = json.loads((out / MARKER).read_text())
        if previous != marker:
            raise InputError(
                f"{out} is not empty; expected a new or empty folder (or an unfinished pack of "
                "the same, unchanged folder with the same settings, which is continued)"
            )
        log.info(f"continuing the unfinished pack in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(marker))
    jobs, splits = [], {}
    for split, source in (("train", train), ("val", val)):
        n = len(source)
        count = max(-(-n // records_per_shard), 1)
        names = _shard_names(split, count)
        for i, name in enumerate(names):
            lo, hi = i * records_per_shard, min((i + 1) * records_per_shard, n)
            jobs.append((source, lo, hi, out / name))
        labels = f"{split}-labels.npy"
        np.save(out / labels, np.asarray(source.labels, np.int32))
        splits[split] = {"labels": labels, "shards": [], "names": names, "n": n}
    todo = [j for j in jobs if not j[3].is_file()]
    columns = (BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    with Progress("packing", *columns, disable=not progress) as bar:
        task = bar.add_task("pack", total=sum(hi - lo for _, lo, hi, _ in todo))
        with ThreadPoolExecutor(max(threads, 1)) as pool:
            done = lambda k: bar.advance(task, k)
            for future in [pool.submit(_write_shard, *job, done) for job in todo]:
                future.result()
    for info in splits.values():
        n, per = info.pop("n"), records_per_shard
        for i, name in enumerate(info.pop("names")):
            records = min((i + 1) * per, n) - i * per
            info["shards"].append(
                {"file": name, "records": records, "bytes": (out / name).stat().st_size}
            )
    manifest = {"format": FORMAT, "classes": train.classes, "source": str(train.root.parent)}
    manifest["splits"] = splits
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    (out / MARKER).unlink()
    return out
