"""RegNet checkpoints (timm / the official DeiT teacher) <-> Flax variables, without torch.

Our module paths are timm's keys with `/` for `.`, so each tensor maps by the kind of its module:
`conv` weights `(O, I/groups, kh, kw)` -> `(kh, kw, I/groups, O)`; the squeeze-excitation
`fc1` / `fc2` (1×1 convs in timm) `(O, I, 1, 1)` -> Dense `(I, O)`; `head.fc` `(O, I)` ->
`(I, O)`; BatchNorm `weight` / `bias` -> params `scale` / `bias`, `running_mean` /
`running_var` -> `batch_stats` `mean` / `var` (`num_batches_tracked` is dropped, and written
back as 0). The architecture is read from the tensor shapes (`infer_regnet`), so a file names
its own network; a name given with it must agree (`check_architecture`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deit import export
from deit.class_names import IMAGENET, IMAGENET_CLASSES
from deit.errors import InputError
from deit.regnet import REGNETS, RegNet, create_regnet, describe, registered_name
from deit.torch_pickle import load_state_dict, save_torch

__all__ = [
    "check_architecture",
    "convert_regnet_checkpoint",
    "from_torch",
    "infer_regnet",
    "is_regnet",
    "to_torch",
]

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_BN |= {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BLOCK_RE = re.compile(r"s(\d+)\.b(\d+)\.")


def is_regnet(state_dict: dict[str, Any]) -> bool:
    """Whether a timm-layout state dict holds a RegNet (its stem and stage keys)."""
    return "stem.conv.weight" in state_dict and any(k.startswith("s1.b1.") for k in state_dict)


def _flax_target(key: str) -> tuple[str, str, str] | None:
    """`(collection, Flax path, kind)` of a timm key; None for a key that maps to nothing
    (`num_batches_tracked`, or a key of another network)."""
    module, _, leaf = key.rpartition(".")
    last = module.rpartition(".")[2]
    path = module.replace(".", "/")
    if last == "bn" and leaf in _BN:
        collection, name = _BN[leaf]
        return collection, f"{path}/{name}", "raw"
    if leaf == "bias" and last in ("fc1", "fc2", "fc"):
        return "params", f"{path}/bias", "raw"
    if leaf == "weight" and last == "conv":
        return "params", f"{path}/kernel", "conv"
    if leaf == "weight" and last in ("fc1", "fc2"):
        return "params", f"{path}/kernel", "conv1x1"
    if leaf == "weight" and last == "fc":
        return "params", f"{path}/kernel", "linear"
    return None


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray | None:
    if kind == "conv":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else None
    if kind == "conv1x1":
        return value[:, :, 0, 0].T if value.ndim == 4 and value.shape[2:] == (1, 1) else None
    if kind == "linear":
        return value.T if value.ndim == 2 else None
    return value


def _to_timm(collection: str, path: str) -> tuple[str, str]:
    """Inverse of `_flax_target`: `(timm key, kind)`."""
    module, _, leaf = path.rpartition("/")
    last = module.rpartition("/")[2]
    key_module = module.replace("/", ".")
    if last == "bn":
        names = {v: k for k, v in _BN.items()}
        return f"{key_module}.{names[(collection, leaf)]}", "raw"
    if leaf == "bias":
        return f"{key_module}.bias", "raw"
    kind = {"conv": "conv", "fc1": "conv1x1", "fc2": "conv1x1", "fc": "linear"}[last]
    return f"{key_module}.weight", kind


def _to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if kind == "conv1x1":
        return value.T[:, :, None, None]
    if kind == "linear":
        return value.T
    return value


def expected_shapes(model: RegNet) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """`{collection: {Flax path: shape}}` of `model.init`, without any FLOPs (RegNet's
    parameters do not depend on the image size: 32×32 is the smallest it takes)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, model.in_chans), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return {c: traverse_util.flatten_dict(dict(shapes[c]), sep="/") for c in shapes}


def infer_regnet(state_dict: dict[str, np.ndarray], **overrides: Any) -> RegNet:
    """The RegNet whose weights `state_dict` holds (timm layout), read from its shapes: stem
    width and input channels, per stage its width, depth and group width, the bottleneck and
    squeeze-excitation ratios, and the class count of `head.fc` (0 without one: `num_classes`
    must then be given)."""
    if not is_regnet(state_dict):
        found = ", ".join(sorted(state_dict)[:4])
        raise InputError(f"not a RegNet state dict (keys {found}, ...); expected stem.conv, s1.b1")
    sd = state_dict
    stem = sd["stem.conv.weight"]
    stages = sorted({int(m[1]) for k in sd if (m := _BLOCK_RE.match(k))})
    widths, depths, groups, se = [], [], [], []
    for s in stages:
        blocks = {int(m[2]) for k in sd if (m := _BLOCK_RE.match(k)) and int(m[1]) == s}
        first = f"s{s}.b1."
        need = (
            first + "conv3.conv.weight",
            first + "conv1.conv.weight",
            first + "conv2.conv.weight",
        )
        if any(k not in sd for k in need):
            raise InputError(
                f"not a RegNet state dict: it lacks {[k for k in need if k not in sd]}"
            )
        widths.append(int(sd[need[0]].shape[0]))
        bottleneck = int(sd[need[1]].shape[0])
        groups.append(int(sd[need[2]].shape[1]))
        depths.append(len(blocks))
        in_width = int(stem.shape[0]) if s == stages[0] else widths[-2]
        if first + "se.fc1.weight" in sd:
            se.append(int(sd[first + "se.fc1.weight"].shape[0]) / in_width)
    head = sd.get("head.fc.weight")
    fields: dict[str, Any] = dict(
        widths=tuple(widths),
        depths=tuple(depths),
        group_sizes=tuple(groups),
        num_classes=int(head.shape[0]) if head is not None else 0,
        se_ratio=round(se[0], 4) if se else 0.0,
        bottle_ratio=round(bottleneck / widths[-1], 4),
        stem_width=int(stem.shape[0]),
        in_chans=int(stem.shape[1]),
    )
    fields.update(overrides)
    return RegNet(**fields)


def check_architecture(model: RegNet, name: str, source: str) -> None:
    """One line when the checkpoint's network (`model`, from `infer_regnet`) is not the
    registered RegNet `name`."""
    want = create_regnet(name, model.num_classes)
    from deit.regnet import architecture

    if architecture(want) != architecture(model):
        found = registered_name(model)
        holds = f"a {found} ({describe(model)})" if found else f"a RegNet with {describe(model)}"
        raise InputError(
            f"{source} holds {holds}, not the {name} its name asks for ({describe(want)})"
        )


def from_torch(
    state_dict: dict[str, np.ndarray],
    model: RegNet,
    *,
    drop_heads: bool = False,
    rng: int | jax.Array = 0,
) -> dict[str, Any]:
    """Flax variables `{"params", "batch_stats"}` of `model` from timm-layout RegNet weights.

    Strict: every missing key, unexpected key and shape mismatch is collected into one error.
    `drop_heads=True` ignores `head.fc` and initialises a fresh one (from `rng`), for another
    class count.
    """
    expected = expected_shapes(model)
    flat: dict[str, dict[str, np.ndarray]] = {c: {} for c in expected}
    unexpected, wrong = [], []
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key.endswith(".num_batches_tracked"):
            continue
        target = _flax_target(key)
        if drop_heads and key.startswith("head."):
            continue
        if target is None or target[1] not in expected.get(target[0], {}):
            unexpected.append(f"{key} {value.shape}")
            continue
        collection, path, kind = target
        want = expected[collection][path].shape
        array = _to_flax(value, kind)
        if array is None or array.shape != want:
            shown = f" -> {path} {array.shape}" if array is not None else ""
            wrong.append(f"{key} {value.shape}{shown}, the model expects {want}")
            flat[collection][path] = None  # type: ignore[assignment]
            continue
        flat[collection][path] = array.astype(np.float32)
    missing = [
        f"{_to_timm(c, p)[0]} ({c}/{p} {s.shape})"
        for c, shapes in expected.items()
        for p, s in shapes.items()
        if p not in flat[c] and not (drop_heads and p.startswith("head/"))
    ]
    if missing or unexpected or wrong:
        lines = [f"checkpoint does not fit RegNet({describe(model)}, {model.num_classes} classes):"]
        for title, items in (
            ("missing from the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatches", wrong),
        ):
            if items:
                lines += [f"  {title} ({len(items)}):", *[f"    {i}" for i in items]]
        raise InputError("\n".join(lines))
    if drop_heads:
        x = jnp.zeros((1, 32, 32, model.in_chans), jnp.float32)
        key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
        fresh = jax.jit(model.init)(key, x)["params"]["head"]
        flat["params"].update(export.flatten({"head": fresh}))
    return {c: export.unflatten(f) for c, f in flat.items()}


def to_torch(variables: dict[str, Any], model: RegNet) -> dict[str, np.ndarray]:
    """timm-layout state dict (float32 numpy, with BN's `num_batches_tracked`) of Flax
    `variables`; `timm.create_model(name).load_state_dict(..., strict=True)` accepts it."""
    expected = expected_shapes(model)
    out: dict[str, np.ndarray] = {}
    for collection, shapes in expected.items():
        flat = export.flatten(dict(variables.get(collection, {})))
        missing = sorted(set(shapes) - set(flat))
        wrong = [p for p in shapes if p in flat and flat[p].shape != shapes[p].shape]
        if missing or wrong or set(flat) - set(shapes):
            raise InputError(
                f"the {collection} do not fit RegNet({describe(model)}): missing {missing[:4]}, "
                f"unexpected {sorted(set(flat) - set(shapes))[:4]}, misshapen {wrong[:4]}"
            )
        for path, value in flat.items():
            key, kind = _to_timm(collection, path)
            out[key] = np.array(_to_torch_layout(value, kind), np.float32, order="C", copy=True)
            if key.endswith(".running_var"):
                out[key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return out


def convert_regnet_checkpoint(
    src: str | os.PathLike,
    model_name: str | None,
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    drop_heads: bool = False,
    state_dict: dict[str, np.ndarray] | None = None,
) -> Path:
    """A RegNet checkpoint file (timm or the official DeiT teacher, `.pth` or `.safetensors`)
    as an exported model folder (`export.save_model`), with timm's eval preprocessing for the
    RegNetY weights (224, crop 0.875, bicubic, ImageNet mean/std); returns the folder.

    `model_name` (a `REGNETS` name) must match the file's network; None names it from the
    table when it is there.
    """
    sd = load_state_dict(src) if state_dict is None else state_dict
    if not is_regnet(sd):
        what = "a DeiT" if "cls_token" in sd else "no RegNet"
        raise InputError(
            f"{src} holds {what} (keys {', '.join(sorted(sd)[:3])}, ...), not the "
            f"{model_name or 'RegNet'} asked for; expected a timm RegNet state dict"
        )
    model = infer_regnet(sd)
    if model_name is not None and model_name not in REGNETS:
        from deit.variants import VARIANTS

        found = registered_name(model) or "RegNet"
        if model_name not in VARIANTS:
            create_regnet(model_name)  # an unknown name: one line with the close matches
        raise InputError(
            f"{src} holds a {found} ({describe(model)}), not the {model_name} its name asks "
            "for; expected a DeiT checkpoint, or the RegNet's own name"
        )
    if model_name is not None:
        check_architecture(model, model_name, str(src))
    name = model_name or registered_name(model)
    classes = num_classes if num_classes is not None else model.num_classes
    if not classes:
        raise InputError(f"{src} has no head.fc; expected num_classes for a fresh head")
    drop = drop_heads or classes != model.num_classes
    model = model.clone(num_classes=classes)
    variables = from_torch(sd, model, drop_heads=drop)
    imagenet = classes == IMAGENET_CLASSES and not drop
    prep = export.Preprocessing(224)
    return export.save_model(
        out_dir,
        model,
        variables,
        source=str(src),
        **({"variant": name} if name else {}),
        **({"dataset": IMAGENET} if imagenet else {}),
        **prep.to_config(),
    )


def export_timm(folder: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An exported RegNet folder as `out_dir/model.safetensors` in timm's layout."""
    model, variables, _ = export.load_model(folder)
    if not isinstance(model, RegNet):
        raise InputError(f"{folder} holds a {type(model).__name__}, not a RegNet")
    return save_torch(to_torch(variables, model), Path(out_dir).absolute() / "model.safetensors")
