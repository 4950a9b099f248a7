"""Exported models: a folder with `config.json` (architecture) and `params.safetensors` (weights).

This is the format `deit convert` writes, `deit train` exports at the end of a run (`best/`,
`final/`) and `deit eval` / `predict` / `visualize` / `--teacher` read. safetensors holds no code,
so loading a model never executes anything; keys are the Flax parameter paths joined by `/`
(`blocks_0/attn/qkv/kernel`), plus `batch_stats/...` for models with BatchNorm. `config.json` also
holds the model's eval preprocessing (`Preprocessing`), the one description of how images become
its input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deit.augment import normalize
from deit.errors import InputError
from deit.transforms import eval_transform
from deit.variants import IMAGENET_MEAN, IMAGENET_STD, VARIANTS

CONFIG = "config.json"
WEIGHTS = "params.safetensors"


def model_config(model: Any, **extra: Any) -> dict[str, Any]:
    """JSON-able description of a Flax module from this package: its kind and its fields."""
    fields = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name)
        if f.name == "dtype":
            value = jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        fields[f.name] = value
    return {"kind": type(model).__name__, "fields": fields, **extra}


def build_model(config: dict[str, Any]) -> Any:
    """The module described by `model_config`."""
    from deit.model import DeiT
    from deit.regnet import RegNet
    from deit.teacher import ResNet

    kinds = {"DeiT": DeiT, "ResNet": ResNet, "RegNet": RegNet}
    kind = config.get("kind")
    if kind not in kinds:
        raise InputError(
            f"model kind {kind!r} in the checkpoint is unknown; expected {list(kinds)}"
        )
    fields = dict(config["fields"])
    if "dtype" in fields:
        fields["dtype"] = jnp.dtype(fields["dtype"])
    for key, value in fields.items():
        if isinstance(value, list):
            fields[key] = tuple(value)
    return kinds[kind](**fields)


def flatten(tree: dict) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(jax.device_get(v))
        for k, v in traverse_util.flatten_dict(tree, sep="/").items()
    }


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (a checkpoint thread
    may be creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; an exported model is shared like any file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(directory: str | os.PathLike, model: Any, variables: dict, **extra: Any) -> Path:
    """Write `variables` (`{"params": ..., "batch_stats": ...}`) and the config, atomically."""
    out = Path(directory).absolute()
    out.mkdir(parents=True, exist_ok=True)
    flat = flatten(dict(variables))
    _atomic_write(out / WEIGHTS, lambda p: save_file(flat, p))
    text = json.dumps(model_config(model, **extra), indent=2)
    _atomic_write(out / CONFIG, lambda p: Path(p).write_text(text))
    return out


def exported_folder(path: str | os.PathLike) -> Path:
    """The exported model in `path`: the folder itself, or a run folder's `final/` (or `best/`);
    a name of the official weights (`deit.pretrained.PRETRAINED`) is downloaded and converted."""
    from deit import pretrained  # a name of the official weights: their converted folder

    path = pretrained.resolve(path)
    # A run folder has a config.json too (its settings): an exported model also has weights.
    for candidate in (path, path / "final", path / "best"):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    raise InputError(
        f"{path} holds no exported model; expected a folder with {CONFIG} and {WEIGHTS} (a "
        "run's final/ or best/, or the output of deit convert)"
    )


def load_model(directory: str | os.PathLike) -> tuple[Any, dict, dict[str, Any]]:
    """`(module, variables, config)` of an exported model folder."""
    folder = Path(directory)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise InputError(
            f"{folder} is not an exported model: expected {CONFIG} and {WEIGHTS} in it"
        )
    config = json.loads((folder / CONFIG).read_text())
    return build_model(config), unflatten(load_file(str(folder / WEIGHTS))), config


def layout_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """`None` when two `{path: shape}` maps agree; otherwise one line naming missing,
    unexpected and wrongly shaped arrays (the first few of each)."""
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    common = sorted(set(saved) & set(wanted))
    wrong = [f"{k} {saved[k]} != {wanted[k]}" for k in common if saved[k] != wanted[k]]
    if not (missing or unexpected or wrong):
        return None

    def show(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

    return f"missing [{show(missing)}], unexpected [{show(unexpected)}], shapes [{show(wrong)}]"


def load_exported(folder: str | os.PathLike) -> tuple[Any, dict, dict[str, Any]]:
    """`load_model`, with a one-line ValueError naming the differing arrays when the weights do
    not fit the architecture in `config.json` (instead of Flax's error mid-apply)."""
    model, variables, config = load_model(folder)
    # A ResNet's parameters do not depend on the image size: any small one will do.
    size = _model_size(model) or int(config.get("img_size") or 32)
    x = jax.ShapeDtypeStruct((1, size, size, getattr(model, "in_chans", 3)), jnp.float32)

    def shapes(tree: dict) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    wanted = shapes(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    diff = layout_mismatch(shapes(variables), wanted)
    if diff:
        raise InputError(
            f"the weights in {folder} do not fit its {CONFIG}: {diff}; expected a folder "
            "written by deit train or deit convert, unchanged"
        )
    return model, variables, config


def teacher_from_export(folder: str | os.PathLike) -> Any:  # -> teacher.Teacher
    """A frozen teacher from an exported model folder (a trained ResNet or any DeiT), normalising
    with the folder's `Preprocessing`."""
    from deit.model import DeiT
    from deit.teacher import Teacher

    model, variables, config = load_exported(folder)
    prep = Preprocessing.from_config(config, model)
    if isinstance(model, DeiT):
        return Teacher.from_deit(model, variables, prep.mean, prep.std)
    # A ResNet resizes the student's images to the size it was trained at, when that is known.
    size = prep.img_size if config.get("img_size") else None
    return Teacher.from_resnet(model, variables, prep.mean, prep.std, size)


def _model_size(model: Any) -> int | None:
    """A DeiT's input side; None for a model without a fixed size (a ResNet)."""
    size = getattr(model, "img_size", None)
    return size if size is None or isinstance(size, int) else int(size[0])


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images become an exported model's input at evaluation: the shorter side resized to
    `img_size / crop_pct` (`interpolation`), a centre crop of `img_size`, then
    `(x / 255 - mean) / std`. The same two steps as training's validation (the crop on the
    host, `transforms.eval_transform`; normalisation on the device, `augment.normalize`), so
    `deit eval`, `predict`, `visualize` and a `--teacher` folder see what training saw.
    """

    img_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", int(self.img_size))
        object.__setattr__(self, "mean", tuple(map(float, self.mean)))
        object.__setattr__(self, "std", tuple(map(float, self.std)))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.img_size <= 0 or self.crop_pct <= 0:
            raise InputError(
                f"img_size {self.img_size}, crop_pct {self.crop_pct}; expected both > 0"
            )
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise InputError(
                f"mean {self.mean} and std {self.std}; expected one value per channel, std > 0"
            )

    @classmethod
    def from_config(cls, config: dict[str, Any], model: Any) -> Preprocessing:
        """The preprocessing in an exported folder's `config.json`. Missing keys take the values
        the registry gives the folder's `variant` (`variants.ModelSpec`: crop 0.875 at 224, 1.0
        at 384, bicubic, ImageNet mean and std) or, without a known variant, those defaults;
        a missing image size is the model's own."""
        spec = VARIANTS.get(config.get("variant") or "")
        default = (
            cls(224)
            if spec is None
            else cls(spec.img_size, spec.mean, spec.std, spec.crop_pct, spec.interpolation)
        )
        return cls(
            img_size=config.get("img_size") or _model_size(model) or default.img_size,
            mean=config.get("mean", default.mean),
            std=config.get("std", default.std),
            crop_pct=config.get("crop_pct", default.crop_pct),
            interpolation=config.get("interpolation", default.interpolation),
        )

    @classmethod
    def from_data(cls, data: Any) -> Preprocessing:
        """The eval preprocessing of a `data.DataConfig` (what a run's validation uses)."""
        return cls(data.img_size, data.mean, data.std, data.crop_pct, data.interpolation)

    def to_config(self) -> dict[str, Any]:
        """The `config.json` keys (`save_model(..., **prep.to_config())`) `from_config` reads."""
        return {
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }

    def crop(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded uint8 `(H, W, 3)` images -> the centre-cropped uint8 batch `(B, S, S, 3)`."""
        return np.stack(
            [eval_transform(im, self.img_size, self.crop_pct, self.interpolation) for im in images]
        )

    def normalize(self, batch: np.ndarray | jax.Array) -> jax.Array:
        """A uint8 batch of crops -> the float32 model input, on the device."""
        return normalize(jnp.asarray(batch), self.mean, self.std)

    def inputs(self, images: Sequence[np.ndarray]) -> jax.Array:
        """Decoded uint8 images -> the model input `(B, S, S, 3)`: `normalize(crop(images))`."""
        return self.normalize(self.crop(images))
