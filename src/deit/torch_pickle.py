"""PyTorch checkpoint files without torch: `torch.save` pickles read without running them, and
`.safetensors` read and written through `safetensors.numpy`.

Two container formats exist. The zip format (PyTorch >= 1.6): `<prefix>/data.pkl` holds the pickled
object and `<prefix>/data/<key>` the raw bytes of each storage, `<prefix>/byteorder` the byte order.
The legacy format (`_use_new_zipfile_serialization=False`) is five things back to back: a pickled
magic number, a pickled protocol version, a pickled dict of system facts, the pickled object, the
pickled list of storage keys, then for each key an int64 element count followed by the raw bytes.

In both, tensors are pickled as calls to `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` whose storage is a *persistent id* `("storage", <StorageType>, key, location, numel)`.
A pickle can name any global and call it, so the unpickler here resolves only an allow-list of
tensor-rebuilding names to local stand-ins that build numpy arrays; any other name is refused before
it is looked up, so nothing in the file ever runs.

Over 400 lines, kept whole: the claim that nothing in a file runs rests on the allow-list, the
stand-ins it resolves to, and the two container readers that hand the unpickler its storages and
bound what it reads. A reviewer checks that claim by reading this one module top to bottom; split,
it would span several.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from deit.errors import InputError

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin")
FORMATS = "a torch.save file (.pth, .pth.tar, .pt, .bin) or .safetensors"
# Official checkpoints wrap the weights as {'model': ...}; training frameworks use the others.
WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")

# Constants of the legacy format, from torch/serialization.py.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage class name -> element dtype. bfloat16 is read as its raw 16 bits (numpy has no bf16).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
    # Untyped storages hold bytes; torch only pickles them when a raw storage itself was saved.
    "UntypedStorage": "u1",
    "TypedStorage": "u1",
}
TORCH_DTYPES: dict[str, str] = {
    "float32": "f4", "float": "f4", "float64": "f8", "double": "f8", "float16": "f2",
    "half": "f2", "bfloat16": "bf16", "int64": "i8", "long": "i8", "int32": "i4", "int": "i4",
    "int16": "i2", "short": "i2", "int8": "i1", "uint8": "u1", "bool": "b1",
}  # fmt: skip


@dataclass(frozen=True)
class StorageType:
    """Stand-in for `torch.FloatStorage` and friends: only the element type matters here."""

    code: str

    def raw_dtype(self, byteorder: str) -> np.dtype:
        code = "u2" if self.code == "bf16" else self.code
        return np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")


@dataclass
class Storage:
    """A storage referenced by the pickle; `data` (flat, raw dtype) is filled once it is read."""

    key: str
    kind: StorageType
    numel: int
    data: np.ndarray | None = None
    parent: Storage | None = None  # legacy views into another storage
    start: int = 0

    def flat(self) -> np.ndarray:
        if self.parent is not None:
            return self.parent.flat()[self.start : self.start + self.numel]
        if self.data is None:
            raise InputError(
                f"storage {self.key!r} is referenced but its bytes are not in the file"
            )
        return self.data


@dataclass
class TensorRef:
    """A tensor waiting for its storage bytes: `storage.flat()` viewed with offset/size/stride."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    negate: bool = False
    conjugate: bool = False

    def materialize(self) -> np.ndarray:
        flat = self.storage.flat()
        size, stride, offset = self.size, self.stride, self.offset
        if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise InputError(
                f"tensor with size {size}, stride {stride}, offset {offset} is corrupt"
            )
        if 0 in size:
            out = np.empty(size, flat.dtype.newbyteorder("="))
        else:
            # Bounds are checked before as_strided, which would otherwise read past the buffer.
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= flat.size:
                raise InputError(
                    f"tensor of size {size} at offset {offset} runs past its storage of "
                    f"{flat.size} elements; the file is corrupt"
                )
            item = flat.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=[s * item for s in stride], writeable=False
            )
            out = np.array(view, dtype=flat.dtype.newbyteorder("="))
        if self.storage.kind.code == "bf16":
            # bfloat16 is the top half of a float32: widening is exact.
            out = (out.astype(np.uint32) << 16).view(np.float32)
        if self.negate:
            out = -out
        if self.conjugate:
            out = np.conj(out)
        return out


class Namespace:
    """Inert stand-in for `argparse.Namespace` (official DeiT checkpoints store their `args`)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    if not isinstance(storage, Storage):
        raise InputError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    return TensorRef(
        storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    )


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    ref = _rebuild_tensor(storage, offset, size, stride)
    if isinstance(metadata, dict):
        ref.negate, ref.conjugate = bool(metadata.get("neg")), bool(metadata.get("conj"))
    return ref


def _rebuild_parameter(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None
) -> Any:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): Namespace,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed names; `storage_for` turns persistent ids
    (without their leading "storage") into `Storage` records."""

    def __init__(self, file: Any, path: Path, storage_for: Callable[[tuple], Storage]) -> None:
        super().__init__(file)
        self._path = path
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.cuda", "torch.storage") and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return StorageType(TORCH_DTYPES[name])
        raise InputError(
            f"refusing to load {self._path}: it names {module}.{name}, which is not a tensor, "
            "storage or plain container; only state dicts of tensors are read, and nothing in "
            "the file is executed"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and _text(pid[0]) == "storage"):
            raise InputError(f"{self._path}: unknown persistent id {str(pid)[:80]}")
        return self._storage_for(pid[1:])


def _text(value: Any) -> str:
    # Files written by Python 2 era torch carry some internal keys as bytes.
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _storage_kind(kind: Any) -> StorageType:
    if not isinstance(kind, StorageType):
        raise InputError(f"storage of type {kind!r}; expected a torch *Storage class")
    return kind


def _materialize(obj: Any) -> Any:
    """Replace every TensorRef inside dicts, lists and tuples by its numpy array."""
    if isinstance(obj, TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        pickles = [n for n in pickles if n.count("/") == 1] or pickles
        if len(pickles) != 1:
            raise InputError(f"{path} is a zip file but not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: dict[str, Storage] = {}

        def storage_for(info: tuple) -> Storage:
            kind, key, _location, numel = info[:4]
            key = _text(key)
            if key not in storages:
                storage = Storage(key, _storage_kind(kind), int(numel))
                dtype = storage.kind.raw_dtype(byteorder)
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise InputError(f"{path}: storage {key!r} is missing from the archive")
                raw = archive.read(entry)
                if len(raw) < storage.numel * dtype.itemsize:
                    raise InputError(f"{path}: storage {key!r} is truncated")
                storage.data = np.frombuffer(raw, dtype, count=storage.numel)
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as f:
            size = archive.getinfo(pickles[0]).file_size
            obj = RestrictedUnpickler(_Bounded(f, size), path, storage_for).load()
    return _materialize(obj)


class _Bounded:
    """A binary file whose reads never ask for more than what is left in it, so that a length
    field in a damaged file cannot make the unpickler allocate exabytes (MemoryError) first."""

    def __init__(self, file: Any, size: int) -> None:
        self._file = file
        self._size = size

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._file.tell()
        return self._file.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._file.readline()


def _load_legacy(path: Path) -> Any:
    storages: dict[str, Storage] = {}

    def storage_for(info: tuple) -> Storage:
        kind, key, _location, numel, view = info[:5]
        key = _text(key)
        if key not in storages:
            storages[key] = Storage(key, _storage_kind(kind), int(numel))
        root = storages[key]
        if view is None:
            return root
        view_key, offset, view_numel = view
        return Storage(_text(view_key), root.kind, int(view_numel), parent=root, start=int(offset))

    with path.open("rb") as raw:
        f = _Bounded(raw, path.stat().st_size)
        load = lambda: RestrictedUnpickler(f, path, storage_for).load()
        if load() != LEGACY_MAGIC:
            raise InputError("not a torch.save file (magic number differs)")
        if (version := load()) != LEGACY_PROTOCOL:
            raise InputError(f"legacy torch format version {version}, expected {LEGACY_PROTOCOL}")
        info = load()
        byteorder = (
            "little" if not isinstance(info, dict) or info.get("little_endian", 1) else "big"
        )
        obj = load()
        keys = load()
        for key in keys:
            storage = storages.get(_text(key))
            if storage is None:
                raise InputError(f"storage {key!r} is listed but never referenced")
            dtype = storage.kind.raw_dtype(byteorder)
            (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", f.read(8))
            raw = f.read(numel * dtype.itemsize)
            if numel < storage.numel or len(raw) < numel * dtype.itemsize:
                raise InputError(f"storage {key!r} is truncated")
            storage.data = np.frombuffer(raw, dtype, count=numel)
    return _materialize(obj)


def load_torch_file(path: str | Path) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

    bfloat16 tensors are widened to float32 (exactly); other dtypes are kept. Raises ValueError
    if the file names anything other than tensor-rebuilding functions, storage types,
    `OrderedDict`, `torch.Size` or `argparse.Namespace` (read as an inert stand-in).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cannot read {path}: no such file")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except ValueError as err:
        if str(err).startswith("refusing to load"):
            raise
        raise InputError(f"cannot read {path} as a torch.save file: {err}") from err
    except (
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        io.UnsupportedOperation,
        struct.error,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,  # a length field past sys.maxsize
        MemoryError,
        RecursionError,
    ) as err:
        raise InputError(f"cannot read {path} as a torch.save file: {err!r}") from err


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        arrays = load_file(str(path))
    except TypeError:
        # Older safetensors cannot give numpy bfloat16; its flax reader can (as jax arrays).
        from safetensors.flax import load_file as load_jax

        arrays = load_jax(str(path))
    # bfloat16 is widened (exactly) so that callers only ever see numpy's own dtypes.
    return {
        k: np.asarray(v, np.float32 if str(v.dtype) == "bfloat16" else v.dtype)
        for k, v in arrays.items()
    }


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`{key: array}` from a PyTorch checkpoint, without torch and without running its pickle.

    Reads `.pth` / `.pth.tar` / `.pt` / `.bin` (zip or legacy `torch.save` format) and
    `.safetensors`. Unwraps `{'model': ...}` (then `state_dict`, `model_ema`), drops non-tensor
    entries (`args`, `epoch`, ...) and a DDP `module.` prefix. bfloat16 becomes float32.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".safetensors"):
        if not path.is_file():
            raise InputError(f"cannot read {path}: no such file; expected {FORMATS}")
        try:
            obj: Any = _load_safetensors(path)
        except Exception as err:
            raise InputError(f"cannot read {path} as .safetensors: {err}") from err
    elif name.endswith(TORCH_SUFFIXES):
        obj = load_torch_file(path)
    else:
        raise InputError(f"cannot read {path}: unknown extension; expected {FORMATS}")
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {}
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    if not tensors:
        found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"no tensors in {path} (found {found}); expected a state dict")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def save_torch(state_dict: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write a timm-layout state dict as `.safetensors` (timm and torch read it; no pickle)."""
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise InputError(f"cannot write {path}: only .safetensors is written (no pickles)")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    save_file(arrays, str(path), metadata={"format": "pt"})
    return path
