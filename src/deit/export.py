"""Exported models: a folder with `config.json` (architecture) and `params.safetensors` (weights).

This is the format `deit convert` writes, `deit train` exports at the end of a run (`best/`,
`final/`) and `deit eval` / `predict` / `--teacher` read. safetensors holds no code, so loading a
model never executes anything; keys are the Flax parameter paths joined by `/`
(`blocks_0/attn/qkv/kernel`), plus `batch_stats/...` for models with BatchNorm.
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
    from deit.teacher import ResNet

    kinds = {"DeiT": DeiT, "ResNet": ResNet}
    kind = config.get("kind")
    if kind not in kinds:
        raise ValueError(
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


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
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


def load_model(directory: str | os.PathLike) -> tuple[Any, dict, dict[str, Any]]:
    """`(module, variables, config)` of an exported model folder."""
    folder = Path(directory)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(
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
