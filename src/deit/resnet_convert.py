"""torchvision / timm ResNet checkpoints <-> Flax variables of `deit.teacher.ResNet`, without torch.

torchvision and timm share one key layout for the plain ResNets (`resnet18`, `resnet26`,
`resnet50`): `conv1`/`bn1` (the stem), `layer{s}.{j}.conv{n}`/`bn{n}` and, where the shape
changes, `layer{s}.{j}.downsample.0`/`.1` (the 1×1 projection), and `fc`. Ours are `conv_init` /
`bn_init`, `{Basic,Bottleneck}Block_{k}/Conv_{n-1}` / `BatchNorm_{n-1}` with `k` counting blocks
over all stages, the projection as the block's last `Conv` / `BatchNorm` (built after the residual
branch), and `head`. Conv kernels `(O, I, kh, kw)` -> `(kh, kw, I, O)`, `fc` `(O, I)` -> `(I, O)`,
BatchNorm `weight` / `bias` -> params `scale` / `bias`, running statistics -> `batch_stats`
(`num_batches_tracked` is dropped, and written back as 0). The network is read from the shapes
(`infer_resnet`) and built with `padding="torch"`, the symmetric padding those weights expect.
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
from deit.teacher import TEACHERS, ResNet, create_teacher, registered_resnet, resnet_spec
from deit.torch_pickle import load_state_dict, save_torch
from deit.variants import Preprocessing

__all__ = [
    "check_architecture",
    "convert_resnet_checkpoint",
    "describe",
    "from_torch",
    "infer_resnet",
    "is_resnet",
    "to_torch",
]

_LAYER_RE = re.compile(r"layer(\d+)\.(\d+)\.")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_BN |= {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def is_resnet(state_dict: dict[str, Any]) -> bool:
    """Whether a state dict holds a torchvision / timm ResNet (its stem and first block)."""
    return "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict


def describe(model: ResNet) -> str:
    """`"bottleneck blocks 3-4-6-3, 64 filters"`: what tells two ResNets apart."""
    stem = ", 3×3 stem" if model.small_input else ""
    stages = "-".join(map(str, model.stage_sizes))
    return f"{model.block} blocks {stages}, {model.num_filters} filters{stem}"


def infer_resnet(state_dict: dict[str, np.ndarray], **overrides: Any) -> ResNet:
    """The ResNet whose weights `state_dict` holds, read from its keys and shapes: block type,
    blocks per stage, stem width and stem kind, and the class count of `fc` (0 without one:
    `num_classes` must then be given)."""
    if not is_resnet(state_dict):
        found = ", ".join(sorted(state_dict)[:4])
        raise InputError(f"not a ResNet state dict (keys {found}, ...); expected conv1, layer1.0")
    sd = state_dict
    blocks: dict[int, set[int]] = {}
    for key in sd:
        if m := _LAYER_RE.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)):
        raise InputError(f"ResNet stages {stages}; expected layer1..layer{len(stages)}")
    stem = np.asarray(sd["conv1.weight"])
    head = sd.get("fc.weight")
    fields: dict[str, Any] = dict(
        stage_sizes=tuple(len(blocks[s]) for s in stages),
        block="bottleneck" if "layer1.0.conv3.weight" in sd else "basic",
        num_filters=int(stem.shape[0]),
        small_input=stem.shape[2:] == (3, 3),
        num_classes=int(np.shape(head)[0]) if head is not None else 0,
        padding="torch",
    )
    fields.update(overrides)
    if not fields["num_classes"]:
        raise InputError("the checkpoint has no fc; expected num_classes for a fresh head")
    return ResNet(**fields)


def check_architecture(model: ResNet, name: str, source: str) -> None:
    """One line when the checkpoint's network (`model`, from `infer_resnet`) is not the
    registered ResNet `name`."""
    want = create_teacher(name, model.num_classes)
    if not isinstance(want, ResNet) or resnet_spec(want) != resnet_spec(model):
        found = registered_resnet(model)
        holds = f"a {found} ({describe(model)})" if found else f"a ResNet with {describe(model)}"
        what = describe(want) if isinstance(want, ResNet) else type(want).__name__
        raise InputError(f"{source} holds {holds}, not the {name} its name asks for ({what})")


def _key_table(model: ResNet) -> dict[str, tuple[str, str, str]]:
    """torch key -> `(collection, Flax path, kind)` for every tensor of `model`."""
    pairs = [("conv1", "conv_init", "conv"), ("bn1", "bn_init", "bn"), ("fc", "head", "linear")]
    convs = 3 if model.block == "bottleneck" else 2
    block_name = "BottleneckBlock" if model.block == "bottleneck" else "BasicBlock"
    k = 0
    for s, size in enumerate(model.stage_sizes, start=1):
        for j in range(size):
            mod = f"{block_name}_{k}"
            for n in range(convs):
                pairs.append((f"layer{s}.{j}.conv{n + 1}", f"{mod}/Conv_{n}", "conv"))
                pairs.append((f"layer{s}.{j}.bn{n + 1}", f"{mod}/BatchNorm_{n}", "bn"))
            pairs.append((f"layer{s}.{j}.downsample.0", f"{mod}/Conv_{convs}", "conv"))
            pairs.append((f"layer{s}.{j}.downsample.1", f"{mod}/BatchNorm_{convs}", "bn"))
            k += 1
    table = {}
    for torch_mod, flax_mod, kind in pairs:
        if kind == "bn":
            for leaf, (collection, name) in _BN.items():
                table[f"{torch_mod}.{leaf}"] = (collection, f"{flax_mod}/{name}", "raw")
        else:
            table[f"{torch_mod}.weight"] = ("params", f"{flax_mod}/kernel", kind)
            if kind == "linear":
                table[f"{torch_mod}.bias"] = ("params", f"{flax_mod}/bias", "raw")
    return table


def expected_shapes(model: ResNet) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """`{collection: {Flax path: shape}}` of `model.init`, without any FLOPs."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return {c: traverse_util.flatten_dict(dict(shapes[c]), sep="/") for c in shapes}


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray | None:
    if kind == "conv":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else None
    if kind == "linear":
        return value.T if value.ndim == 2 else None
    return value


def from_torch(
    state_dict: dict[str, np.ndarray],
    model: ResNet,
    *,
    drop_heads: bool = False,
    rng: int | jax.Array = 0,
) -> dict[str, Any]:
    """Flax variables `{"params", "batch_stats"}` of `model` from torchvision / timm weights.

    Strict: every missing key, unexpected key and shape mismatch is collected into one error.
    `drop_heads=True` ignores `fc` and initialises a fresh head (from `rng`), for another class
    count.
    """
    expected = expected_shapes(model)
    table = {
        k: t
        for k, t in _key_table(model).items()
        if t[1] in expected.get(t[0], {}) and not (drop_heads and k.startswith("fc."))
    }
    flat: dict[str, dict[str, np.ndarray]] = {c: {} for c in expected}
    unexpected, wrong = [], []
    for key, value in state_dict.items():
        if key.endswith(".num_batches_tracked") or (drop_heads and key.startswith("fc.")):
            continue
        value = np.asarray(value)
        if key not in table:
            unexpected.append(f"{key} {value.shape}")
            continue
        collection, path, kind = table[key]
        want = expected[collection][path].shape
        array = _to_flax(value, kind)
        if array is None or array.shape != want:
            wrong.append(f"{key} {value.shape}, the model expects {path} {want}")
            continue
        flat[collection][path] = array.astype(np.float32)
    missing = [f"{k} ({c}/{p})" for k, (c, p, _) in table.items() if p not in flat[c]]
    missing = [m for m in missing if not any(w.startswith(m.partition(" ")[0]) for w in wrong)]
    if missing or unexpected or wrong:
        lines = [f"checkpoint does not fit ResNet({describe(model)}, {model.num_classes} classes):"]
        for title, items in (
            ("missing from the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatches", wrong),
        ):
            if items:
                lines += [f"  {title} ({len(items)}):", *[f"    {i}" for i in items]]
        raise InputError("\n".join(lines))
    if drop_heads:
        key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
        x = jnp.zeros((1, 64, 64, 3), jnp.float32)
        fresh = jax.jit(model.init)(key, x)["params"]["head"]
        flat["params"].update(export.flatten({"head": fresh}))
    return {c: export.unflatten(f) for c, f in flat.items()}


def to_torch(variables: dict[str, Any], model: ResNet) -> dict[str, np.ndarray]:
    """torchvision / timm state dict (float32 numpy, with BN's `num_batches_tracked`) of Flax
    `variables`; `torchvision.models.resnet50().load_state_dict(..., strict=True)` accepts it."""
    expected = expected_shapes(model)
    flat = {c: export.flatten(dict(variables.get(c, {}))) for c in expected}
    out: dict[str, np.ndarray] = {}
    for key, (collection, path, kind) in _key_table(model).items():
        if path not in expected.get(collection, {}):
            continue  # a block without a projection shortcut
        if path not in flat[collection] or flat[collection][path].shape != (
            expected[collection][path].shape
        ):
            raise InputError(f"the {collection} do not fit ResNet({describe(model)}): {path}")
        value = flat[collection][path]
        if kind == "conv":
            value = value.transpose(3, 2, 0, 1)
        elif kind == "linear":
            value = value.T
        out[key] = np.array(value, np.float32, order="C", copy=True)
        if key.endswith(".running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return out


def convert_resnet_checkpoint(
    src: str | os.PathLike,
    model_name: str | None,
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    drop_heads: bool = False,
    state_dict: dict[str, np.ndarray] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """A torchvision or timm ResNet checkpoint (`.pth` or `.safetensors`) as an exported model
    folder (`export.save_model`); returns the folder.

    `model_name` (a `TEACHERS` name) must match the file's network. `preprocessing` defaults to
    torchvision's evaluation (224, crop 0.875, bilinear, ImageNet mean/std).
    """
    sd = load_state_dict(src) if state_dict is None else state_dict
    if not is_resnet(sd):
        what = "a DeiT" if "cls_token" in sd else "no ResNet"
        raise InputError(
            f"{src} holds {what} (keys {', '.join(sorted(sd)[:3])}, ...), not the "
            f"{model_name or 'ResNet'} asked for; expected a torchvision or timm ResNet"
        )
    head = sd.get("fc.weight")
    have = int(np.shape(head)[0]) if head is not None else 0
    classes = num_classes if num_classes is not None else have
    if not classes:
        raise InputError(f"{src} has no fc; expected num_classes for a fresh head")
    model = infer_resnet(sd, num_classes=classes)
    if model_name is not None:
        if model_name not in TEACHERS:
            create_teacher(model_name, classes)  # an unknown name: one line with close matches
            raise InputError(
                f"{src} holds a ResNet ({describe(model)}), not the {model_name} its name asks "
                f"for; expected one of {', '.join(TEACHERS)}"
            )
        check_architecture(model, model_name, str(src))
    name = model_name or registered_resnet(model)
    drop = drop_heads or classes != have
    variables = from_torch(sd, model, drop_heads=drop)
    imagenet = classes == IMAGENET_CLASSES and not drop
    prep = preprocessing or Preprocessing(224, crop_pct=0.875, interpolation="bilinear")
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
    """An exported ResNet folder as `out_dir/model.safetensors` in torchvision / timm's layout."""
    model, variables, _ = export.load_model(folder)
    if not isinstance(model, ResNet):
        raise InputError(f"{folder} holds a {type(model).__name__}, not a ResNet")
    return save_torch(to_torch(variables, model), Path(out_dir).absolute() / "model.safetensors")
