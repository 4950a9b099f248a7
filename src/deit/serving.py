"""Models exported for serving outside the training stack: `deit export --format stablehlo|onnx`.

An artifact is a folder with the program and a `serving.json` beside it:

- `stablehlo`: `model.stablehlo`, a `jax.export.Exported` serialised (StableHLO with the weights as
  constants, lowered for CPU and CUDA); any JAX of the same or a newer serialisation version calls
  it (`jax.export.deserialize(...).call(x)`), with no Flax and no deit.
- `onnx`: `model.onnx`, written by `jax2onnx` (the `[onnx]` extra), for onnxruntime and the
  other ONNX runtimes.

Both take `(B, S, S, C)` float32 images, channels last, already normalised (`(x / 255 - mean) /
std` after the resize and centre crop that `serving.json` describes), with a free batch size `B`,
and return `(B, K)` float32 logits: the mean of the class and distillation heads, the paper's
inference rule (section 5.1; the class head alone for a plain DeiT). `serving.json` holds the
preprocessing (mean, std, crop_pct, interpolation, image size), the class names, and the
export-time check: the artifact, read back from disk, run on a fixed random batch against
`deit.jit` of the model; an artifact whose max |Δ| is above `TOLERANCE` is refused and nothing
is left in the output folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deit import export
from deit.class_names import class_names
from deit.compiler import jit
from deit.errors import InputError
from deit.model import forward
from deit.pretrained import open_model
from deit.variants import Preprocessing

FORMATS = ("safetensors", "stablehlo", "onnx")
PROGRAM = {"stablehlo": "model.stablehlo", "onnx": "model.onnx"}
META = "serving.json"
# The float32 agreement asked of an artifact. Measured on DeiT-Ti at 224: 7e-7 for both formats
# (StableHLO differs from deit.jit only in compiler options; bench/results/serve_latency_*.json).
TOLERANCE = 1e-4
# What each format imports, by module name, and the extra that installs it.
NEEDS = {"onnx": ("jax2onnx", "onnxruntime")}
CHECK_BATCH = 2
CHECK_SEED = 0


def check_format(fmt: str) -> None:
    """One-line errors for an unknown format, or one whose optional extra is not installed."""
    if fmt not in FORMATS:
        raise InputError(f"export format {fmt!r} is unknown; expected one of {list(FORMATS)}")
    missing = [m for m in NEEDS.get(fmt, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"export format {fmt!r} needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install 'deit[{fmt}]'"
        )


def logits_fn(model: Any, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """`(B, S, S, C)` normalised float32 images -> `(B, K)` float32 logits (the heads' mean),
    with the weights closed over: what an artifact computes."""
    params, stats = variables["params"], variables.get("batch_stats", {})

    def logits(x: jax.Array) -> jax.Array:
        cls, dist, _ = forward(model, params, stats, x, train=False)
        out = cls if dist is None else (cls + dist) / 2
        return out.astype(jnp.float32)

    return logits


@dataclass(frozen=True)
class Exported:
    """What `export_model` wrote: the folder, the format, and the check's max |Δ| (None for
    safetensors, which holds the weights themselves)."""

    folder: Path
    format: str
    max_abs_diff: float | None


def export_model(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    tolerance: float = TOLERANCE,
) -> Exported:
    """`deit export`: the model of `checkpoint` (run folder, exported folder or pretrained name,
    `pretrained.open_model`) written to `out` as `fmt` (`FORMATS`), checked (see the module)."""
    check_format(fmt)
    opened = open_model(checkpoint)
    out = Path(out).absolute()
    if fmt == "safetensors":
        extra = {k: v for k, v in opened.config.items() if k not in ("kind", "fields")}
        export.save_model(out, opened.model, opened.variables, **extra)
        return Exported(out, fmt, None)
    _check_out(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked in a hidden folder beside `out`: a refused or interrupted export
    # leaves nothing under the name the user gave.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        fn = logits_fn(opened.model, opened.variables)
        channels = getattr(opened.model, "in_chans", 3)
        size = opened.preprocessing.img_size
        {"stablehlo": _write_stablehlo, "onnx": _write_onnx}[fmt](fn, (size, size, channels), tmp)
        x = np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, size, size, channels))
        x = x.astype(np.float32)
        want = np.asarray(jit(fn)(x))
        meta = _metadata(opened, fmt, (size, size, channels), want.shape[-1])
        (tmp / META).write_text(json.dumps(meta, indent=2))
        got = open_artifact(tmp)(x)
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
        if not diff <= tolerance:  # NaN too
            raise InputError(
                f"the {fmt} artifact's logits differ from the model's (deit.jit) by max |Δ| "
                f"{diff:.3g} on a fixed batch of {CHECK_BATCH}; expected at most {tolerance:g} "
                f"in float32; nothing was written to {out}"
            )
        meta["check"] = {
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "batch": CHECK_BATCH,
            "seed": CHECK_SEED,
            "against": "deit.jit of the model's averaged heads, float32",
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        out.mkdir(exist_ok=True)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, fmt, diff)


def _check_out(out: Path, fmt: str) -> None:
    """`out` must be new, empty, or an earlier artifact of the same format (overwritten)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; expected a folder to write the {fmt} artifact")
    if out.is_dir() and any(out.iterdir()) and not (out / PROGRAM[fmt]).is_file():
        raise InputError(
            f"--out {out} is not empty and holds no {fmt} artifact; expected a new or empty "
            "folder (or an earlier export of the same format, replaced)"
        )


def _write_stablehlo(fn: Callable, shape: tuple[int, ...], folder: Path) -> None:
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    # CPU and CUDA both: lowering needs no GPU, and the file then serves on either.
    exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda"))(spec)
    (folder / PROGRAM["stablehlo"]).write_bytes(exported.serialize())


def _write_onnx(fn: Callable, shape: tuple[int, ...], folder: Path) -> None:
    from jax2onnx import to_onnx

    _import_onnx_plugins()
    # onnx_ir warns once per constant shape tensor it writes without a value type: noise here.
    serde = logging.getLogger("onnx_ir.serde")
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        to_onnx(
            fn,
            [("B", *shape)],
            model_name="deit",
            input_names=["images"],
            output_names=["logits"],
            return_mode="file",
            output_path=str(folder / PROGRAM["onnx"]),
        )
    finally:
        serde.setLevel(level)


def _import_onnx_plugins() -> None:
    """Register only the jax2onnx plugins a Linen model's program uses (JAX primitives, Flax).
    jax2onnx 0.17 otherwise imports all of its plugins on the first conversion, including
    Equinox examples that compile XLA programs at import: ~30-40 s on one core, every process.
    Falls back to jax2onnx's own discovery when its layout is not the one this was written for."""
    try:
        from jax2onnx.plugins import plugin_system
    except ImportError:
        return
    if not hasattr(plugin_system, "_already_imported_plugins"):
        return
    if plugin_system._already_imported_plugins:
        return
    root = Path(plugin_system.__file__).parent
    files = [*root.glob("_*.py"), *(root / "jax").rglob("*.py"), *(root / "flax").rglob("*.py")]
    for py in sorted(files):
        if py.name == "__init__.py":
            continue
        rel = py.relative_to(root).with_suffix("")
        importlib.import_module(".".join(("jax2onnx.plugins", *rel.parts)))
    plugin_system._already_imported_plugins = True


def _metadata(opened: Any, fmt: str, shape: tuple[int, ...], num_classes: int) -> dict:
    return {
        "format": fmt,
        "program": PROGRAM[fmt],
        "input": {
            "name": "images",
            "shape": ["batch", *shape],
            "dtype": "float32",
            "layout": "NHWC: channels last, RGB",
            "normalised": "(x / 255 - mean) / std after the resize and centre crop below",
        },
        "output": {
            "name": "logits",
            "shape": ["batch", num_classes],
            "dtype": "float32",
            "what": "mean of the class and distillation heads' logits (class head alone for a "
            "plain DeiT); softmax gives probabilities",
        },
        "preprocessing": opened.preprocessing.to_config(),
        "classes": class_names(opened.config, num_classes),
        "variant": opened.config.get("variant"),
        "source": str(opened.folder),
        "versions": {"jax": jax.__version__},
    }


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `export_model` wrote in a serving format."""
    return (Path(path) / META).is_file()


@dataclass(frozen=True)
class Artifact:
    """An exported serving artifact, opened: call it on `(B, S, S, C)` normalised float32
    images for `(B, K)` logits (numpy)."""

    folder: Path
    meta: dict
    run: Callable[[np.ndarray], np.ndarray]

    @property
    def format(self) -> str:
        return self.meta["format"]

    @property
    def preprocessing(self) -> Preprocessing:
        """How images become its input (`Preprocessing.inputs`)."""
        return Preprocessing(**self.meta["preprocessing"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        shape = tuple(self.meta["input"]["shape"][1:])
        if images.ndim != 4 or images.shape[1:] != shape:
            raise InputError(
                f"images have shape {images.shape}; the {self.format} artifact in {self.folder} "
                f"expects (B, {', '.join(map(str, shape))}) (channels last)"
            )
        return np.asarray(self.run(images))


def open_artifact(folder: str | os.PathLike) -> Artifact:
    """The artifact in `folder` (`is_artifact`), ready to call: StableHLO deserialised and
    jitted, ONNX in an onnxruntime CPU session."""
    folder = Path(folder)
    if not is_artifact(folder):
        raise InputError(f"{folder} holds no {META}; expected a folder written by deit export")
    meta = json.loads((folder / META).read_text())
    fmt = meta.get("format")
    if fmt not in PROGRAM or not (folder / PROGRAM[fmt]).is_file():
        raise InputError(
            f"{folder / META} names format {fmt!r} but {folder} lacks its program; expected "
            f"one of {list(PROGRAM.values())} beside it"
        )
    check_format(fmt)
    program = folder / PROGRAM[fmt]
    if fmt == "stablehlo":
        exported = jax.export.deserialize(bytearray(program.read_bytes()))
        run = jax.jit(exported.call)
    else:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # jax2onnx annotates some convolution outputs (a ResNet's) with NHWC shapes where they are
        # NCHW; onnxruntime warns per tensor, then uses the shapes it infers: errors only, here.
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            str(program), options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

    return Artifact(folder, meta, run)
