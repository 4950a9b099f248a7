"""Exported models: a folder with `config.json` (architecture) and `params.safetensors` (weights).

This is the format `deit convert` writes, `deit train` exports at the end of a run (`best/`,
`final/`) and `deit eval` / `predict` / `visualize` / `--teacher` read. safetensors holds no code,
so loading a model never executes anything; keys are the Flax parameter paths joined by `/`
(`blocks_0/attn/qkv/kernel`), plus `batch_stats/...` for models with BatchNorm. `config.json` also
holds the model's eval preprocessing (`variants.Preprocessing`), the one description of how images
become its input. Opening one by folder, run or official name: `pretrained.open_model`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deit.errors import InputError
from deit.model import DeiT
from deit.regnet import RegNet
from deit.teacher import ResNet

# `Preprocessing` lived here until issue 26: importable from here for one release.
from deit.variants import Preprocessing as Preprocessing
from deit.variants import model_size

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


def find_exported(path: str | os.PathLike) -> Path:
    """The exported model in `path`: the folder itself, or a run folder's `final/` (or `best/`).
    Names of the official weights are `pretrained.exported_folder`'s, the layer above."""
    path = Path(path)
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


def load_exported(folder: str | os.PathLike) -> tuple[Any, dict, dict[str, Any]]:
    """`load_model`, with a one-line ValueError naming the differing arrays when the weights do
    not fit the architecture in `config.json` (instead of Flax's error mid-apply)."""
    model, variables, config = load_model(folder)
    # A ResNet's parameters do not depend on the image size: any small one will do.
    size = model_size(model) or int(config.get("img_size") or 32)
    x = jax.ShapeDtypeStruct((1, size, size, getattr(model, "in_chans", 3)), jnp.float32)

    def shapes(tree: dict) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    wanted = shapes(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    from deit.checkpoint import layout_mismatch  # here: `deit predict` need not load Orbax

    diff = layout_mismatch(shapes(variables), wanted)
    if diff:
        raise InputError(
            f"the weights in {folder} do not fit its {CONFIG}: {diff}; expected a folder "
            "written by deit train or deit convert, unchanged"
        )
    return model, variables, config
