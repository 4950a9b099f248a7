"""RegNetY (Radosavovic et al., 2020), the paper's teacher family, in Flax Linen.

DeiT's best results distil from a RegNetY-16GF (DeiT §5.2, Table 2; timm's `regnety_160`). A
RegNet is drawn from its design space by six numbers (`RegNetCfg`): a linear width ramp
`w0 + wa * j` over `depth` blocks, quantised to powers of `wm`, so that equal widths form a
stage; a group width for the 3×3 convs, a bottleneck ratio and a squeeze-excitation ratio.
`stage_layout` turns them into stage widths, depths and group widths with the same float32
arithmetic as timm's `generate_regnet` (its quantisation to multiples of 8, then the widths made
divisible by the group width), so every `REGNETS` entry builds the network timm builds.

The network (`RegNet`) is timm's `RegNet` with its defaults: a 3×3/2 stem conv + BN + ReLU;
four stages, each opening with a stride-2 block; bottleneck blocks of 1×1 conv, grouped 3×3 conv,
squeeze-excitation (its reduced width a fraction of the *block's input* width), 1×1 conv, and a
1×1 conv + BN shortcut where the shape changes; BN eps 1e-5; global average pool and a linear
head. Convs pad symmetrically by `k // 2` as PyTorch does (not Flax's "SAME", which pads a
stride-2 conv on one side only), so converted weights give timm's logits.

Module names mirror timm's keys (`s2.b1.conv2.conv.weight` <-> `s2/b1/conv2/conv/kernel`), so
conversion (`deit.regnet_convert`) is a layout change per leaf. Images are NHWC; the compute
dtype is a field (bfloat16 allowed), parameters and BatchNorm statistics stay float32, logits
are float32. Train/eval BatchNorm is handled as for `teacher.ResNet`: `train=True` with
`mutable=["batch_stats"]`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deit.errors import InputError

BN_MOMENTUM = 0.9  # torch's momentum 0.1
BN_EPS = 1e-5
QUANT = 8  # timm's generate_regnet quantises block widths to multiples of 8
# timm's `_init_weights`: Kaiming normal on fan-out for convs, N(0, 0.01) for the head.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
head_init = nn.initializers.normal(0.01)


@dataclass(frozen=True)
class RegNetCfg:
    """A point of the RegNet design space (the paper's §3 parameters; timm's `RegNetCfg`)."""

    w0: int
    """Width of the first block (a multiple of 8)."""
    wa: float
    """Width slope: block j's continuous width is `w0 + wa * j`."""
    wm: float
    """Width multiplier between stages (> 1): widths are quantised to `w0 * wm**k`."""
    depth: int
    """Blocks in all."""
    group_size: int
    """Channels per group of the 3×3 convs."""
    se_ratio: float = 0.25
    """Squeeze-excitation width as a fraction of the block's input width (0: RegNetX)."""
    bottle_ratio: float = 1.0
    """Bottleneck width as a fraction of the block's output width."""
    stem_width: int = 32


# timm's `model_cfgs` for the RegNetY family (the numbers of pycls' model zoo), plus a tiny
# size for tests (4 stages of widths 8/16/32/64, depths 1/1/2/1).
REGNETS: dict[str, RegNetCfg] = {
    "regnety_002": RegNetCfg(w0=24, wa=36.44, wm=2.49, depth=13, group_size=8),
    "regnety_004": RegNetCfg(w0=48, wa=27.89, wm=2.09, depth=16, group_size=8),
    "regnety_006": RegNetCfg(w0=48, wa=32.54, wm=2.32, depth=15, group_size=16),
    "regnety_008": RegNetCfg(w0=56, wa=38.84, wm=2.4, depth=14, group_size=16),
    "regnety_016": RegNetCfg(w0=48, wa=20.71, wm=2.65, depth=27, group_size=24),
    "regnety_032": RegNetCfg(w0=80, wa=42.63, wm=2.66, depth=21, group_size=24),
    "regnety_040": RegNetCfg(w0=96, wa=31.41, wm=2.24, depth=22, group_size=64),
    "regnety_064": RegNetCfg(w0=112, wa=33.22, wm=2.27, depth=25, group_size=72),
    "regnety_080": RegNetCfg(w0=192, wa=76.82, wm=2.19, depth=17, group_size=56),
    "regnety_120": RegNetCfg(w0=168, wa=73.36, wm=2.37, depth=19, group_size=112),
    "regnety_160": RegNetCfg(w0=200, wa=106.23, wm=2.48, depth=18, group_size=112),
    "regnety_320": RegNetCfg(w0=232, wa=115.89, wm=2.53, depth=20, group_size=232),
    "regnety_test": RegNetCfg(w0=8, wa=12.0, wm=2.0, depth=5, group_size=8, stem_width=8),
}


@dataclass(frozen=True)
class StageLayout:
    """What `stage_layout` derives: per stage, its output width, block count and group width."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    group_sizes: tuple[int, ...]


def stage_layout(cfg: RegNetCfg) -> StageLayout:
    """Stage widths, depths and group widths of `cfg` (timm's `generate_regnet` followed by
    `adjust_widths_groups_comp`, in float32 as timm computes them)."""
    if cfg.w0 <= 0 or cfg.w0 % QUANT or cfg.wa < 0 or cfg.wm <= 1 or cfg.depth <= 0:
        raise InputError(
            f"RegNet w0={cfg.w0}, wa={cfg.wa}, wm={cfg.wm}, depth={cfg.depth}; expected w0 a "
            f"positive multiple of {QUANT}, wa >= 0, wm > 1 and depth > 0"
        )
    f32 = np.float32
    cont = np.arange(cfg.depth, dtype=f32) * f32(cfg.wa) + f32(cfg.w0)
    exps = np.round(np.log(cont / f32(cfg.w0)) / f32(np.log(cfg.wm)))
    widths = np.round(f32(cfg.w0) * np.power(f32(cfg.wm), exps) / f32(QUANT)) * f32(QUANT)
    stage_widths, depths = np.unique(widths.astype(np.int64), return_counts=True)
    out_widths, groups = [], []
    for w in stage_widths.tolist():
        bottleneck = int(w * cfg.bottle_ratio)
        g = min(cfg.group_size, bottleneck)
        bottleneck = int(round(bottleneck / g) * g)
        out_widths.append(int(bottleneck / cfg.bottle_ratio))
        groups.append(g)
    return StageLayout(tuple(out_widths), tuple(int(d) for d in depths), tuple(groups))


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = kernel // 2  # PyTorch's symmetric padding for odd kernels
    return ((p, p), (p, p))


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU): timm's `ConvNormAct`, `(B, H, W, C)` in and out."""

    features: int
    kernel: int = 1
    strides: int = 1
    groups: int = 1
    act: bool = True
    zero_scale: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.strides,
            padding=_pad(self.kernel),
            feature_group_count=self.groups,
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            scale_init=nn.initializers.zeros if self.zero_scale else nn.initializers.ones,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        return nn.relu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel gates from the spatial mean: `x * sigmoid(fc2(relu(fc1(mean(x)))))`."""

    reduced: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, name: nn.Dense(
            n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init, name=name
        )
        # The mean over H*W in float32: a bf16 sum over 56*56 positions loses digits.
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        s = dense(x.shape[-1], "fc2")(nn.relu(dense(self.reduced, "fc1")(s)))
        return x * nn.sigmoid(s)[:, None, None, :].astype(x.dtype)


class Bottleneck(nn.Module):
    """RegNet's block: 1×1, grouped 3×3 (strided), SE, 1×1, plus the shortcut; then ReLU."""

    features: int
    strides: int
    group_size: int
    bottle_ratio: float
    se_ratio: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        in_width = x.shape[-1]
        width = round(self.features * self.bottle_ratio)
        conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
        y = conv(width, name="conv1")(x, train=train)
        y = conv(width, 3, self.strides, width // self.group_size, name="conv2")(y, train=train)
        if self.se_ratio:
            y = SqueezeExcite(round(in_width * self.se_ratio), self.dtype, name="se")(y)
        # Zero-init of the last BN scale: each block starts as its shortcut (timm's zero_init_last).
        y = conv(self.features, act=False, zero_scale=True, name="conv3")(y, train=train)
        if in_width != self.features or self.strides != 1:
            x = conv(self.features, 1, self.strides, act=False, name="downsample")(x, train=train)
        return nn.relu(y + x)


class RegStage(nn.Module):
    """`depth` blocks of one width, the first one strided; blocks named `b1`, `b2`, ..."""

    features: int
    depth: int
    group_size: int
    bottle_ratio: float
    se_ratio: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for j in range(self.depth):
            x = Bottleneck(
                self.features,
                2 if j == 0 else 1,
                self.group_size,
                self.bottle_ratio,
                self.se_ratio,
                self.dtype,
                name=f"b{j + 1}",
            )(x, train=train)
        return x


class ClassifierHead(nn.Module):
    """Global average pool + linear: `(B, H, W, C)` -> `(B, K)` (timm's `head.fc`)."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=head_init,
            name="fc",
        )(x)


class RegNet(nn.Module):
    """RegNet classifier: images `(B, H, W, C)` float32, already normalised -> logits `(B, K)`.

    `widths`, `depths` and `group_sizes` give each stage (see `stage_layout`); every stage
    halves the resolution, as does the stem, so the input side should be a multiple of 32.
    BatchNorm statistics live in `batch_stats`: pass `mutable=["batch_stats"]` with
    `train=True`.
    """

    widths: Sequence[int]
    depths: Sequence[int]
    group_sizes: Sequence[int]
    num_classes: int
    se_ratio: float = 0.25
    bottle_ratio: float = 1.0
    stem_width: int = 32
    in_chans: int = 3
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        n = len(self.widths)
        if not n or len(self.depths) != n or len(self.group_sizes) != n:
            raise InputError(
                f"widths {tuple(self.widths)}, depths {tuple(self.depths)}, group_sizes "
                f"{tuple(self.group_sizes)}; expected one of each per stage"
            )
        bad = [
            w
            for w, g in zip(self.widths, self.group_sizes, strict=True)
            if g <= 0 or round(w * self.bottle_ratio) % g
        ]
        if bad or any(d <= 0 for d in self.depths) or self.num_classes <= 0:
            raise InputError(
                f"RegNet widths {tuple(self.widths)}, depths {tuple(self.depths)}, group sizes "
                f"{tuple(self.group_sizes)}, {self.num_classes} classes; expected positive "
                "depths and classes, and bottleneck widths divisible by their group size"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise InputError(f"images have shape {tuple(images.shape)}; expected (B, H, W, C)")
        x = images.astype(self.dtype)
        x = ConvBN(self.stem_width, 3, 2, dtype=self.dtype, name="stem")(x, train=train)
        for i, (width, depth, group) in enumerate(
            zip(self.widths, self.depths, self.group_sizes, strict=True)
        ):
            x = RegStage(
                width, depth, group, self.bottle_ratio, self.se_ratio, self.dtype, name=f"s{i + 1}"
            )(x, train=train)
        x = ClassifierHead(self.num_classes, self.dtype, name="head")(x)
        return x.astype(jnp.float32)


_OVERRIDABLE = {"se_ratio", "bottle_ratio", "stem_width", "in_chans", "dtype"}


def close_names(name: str, names: Sequence[str]) -> list[str]:
    """Up to three of `names` that look like `name` (a typo's likely meaning)."""
    return difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)


def create_regnet(name: str, num_classes: int = 1000, **overrides: Any) -> RegNet:
    """The registered RegNet `name` (`REGNETS`) with `num_classes` outputs.

    Overrides set `dtype` (the compute dtype), `in_chans`, or replace `se_ratio`,
    `bottle_ratio`, `stem_width`.
    """
    if name not in REGNETS:
        near = close_names(name, REGNETS)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(f"unknown RegNet {name!r}; {hint}expected one of {', '.join(REGNETS)}")
    unknown = sorted(set(overrides) - _OVERRIDABLE)
    if unknown:
        raise InputError(
            f"unknown override(s) {unknown} for {name}; expected {sorted(_OVERRIDABLE)}"
        )
    cfg = dataclasses.replace(
        REGNETS[name], **{k: v for k, v in overrides.items() if k in ("se_ratio", "bottle_ratio")}
    )
    layout = stage_layout(cfg)
    kwargs = {"stem_width": cfg.stem_width} | overrides
    kwargs.update(se_ratio=cfg.se_ratio, bottle_ratio=cfg.bottle_ratio)
    return RegNet(
        widths=layout.widths,
        depths=layout.depths,
        group_sizes=layout.group_sizes,
        num_classes=num_classes,
        **kwargs,
    )


def architecture(model: RegNet) -> tuple:
    """What makes two RegNets the same network, whatever their head and dtype."""
    return (
        tuple(model.widths),
        tuple(model.depths),
        tuple(model.group_sizes),
        float(model.se_ratio),
        float(model.bottle_ratio),
        int(model.stem_width),
    )


def registered_name(model: RegNet) -> str | None:
    """The `REGNETS` name of `model`'s network, if it has one."""
    for name in REGNETS:
        if architecture(create_regnet(name, 1)) == architecture(model):
            return name
    return None


def describe(model: RegNet) -> str:
    """`widths 224/448/1232/3024, depths 2/4/11/1, group 112` (for error lines)."""
    join = lambda xs: "/".join(map(str, xs))
    groups = set(model.group_sizes)
    group = str(next(iter(groups))) if len(groups) == 1 else join(model.group_sizes)
    se = f", SE {model.se_ratio:g}" if model.se_ratio else ", no SE"
    return f"widths {join(model.widths)}, depths {join(model.depths)}, group {group}{se}"
