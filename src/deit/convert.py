"""Checkpoint conversion between PyTorch DeiT weights (timm/official or Hugging Face) and Flax.

Everything here runs without torch: files are read by `deit.torch_pickle` (a restricted
unpickler for `.pth`, `safetensors` for `.safetensors`); `load_state_dict` and `save_torch` are
re-exported here. Our Flax names mirror timm's keys
(`blocks.3.attn.qkv.weight` <-> `blocks_3/attn/qkv/kernel`), so the timm map is a table plus the
layout changes: conv `(O, I, kh, kw)` -> `(kh, kw, I, O)`, linear `(out, in)` -> `(in, out)`,
LayerNorm `weight` -> `scale`. Hugging Face names are first rewritten to timm's, fusing the separate
q, k, v projections into timm's `qkv` (rows `[q | k | v]`, head-major in each).

DeiT III: timm's `blocks.{i}.ls1.gamma` / `ls2.gamma` are our `blocks_{i}/ls1/gamma` / `ls2`; the
official `deit_3_*.pth` files (`models_v2.py`) name them `blocks.{i}.gamma_1` / `gamma_2` and are
otherwise timm's layout, so they are renamed first (`official_v2_to_timm`). Their `pos_embed`
has no prefix rows, which the file shows by its square patch count.

Over 400 lines: the key tables of the three layouts and the whole-file conversion share the same
private maps, and splitting them would make a module of tables that every other one imports.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deit import export
from deit.class_names import IMAGENET, IMAGENET_CLASSES
from deit.errors import InputError
from deit.model import DeiT, create_model, init_params, resample_pos_embed
from deit.torch_pickle import load_state_dict, save_torch
from deit.variants import VARIANTS, Preprocessing, get_spec, resolve_name

__all__ = [
    "convert_checkpoint",
    "detect_layout",
    "from_torch",
    "hf_to_timm",
    "infer_variant",
    "load_state_dict",
    "official_v2_to_timm",
    "save_torch",
    "to_torch",
]

# timm module path -> (Flax module path, kind); kind decides the layout change of `weight`.
_TOP = {
    "patch_embed.proj": ("patch_embed/proj", "conv"),
    "norm": ("norm", "norm"),
    "head": ("cls_head", "linear"),
    "head_dist": ("dist_head", "linear"),
}
_BLOCK = {
    "norm1": ("norm1", "norm"),
    "norm2": ("norm2", "norm"),
    "attn.qkv": ("attn/qkv", "linear"),
    "attn.proj": ("attn/proj", "linear"),
    "mlp.fc1": ("mlp/fc1", "linear"),
    "mlp.fc2": ("mlp/fc2", "linear"),
    "ls1": ("ls1", "layerscale"),
    "ls2": ("ls2", "layerscale"),
}
_TOKENS = ("cls_token", "dist_token", "pos_embed")
_WEIGHT_LEAF = {"conv": "kernel", "linear": "kernel", "norm": "scale", "layerscale": "gamma"}
_OFFICIAL_V2_RE = re.compile(r"blocks\.(\d+)\.gamma_([12])")
_HEADS = ("cls_head/", "dist_head/")

# Hugging Face -> timm. Two generations of HF names: the Hub files (`encoder.layer.N.attention.
# attention.query`) and transformers >= 5 (`layers.N.attention.q_proj`).
_HF_TOP = {
    "deit.embeddings.cls_token": "cls_token",
    "deit.embeddings.distillation_token": "dist_token",
    "deit.embeddings.position_embeddings": "pos_embed",
    "deit.embeddings.patch_embeddings.projection": "patch_embed.proj",
    "deit.layernorm": "norm",
    "cls_classifier": "head",
    "distillation_classifier": "head_dist",
    "classifier": "head",  # DeiTForImageClassification: one head on the class token
}
_HF_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_HF_LAYER_RE = re.compile(r"deit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")


def detect_layout(state_dict: dict[str, Any]) -> Literal["timm", "hf"]:
    """`"hf"` for Hugging Face names (`deit.embeddings...`), `"timm"` for timm/official ones."""
    return "hf" if any(k.startswith(("deit.", "embeddings.")) for k in state_dict) else "timm"


def hf_to_timm(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename Hugging Face DeiT keys to timm's, fusing q/k/v into `qkv`.

    A bare `DeiTModel`'s keys (no `deit.` prefix) are accepted; its `pooler.*` is dropped, since
    the DeiT classifiers have no pooler. Keys that fit no rule are kept as they are, so
    `from_torch` reports them.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[int, tuple[str, np.ndarray]]] = {}
    for key, value in state_dict.items():
        if key.startswith(("embeddings.", "encoder.", "layers.", "layernorm.", "pooler.")):
            key = f"deit.{key}"  # a bare DeiTModel saves its keys without the `deit.` prefix
        if key.startswith("deit.pooler."):
            continue
        module, _, leaf = key.rpartition(".")
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif module in _HF_TOP and leaf in ("weight", "bias"):
            out[f"{_HF_TOP[module]}.{leaf}"] = value
        elif (m := _HF_LAYER_RE.fullmatch(key)) and m[2] in _HF_LAYER:
            out[f"blocks.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"] = value
        elif m and m[2] in _HF_QKV:
            qkv.setdefault((m[1], m[3]), {})[_HF_QKV[m[2]]] = (key, value)
        else:
            out[key] = value
    for (block, leaf), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{block}.attn.qkv.{leaf}"] = np.concatenate([parts[i][1] for i in range(3)])
        else:  # left under their own names: reported as unexpected, qkv as missing
            out.update(dict(parts.values()))
    return out


def official_v2_to_timm(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official DeiT III layout (`models_v2.py`: `blocks.{i}.gamma_1` / `gamma_2`) renamed
    to timm's (`blocks.{i}.ls1.gamma` / `ls2.gamma`); every other key is already timm's."""
    out = {}
    for key, value in state_dict.items():
        m = _OFFICIAL_V2_RE.fullmatch(key)
        out[f"blocks.{m[1]}.ls{m[2]}.gamma" if m else key] = value
    return out


def _timm_to_flax(key: str) -> tuple[str, str] | None:
    """`(Flax path, kind)` of a timm key, or None if the key is not part of DeiT."""
    if key in _TOKENS:
        return key, "raw"
    module, _, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias", "gamma"):
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    table, sub, prefix = (_BLOCK, m[2], f"blocks_{int(m[1])}/") if m else (_TOP, module, "")
    if sub not in table:
        return None
    path, kind = table[sub]
    if (leaf == "gamma") != (kind == "layerscale"):
        return None
    return f"{prefix}{path}/{'bias' if leaf == 'bias' else _WEIGHT_LEAF[kind]}", kind


def _flax_to_timm(name: str) -> tuple[str, str]:
    """Inverse of `_timm_to_flax`: `(timm key, kind)` of a Flax path."""
    if name in _TOKENS:
        return name, "raw"
    module, _, leaf = name.rpartition("/")
    m = re.fullmatch(r"blocks_(\d+)/(.+)", module)
    table, sub, prefix = (_BLOCK, m[2], f"blocks.{m[1]}.") if m else (_TOP, module, "")
    timm_module, kind = next((t, k) for t, (f, k) in table.items() if f == sub)
    timm_leaf = "gamma" if kind == "layerscale" else "bias" if leaf == "bias" else "weight"
    return f"{prefix}{timm_module}.{timm_leaf}", kind


def _to_flax_layout(value: np.ndarray, kind: str, leaf: str) -> np.ndarray | None:
    if leaf != "kernel":
        return value
    if kind == "conv":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else None
    return value.T if value.ndim == 2 else None


def _to_torch_layout(value: np.ndarray, kind: str, leaf: str) -> np.ndarray:
    if leaf != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if kind == "conv" else value.T


def expected_shapes(model: DeiT) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `{Flax path: shape/dtype}` of `model.init`'s params, computed without any FLOPs."""
    h, w = (model.img_size, model.img_size) if isinstance(model.img_size, int) else model.img_size
    dummy = jax.ShapeDtypeStruct((1, h, w, model.in_chans), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
    return traverse_util.flatten_dict(dict(shapes), sep="/")


def _diff(model: DeiT, missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    fields = ("embed_dim", "depth", "img_size", "num_classes", "distilled", "in_chans")
    fields += ("init_values", "no_embed_class")
    described = ", ".join(f"{f}={getattr(model, f)}" for f in fields)
    lines = [f"checkpoint does not fit DeiT({described}):"]
    sections = {"missing from the checkpoint": missing, "unexpected in the checkpoint": unexpected}
    sections["shape mismatches"] = wrong
    for title, items in sections.items():
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items]
    if any(item.startswith(("head", "cls_head", "dist_head")) for item in wrong + missing):
        lines.append("  (for another class count, load with drop_heads=True: fresh heads)")
    return "\n".join(lines)


def _resamplable(array: np.ndarray | None, want: tuple, prefix: int, model: DeiT) -> bool:
    """A square-grid `pos_embed` of the right width and prefix count, on another grid."""
    if array is None or array.ndim != 3 or array.shape == want or array.shape[2] != want[2]:
        return False
    side = math.isqrt(array.shape[1] - prefix)
    return prefix == model.pos_embed_prefix and side * side == array.shape[1] - prefix


def _pos_embed_prefix(sd: dict[str, np.ndarray]) -> int:
    """The prefix rows of a timm-layout `pos_embed`: none when its row count is a square (a
    DeiT III's, patches only: g² + 1 and g² + 2 are never squares), else one per token."""
    rows = int(np.shape(sd["pos_embed"])[1]) if "pos_embed" in sd else 0
    if rows and math.isqrt(rows) ** 2 == rows:
        return 0
    return 2 if "dist_token" in sd else 1


def _check_hf_heads(state_dict: dict[str, np.ndarray], model: DeiT) -> None:
    if "classifier.weight" in state_dict and (not model.distilled or model.with_dist_head):
        raise InputError(
            "this is a Hugging Face DeiTForImageClassification checkpoint: a distillation token "
            "but one `classifier` head on the class token; build the model with distilled=True, "
            "with_dist_head=False (create_model(name, with_dist_head=False)) or drop the heads"
        )


def from_torch(
    state_dict: dict[str, np.ndarray],
    model: DeiT,
    *,
    drop_heads: bool = False,
    rng: int | jax.Array = 0,
) -> dict[str, Any]:
    """Flax params (the `"params"` collection, shaped as `model.init`'s) from PyTorch weights.

    The layout (timm/official or Hugging Face) is detected. Strict: every missing key, unexpected
    key and shape mismatch is collected into one ValueError. `pos_embed` on another grid is
    resampled (prefix tokens kept). `drop_heads=True` ignores the checkpoint's heads and keeps
    freshly initialised ones (from `rng`), e.g. to fine-tune on another class count.
    """
    if detect_layout(state_dict) == "hf":
        if not drop_heads:
            _check_hf_heads(state_dict, model)
        state_dict = hf_to_timm(state_dict)
    else:
        state_dict = official_v2_to_timm(state_dict)
    expected = expected_shapes(model)
    prefix_in_file = _pos_embed_prefix(state_dict)
    flat: dict[str, np.ndarray] = {}
    unexpected, wrong = [], []
    misshapen: set[str] = set()  # listed once, with both shapes, and not as missing too
    for key, value in state_dict.items():
        value = np.asarray(value)
        target = _timm_to_flax(key)
        if target is None or target[0] not in expected:
            if not (drop_heads and target is not None and target[0].startswith(_HEADS)):
                unexpected.append(f"{key} {value.shape}")
            continue
        name, kind = target
        if drop_heads and name.startswith(_HEADS):
            continue
        want = expected[name].shape
        channels = value.shape[1] if name == "patch_embed/proj/kernel" and value.ndim == 4 else None
        if channels is not None and channels != model.in_chans:
            wrong.append(
                f"{key} {value.shape}: the checkpoint has {channels} input channels, "
                f"the model expects in_chans={model.in_chans}"
            )
            misshapen.add(name)
            continue
        array = _to_flax_layout(value, kind, name.rpartition("/")[2])
        if name == "pos_embed" and _resamplable(array, want, prefix_in_file, model):
            array = np.asarray(resample_pos_embed(array, model.grid, prefix_in_file))
        if array is None or array.shape != want:
            shown = f" -> {name} {array.shape}" if array is not None else ""
            wrong.append(f"{key} {value.shape}{shown}, the model expects {name} {want}")
            misshapen.add(name)
            continue
        flat[name] = array.astype(expected[name].dtype)
    skipped = lambda n: n in flat or n in misshapen or (drop_heads and n.startswith(_HEADS))
    missing = [
        f"{_flax_to_timm(n)[0]} ({n} {s.shape})" for n, s in expected.items() if not skipped(n)
    ]
    if missing or unexpected or wrong:
        raise InputError(_diff(model, missing, unexpected, wrong))
    if drop_heads:
        fresh = export.flatten(init_params(model, rng))
        flat.update({n: v for n, v in fresh.items() if n.startswith(_HEADS)})
    return export.unflatten(flat)


def to_torch(params: dict[str, Any], model: DeiT) -> dict[str, np.ndarray]:
    """timm-layout state dict (float32 numpy) of Flax `params`; the exact inverse of `from_torch`.

    `timm_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts it.
    """
    if model.distilled and not model.with_dist_head and model.num_classes > 0:
        raise InputError("a distilled model without a distillation head has no timm equivalent")
    if "params" in params and not any(k.startswith("blocks_") for k in params):
        params = params["params"]
    flat = export.flatten(dict(params))
    expected = expected_shapes(model)
    missing = [f"{n} {s.shape}" for n, s in expected.items() if n not in flat]
    unexpected = [f"{n} {v.shape}" for n, v in flat.items() if n not in expected]
    wrong = [
        f"{n} {v.shape}, the model expects {expected[n].shape}"
        for n, v in flat.items()
        if n in expected and v.shape != expected[n].shape
    ]
    if missing or unexpected or wrong:
        raise InputError(_diff(model, missing, unexpected, wrong).replace("checkpoint", "params"))
    out = {}
    for name, value in flat.items():
        key, kind = _flax_to_timm(name)
        array = _to_torch_layout(value, kind, name.rpartition("/")[2])
        # A fresh writable copy: torch.from_numpy warns on the read-only views jax hands out.
        out[key] = np.array(array, dtype=np.float32, order="C", copy=True)
    return out


# ----------------------------------------------------------------------------- whole files


def _architecture(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    """What a timm-layout state dict says about its model (heads are not recoverable)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in need):
        raise InputError(f"not a DeiT state dict: it lacks {[k for k in need if k not in sd]}")
    patch = sd["patch_embed.proj.weight"]
    prefix = _pos_embed_prefix(sd)
    side = math.isqrt(sd["pos_embed"].shape[1] - prefix)
    return dict(
        embed_dim=int(sd["cls_token"].shape[-1]),
        depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
        patch_size=int(patch.shape[-1]),
        in_chans=int(patch.shape[1]),
        distilled="dist_token" in sd,
        layer_scale="blocks.0.ls1.gamma" in sd,
        no_embed_class=prefix == 0,
        img_size=side * int(patch.shape[-1]),
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    )


def infer_variant(arch: dict[str, Any]) -> str:
    """The registered variant with this width, depth, MLP, patch size and token count (and
    DeiT III's LayerScale and patch-only position embedding, or their absence)."""
    keys = ("embed_dim", "depth", "mlp_dim", "patch_size", "distilled", "no_embed_class")
    arch = {"no_embed_class": False, "layer_scale": False, **arch}
    fits = [
        n
        for n, s in VARIANTS.items()
        if all(getattr(s, k) == arch[k] for k in keys)
        and (s.init_values is not None) == arch["layer_scale"]
    ]
    exact = [n for n in fits if VARIANTS[n].img_size == arch["img_size"]]
    if len(exact) == 1 or len(fits) == 1:
        return (exact or fits)[0]
    described = ", ".join(f"{k}={arch[k]}" for k in (*keys, "img_size"))
    raise InputError(
        f"cannot tell the variant of a checkpoint with {described}: "
        + (f"candidates {fits}" if fits else f"no registered variant fits ({', '.join(VARIANTS)})")
        + "; pass the model name"
    )


def convert_checkpoint(
    src: str | os.PathLike,
    model_name: str | None,
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    drop_heads: bool = False,
    to: Literal["flax", "timm"] = "flax",
    preprocessing: Preprocessing | None = None,
    crop_pct: float | None = None,
) -> Path:
    """Convert a checkpoint file or exported folder; return what was written.

    `to="flax"`: a PyTorch checkpoint (timm/official or Hugging Face) becomes an exported model
    folder (`deit.export.save_model`), returned. The variant is inferred when `model_name` is None;
    class count, image size and input channels follow the checkpoint unless overridden.
    `to="timm"`: an exported folder becomes `out_dir/model.safetensors` in timm's layout, returned.
    A RegNet or ResNet checkpoint goes to `deit.regnet_convert` / `deit.resnet_convert`;
    `preprocessing` is the one written for a ResNet (its weights' own; torchvision's by default).
    `crop_pct` replaces the registry's eval crop of the variant in the written preprocessing
    (weights of one network evaluated otherwise: DeiT III's 21k-pretrained ones at 1.0).
    """
    from deit import regnet_convert, resnet_convert
    from deit.regnet import RegNet
    from deit.teacher import ResNet

    if to == "timm":
        model, variables, _ = export.load_model(src)
        if isinstance(model, RegNet):
            return regnet_convert.export_timm(src, out_dir)
        if isinstance(model, ResNet):
            return resnet_convert.export_timm(src, out_dir)
        if not isinstance(model, DeiT):
            raise InputError(f"{src} holds a {type(model).__name__}, not a DeiT")
        target = Path(out_dir).absolute() / "model.safetensors"
        return save_torch(to_torch(variables["params"], model), target)
    if to != "flax":
        raise InputError(f"to={to!r}; expected 'flax' or 'timm'")
    state_dict = load_state_dict(src)
    if resnet_convert.is_resnet(state_dict) or (model_name or "").startswith("resnet"):
        # torchvision / timm ResNets (`deit.teacher.TEACHERS`), as CNN teachers.
        if img_size is not None:
            raise InputError("img_size: a ResNet takes any image size; expected it unset")
        return resnet_convert.convert_resnet_checkpoint(
            src,
            model_name,
            out_dir,
            num_classes=num_classes,
            drop_heads=drop_heads,
            state_dict=state_dict,
            preprocessing=preprocessing,
        )
    if regnet_convert.is_regnet(state_dict) or (model_name or "").startswith("regnet"):
        # The paper's teacher and its family (`deit.regnet`): a network of their own.
        if img_size is not None:
            raise InputError("img_size: a RegNet takes any image size; expected it unset")
        return regnet_convert.convert_regnet_checkpoint(
            src,
            model_name,
            out_dir,
            num_classes=num_classes,
            drop_heads=drop_heads,
            state_dict=state_dict,
        )
    hf = detect_layout(state_dict) == "hf"
    timm_sd = hf_to_timm(state_dict) if hf else official_v2_to_timm(state_dict)
    arch = _architecture(timm_sd)
    name = resolve_name(model_name) if model_name else infer_variant(arch)
    spec = get_spec(name)
    overrides: dict[str, Any] = {}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    elif not drop_heads and arch["num_classes"] != spec.num_classes:
        overrides["num_classes"] = arch["num_classes"]
    if img_size is not None or arch["img_size"] != spec.img_size:
        overrides["img_size"] = img_size or arch["img_size"]
    if arch["in_chans"] != spec.in_chans:
        overrides["in_chans"] = arch["in_chans"]
    single_head = "head.weight" in timm_sd and "head_dist.weight" not in timm_sd
    if single_head and arch["distilled"] and not drop_heads:
        overrides["with_dist_head"] = False
    model = create_model(name, **overrides)
    params = from_torch(state_dict, model, drop_heads=drop_heads)
    # The registry's eval preprocessing of the variant, at the converted model's size.
    prep = Preprocessing.from_config(
        {"variant": name, **({"crop_pct": crop_pct} if crop_pct is not None else {})}, model
    )
    # The official, timm and HF DeiT heads are ImageNet-1k classifiers: `class_names` then
    # names their outputs; a head of another size (or fresh heads) is not ImageNet's.
    imagenet = model.num_classes == IMAGENET_CLASSES and not drop_heads
    return export.save_model(
        out_dir,
        model,
        {"params": params},
        source=str(src),
        variant=name,
        **({"dataset": IMAGENET} if imagenet else {}),
        **prep.to_config(),
    )
