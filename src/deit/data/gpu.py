"""The GPU input path, `--data.decode gpu`: the host reads file bytes and draws; the device decodes
(nvImageCodec) and augments (`data.device_augment`).

- **Workers** (grain, as on the host path) read each training record's encoded bytes and its
  header size, and draw its augmentation from `(seed, epoch, position)` with the host path's
  draws in the host path's order (`draw_train`: random-resized-crop box, flip, RandAugment ops,
  magnitudes and signs), shipped as small arrays (`pack`).
- **The loop's process** (`DeviceStage`) decodes the batch's JPEGs through nvImageCodec where it
  is installed and a GPU is there, else on the host with simplejpeg/PIL (`HostDecoder`, the
  fallback that also runs the tests on the CPU); pads the images to one bucket side (`BUCKETS`),
  so the device program compiles once per side; and runs crop + resize, flip and RandAugment as
  one jitted batch op. Normalisation, erasing and mixup stay in the train step, as on the host
  path. Evaluation batches take the host path.
- **Bad images** meet `bad_images` as on the host path: a file whose header cannot be read is
  found in the worker (`pipeline._MakeBatch._read`), one whose body does not decode is found
  here; under "error" the batch comes back marked (`take_bad` then raises naming the file),
  under "skip" the next readable record stands in, with the draws the bad one would have had.

JPEG decoders differ in their IDCT and chroma upsampling, so nvImageCodec's pixels are close to,
not equal to, libjpeg-turbo's; the draws, and so the crops, flips and ops, are the same.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from PIL import Image

from deit.data.config import DataConfig
from deit.data.device_augment import OP_ARGS, augment_batch
from deit.data.host import _DECODE_ERRORS, _decode_error, decode_image, random_resized_crop_box
from deit.data.randaugment import RandAugment, op_args
from deit.data.sources import BadImageError
from deit.errors import InputError

log = logging.getLogger("deit")

# Sides of the square buckets decoded images are padded to: a batch takes the smallest that
# holds its largest image, so a data set of photos compiles the device op a few times at most.
BUCKETS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
DECODE_THREADS = 8  # host fallback: simplejpeg and PIL release the GIL while they decode
MAX_SUBSTITUTES = 64  # as data.pipeline


def bucket(side: int) -> int:
    """The smallest bucket side at least `side` (a multiple of 1024 past the table)."""
    for b in BUCKETS:
        if side <= b:
            return b
    return -(-side // 1024) * 1024


# ---------------------------------------------------------------------------------------------
# Workers: bytes, header size and the draws


def read_bytes(data: bytes | str | Path) -> bytes:
    """The encoded file: `data` itself, or the file at that path (`ValueError` naming it)."""
    if isinstance(data, bytes):
        return data
    try:
        return Path(data).read_bytes()
    except OSError as e:
        raise _decode_error(str(data), e) from e


def header(raw: bytes, name: str) -> tuple[int, int, bool]:
    """`(height, width, gpu)`: the image's size from its header, and whether nvImageCodec should
    decode it (a YCbCr or grey JPEG; anything else decodes on the host, as the host path does)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            return h, w, img.format == "JPEG" and img.mode in ("RGB", "L")
    except _DECODE_ERRORS as e:
        raise _decode_error(name, e) from e


@dataclass(frozen=True)
class Draws:
    """One image's augmentation: crop `box` `(top, left, height, width)`, `flip`, and per
    RandAugment layer the op's index in `RandAugment.ops` (-1: not applied) and its arguments."""

    box: tuple[int, int, int, int]
    flip: bool
    op: np.ndarray  # (num_ops,) int32
    arg: np.ndarray  # (num_ops, OP_ARGS) float32


def draw_train(
    h: int, w: int, rng: np.random.Generator, cfg: DataConfig, ra: RandAugment | None
) -> Draws:
    """The draws `host.train_transform_encoded` makes for an `h x w` image, in its order:
    crop box, flip (only when `hflip > 0`), then RandAugment's (`RandAugment.draw`)."""
    box = random_resized_crop_box(h, w, rng, cfg.scale, cfg.ratio)
    flip = bool(cfg.hflip > 0 and rng.random() < cfg.hflip)
    layers = ra.num_ops if ra is not None else 0
    op = np.full((layers,), -1, np.int32)
    arg = np.zeros((layers, OP_ARGS), np.float32)
    if ra is not None:
        size = (cfg.img_size, cfg.img_size)
        for k, d in enumerate(ra.draw(rng)):
            op[k] = ra.ops.index(d.name)
            values = op_args(d.name, d.level, d.sign, ra, size)
            arg[k, : len(values)] = values
    return Draws(box, flip, op, arg)


def pack(
    raws: list[bytes],
    draws: list[Draws],
    sizes: list[tuple[int, int, bool]],
    seeds: list[list[int]],
    records: list[int],
) -> dict[str, np.ndarray]:
    """One local batch's bytes and draws as arrays (what workers hand the loop's process):
    `bytes` uint8 `(L, longest)`, `length` `(L,)`, `box` `(L, 4)`, `flip` `(L,)`, `op` `(L, n)`,
    `arg` `(L, n, OP_ARGS)`, `hw` `(L, 2)` header sizes, `gpu` `(L,)`, `seed` int64 `(L, 3)`,
    `record` `(L,)` (the record first read for the slot: the one a bad image is reported as)."""
    longest = max([len(r) for r in raws] + [1])
    data = np.zeros((len(raws), longest), np.uint8)
    for i, r in enumerate(raws):
        data[i, : len(r)] = np.frombuffer(r, np.uint8)
    return {
        "bytes": data,
        "length": np.asarray([len(r) for r in raws], np.int64),
        "box": np.asarray([d.box for d in draws], np.int32).reshape(-1, 4),
        "flip": np.asarray([d.flip for d in draws], bool),
        "op": np.stack([d.op for d in draws]).astype(np.int32),
        "arg": np.stack([d.arg for d in draws]).astype(np.float32),
        "hw": np.asarray([s[:2] for s in sizes], np.int32).reshape(-1, 2),
        "gpu": np.asarray([s[2] for s in sizes], bool),
        "seed": np.asarray(seeds, np.int64).reshape(-1, 3),
        "record": np.asarray(records, np.int64),
    }


# ---------------------------------------------------------------------------------------------
# Decoders


class Decoder(Protocol):
    name: str

    def decode(self, data: list[bytes]) -> list[Any]:
        """Each image as uint8 `(H, W, 3)` (numpy or a device array), or None where it fails."""
        ...


class HostDecoder:
    """simplejpeg (else PIL) on the host, `DECODE_THREADS` at a time: the host path's pixels."""

    name = "host (simplejpeg)"

    def __init__(self, threads: int = DECODE_THREADS) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="deit-decode")

    def decode(self, data: list[bytes]) -> list[np.ndarray | None]:
        return list(self._pool.map(_host_decode, data))


def _host_decode(raw: bytes) -> np.ndarray | None:
    try:
        return decode_image(raw)
    except ValueError:
        return None


class NvImageCodecDecoder:
    """nvImageCodec's batched GPU decode (`nvidia-nvimgcodec-cu13`). Written against 0.9's API
    (`Decoder().decode(list_of_bytes)`, None for an image that fails) and defensive about the
    rest: EXIF orientation off where `DecodeParams` takes it, any exception from a batch decode
    retried image by image, an image of an unexpected shape left to the host decoder."""

    name = "nvImageCodec"

    def __init__(self) -> None:
        from nvidia import nvimgcodec

        self._codec = nvimgcodec
        self._decoder = nvimgcodec.Decoder()
        self._params = None
        try:
            self._params = nvimgcodec.DecodeParams(
                apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.RGB
            )
        except Exception:  # an older or newer API: its defaults, checked image by image below
            self._params = None

    def _decode(self, data: list[bytes]) -> list[Any]:
        if self._params is not None:
            return list(self._decoder.decode(data, params=self._params))
        return list(self._decoder.decode(data))

    def decode(self, data: list[bytes]) -> list[Any]:
        try:
            images = self._decode(data)
        except Exception:
            images = []
            for raw in data:
                try:
                    images.append(self._decode([raw])[0])
                except Exception:
                    images.append(None)
        return [None if img is None else _to_jax(img) for img in images]


def _to_jax(img: Any) -> Any:
    """A decoded image as a JAX array on its GPU (DLPack, no copy), else as numpy."""
    try:
        return jax.dlpack.from_dlpack(img)
    except Exception:
        cpu = img.cpu() if hasattr(img, "cpu") else img
        return np.asarray(cpu)


def nvimgcodec_available() -> str | None:
    """None when nvImageCodec can decode here, else the reason it cannot."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return "nvImageCodec is not installed (pip install 'deit[gpu-decode]')"
    if jax.default_backend() != "gpu":
        return f"JAX runs on {jax.default_backend()}, not on an NVIDIA GPU"
    return None


def make_decoder() -> Decoder:
    """nvImageCodec where it can run, else the host decoder, with a warning that names it."""
    reason = nvimgcodec_available()
    if reason is None:
        try:
            return NvImageCodecDecoder()
        except Exception as e:  # a broken install: the run goes on, decoding on the host
            reason = f"nvImageCodec failed to start ({type(e).__name__}: {e})"
    log.warning(
        f"data.decode gpu: {reason}; JPEGs are decoded on the host (simplejpeg) and cropped, "
        "flipped and augmented on the device"
    )
    return HostDecoder()


# ---------------------------------------------------------------------------------------------
# The loop's process: decode, pad to the bucket, augment on the device


class DeviceStage:
    """Turns a worker's packed batch into the host path's batch, `{"image": uint8 (L, S, S, 3)
    on the device, "label", "mask", "bad"}`; other batches (evaluation) pass through."""

    def __init__(
        self,
        cfg: DataConfig,
        source: Any,
        encoded: Callable[[int], bytes | str | None],
        decoder: Decoder | None = None,
    ) -> None:
        """`encoded(i)`: record `i`'s encoded file, bytes or a path (`pipeline.encoded`)."""
        self.cfg = cfg
        self.source = source
        self.encoded = encoded
        self.ra = RandAugment.from_string(cfg.randaugment) if cfg.randaugment else None
        self.decoder = decoder or make_decoder()
        self._host = decoder if isinstance(decoder, HostDecoder) else None
        self.device = jax.local_devices()[0]

    @property
    def host(self) -> HostDecoder:
        if self._host is None:
            self._host = HostDecoder()
        return self._host

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if "bytes" not in batch:
            return batch
        n = len(batch["label"])
        raws = [batch["bytes"][i, : batch["length"][i]].tobytes() for i in range(n)]
        # an empty slot: the worker found the file unreadable under "error" (already marked)
        read = [i for i in range(n) if batch["length"][i] > 0]
        gpu = [i for i in read if batch["gpu"][i]]
        images: list[Any] = [None] * n
        if gpu:
            for i, img in zip(gpu, self.decoder.decode([raws[i] for i in gpu]), strict=True):
                images[i] = img
        box, label, bad = batch["box"].copy(), batch["label"].copy(), batch["bad"].copy()
        op, arg, flips = batch["op"].copy(), batch["arg"].copy(), batch["flip"].copy()
        for i in read:
            h, w = (int(v) for v in batch["hw"][i])
            if images[i] is not None and tuple(images[i].shape[:2]) != (h, w):
                images[i] = None  # not the header's shape (EXIF orientation): the host decodes
            if images[i] is None:
                images[i] = _host_decode(raws[i])
            if images[i] is None:
                record = int(batch["record"][i])
                bad[i] = record
                if self.cfg.bad_images == "error":
                    continue
                sub = self._substitute(record, batch["seed"][i])
                images[i], label[i], (box[i], flips[i], op[i], arg[i]) = sub
        stacked = self._bucketed(images)
        size = (self.cfg.img_size, self.cfg.img_size)
        out = augment_batch(
            stacked,
            jax.device_put(box, self.device),
            jax.device_put(flips, self.device),
            jax.device_put(op, self.device),
            jax.device_put(arg, self.device),
            size=size,
            ops=self.ra.ops if self.ra is not None else (),
            fill=self.ra.fill if self.ra is not None else (0, 0, 0),
            interpolation=self.cfg.interpolation,
        )
        return {"image": out, "label": label, "mask": batch["mask"], "bad": bad}

    def _substitute(self, record: int, seed: np.ndarray) -> tuple:
        """The next readable record after `record`, decoded on the host, with the draws of
        `seed` (what `pipeline._MakeBatch._read` does on the host path)."""
        n = len(self.source)
        for k in range(1, min(MAX_SUBSTITUTES, n)):
            j = (record + k) % n
            try:
                raw = read_bytes(self.encoded(j))
                h, w, _ = header(raw, self.source.name(j))
                image = decode_image(raw)
            except ValueError:
                continue
            rng = np.random.default_rng([int(s) for s in seed])
            d = draw_train(h, w, rng, self.cfg, self.ra)
            return image, int(self.source.labels[j]), (d.box, d.flip, d.op, d.arg)
        raise BadImageError(
            f"{min(MAX_SUBSTITUTES, n)} consecutive records from {self.source.name(record)} "
            "cannot be decoded; expected mostly readable images (run deit data check on the folder)"
        )

    def _bucketed(self, images: list[Any]) -> jax.Array:
        """The images padded to one `(L, S, S, 3)` bucket on the device (zeros where none)."""
        side = bucket(
            max([max(img.shape[0], img.shape[1]) for img in images if img is not None] + [1])
        )
        on_device = [img for img in images if isinstance(img, jax.Array)]
        if on_device:
            return _pad_on_device(images, side, self.device)
        buf = np.zeros((len(images), side, side, 3), np.uint8)
        for i, img in enumerate(images):
            if img is not None:
                buf[i, : img.shape[0], : img.shape[1]] = _rgb(np.asarray(img))
        return jax.device_put(buf, self.device)


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _pad_on_device(images: list[Any], side: int, device: Any) -> jax.Array:
    """Device images into one bucket without a compile per image shape: through torch's copy
    kernels where torch has CUDA (DLPack both ways, no host round trip), else via the host."""
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError
    except ImportError:
        host = np.zeros((len(images), side, side, 3), np.uint8)
        for i, img in enumerate(images):
            if img is not None:
                host[i, : img.shape[0], : img.shape[1]] = _rgb(np.asarray(img))
        return jax.device_put(host, device)
    buf = torch.zeros((len(images), side, side, 3), dtype=torch.uint8, device="cuda")
    for i, img in enumerate(images):
        if img is None:
            continue
        t = torch.from_dlpack(img) if isinstance(img, jax.Array) else torch.from_numpy(img)
        t = t.to("cuda").expand(-1, -1, 3) if t.shape[2] == 1 else t.to("cuda")
        buf[i, : t.shape[0], : t.shape[1]] = t
    torch.cuda.synchronize()
    return jax.dlpack.from_dlpack(buf)


def check_config(cfg: DataConfig) -> None:
    """What the GPU path cannot do, said before a run starts."""
    if cfg.interpolation not in ("bicubic", "bilinear"):
        raise InputError(
            f"data.interpolation {cfg.interpolation!r} with data.decode gpu; expected 'bicubic' "
            "or 'bilinear' (the device resize implements those)"
        )
    ra = RandAugment.from_string(cfg.randaugment) if cfg.randaugment else None
    if ra is not None and ra.interpolation != "bicubic":
        raise InputError("data.decode gpu runs RandAugment's geometric ops bicubic only")
