"""CNN teachers for distillation and the frozen `Teacher` wrapper.

The paper's best teacher is a RegNetY-16GF (DeiT §5.2, Table 2): a convnet, because its inductive
bias is what the student inherits through the distillation token. Here a small ResNet family
(He et al., 2016) plays that role: `resnet8` is the CIFAR-style 6n+2 network with n = 1 (three
stages of one basic block, 16/32/64 filters, 3×3 stem) that fits the 32×32 built-in data set;
`resnet18` / `resnet26` / `resnet50` are the ImageNet-style networks with the 7×7/2 stem and max
pool (pass `small_input=True` for 32×32 images). Shortcuts are 1×1 projections where the shape
changes (option B of the paper, also for `resnet8`, where He et al. used zero padding).
`padding="torch"` pads every conv and the max pool symmetrically, as torchvision and timm do, so
their checkpoints (`deit.resnet_convert`) give their logits; Flax's default `"same"` pads a
stride-2 layer more at the end, which a network trained here from scratch does not mind.

The teacher runs in eval mode (running BatchNorm statistics) on the student's mixed images, with
its own normalisation, under `stop_gradient` (official `losses.py` calls it under `no_grad`).
Its variables are a pytree field of `Teacher`, so a jitted step takes them as an argument rather
than baking megabytes of weights into the compiled program as constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from deit.errors import InputError

BN_MOMENTUM = 0.9  # torch's momentum 0.1: running = 0.9 * running + 0.1 * batch
BN_EPS = 1e-5
# torchvision's ResNet init: Kaiming normal on fan-out for every conv.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


Padding = Literal["same", "torch"]


class BasicBlock(nn.Module):
    """Two 3×3 convs: `(B, H, W, C)` -> `(B, H/s, W/s, filters)`."""

    filters: int
    strides: int = 1
    dtype: Any = jnp.float32
    padding: Padding = "same"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = _conv_factory(self.dtype, self.padding)
        norm = _norm_factory(self.dtype, train)
        y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
        # Zero-init of the last BN scale makes each block start as the identity (Goyal et al.).
        y = norm(scale_init=nn.initializers.zeros)(conv(self.filters, (3, 3))(y))
        return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, conv, norm))


class BottleneckBlock(nn.Module):
    """1×1 reduce, 3×3 (strided, as torchvision's "ResNet v1.5"), 1×1 expand ×4."""

    filters: int
    strides: int = 1
    dtype: Any = jnp.float32
    padding: Padding = "same"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = _conv_factory(self.dtype, self.padding)
        norm = _norm_factory(self.dtype, train)
        y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
        y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(y)))
        y = norm(scale_init=nn.initializers.zeros)(conv(4 * self.filters, (1, 1))(y))
        return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, conv, norm))


def _conv_factory(dtype: Any, padding: Padding = "same") -> Callable[..., nn.Conv]:
    def conv(features: int, kernel: tuple[int, int], strides: int = 1, **kwargs: Any) -> nn.Conv:
        return nn.Conv(
            features,
            kernel,
            strides=strides,
            padding="SAME" if padding == "same" else [((k - 1) // 2,) * 2 for k in kernel],
            use_bias=False,
            kernel_init=conv_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            **kwargs,
        )

    return conv


def _norm_factory(dtype: Any, train: bool) -> Callable[..., nn.BatchNorm]:
    def norm(**kwargs: Any) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=dtype,
            param_dtype=jnp.float32,
            **kwargs,
        )

    return norm


def _shortcut(
    x: jax.Array, features: int, strides: int, conv: Callable, norm: Callable
) -> jax.Array:
    if x.shape[-1] == features and strides == 1:
        return x
    return norm()(conv(features, (1, 1), strides)(x))


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
    """ResNet classifier: images `(B, H, W, C)` float32, already normalised -> logits `(B, K)`.

    Stage `i` has `num_filters * 2**i` filters (×4 at the output of bottleneck blocks) and
    halves the resolution except for stage 0. `small_input=True` swaps the 7×7/2 stem and
    3×3/2 max pool for one 3×3/1 conv (CIFAR style), so 32×32 images keep a useful resolution.
    BatchNorm statistics live in the `batch_stats` collection: pass `mutable=["batch_stats"]`
    with `train=True`. Under a sharded jit the batch statistics are over the global batch.
    """

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64
    block: Literal["basic", "bottleneck"] = "basic"
    small_input: bool = False
    dtype: Any = jnp.float32
    padding: Padding = "same"

    def __post_init__(self) -> None:
        if self.block not in _BLOCKS:
            raise InputError(f"block {self.block!r}; expected one of {sorted(_BLOCKS)}")
        if self.padding not in ("same", "torch"):
            raise InputError(f"padding {self.padding!r}; expected 'same' or 'torch'")
        if not self.stage_sizes or any(n <= 0 for n in self.stage_sizes):
            raise InputError(f"stage_sizes {tuple(self.stage_sizes)}; expected positive counts")
        if self.num_filters <= 0 or self.num_classes <= 0:
            raise InputError(
                f"num_filters {self.num_filters}, num_classes {self.num_classes}; expected > 0"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise InputError(f"images have shape {tuple(images.shape)}; expected (B, H, W, C)")
        conv = _conv_factory(self.dtype, self.padding)
        norm = _norm_factory(self.dtype, train)
        x = images.astype(self.dtype)
        if self.small_input:
            x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
        else:
            x = nn.relu(
                norm(name="bn_init")(conv(self.num_filters, (7, 7), 2, name="conv_init")(x))
            )
            pool_pad = "SAME" if self.padding == "same" else ((1, 1), (1, 1))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pool_pad)
        block_cls = _BLOCKS[self.block]
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                block = block_cls(self.num_filters * 2**i, strides, self.dtype, self.padding)
                x = block(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
        return x.astype(jnp.float32)


@dataclass(frozen=True)
class ResNetSpec:
    """Architecture of one registered teacher."""

    stage_sizes: tuple[int, ...]
    block: Literal["basic", "bottleneck"]
    num_filters: int = 64
    small_input: bool = False


TEACHERS: dict[str, ResNetSpec] = {
    # He et al. §4.2: 6n+2 layers with n = 1, filters 16/32/64 on 32×32 inputs.
    "resnet8": ResNetSpec((1, 1, 1), "basic", num_filters=16, small_input=True),
    "resnet18": ResNetSpec((2, 2, 2, 2), "basic"),
    "resnet26": ResNetSpec((2, 2, 2, 2), "bottleneck"),
    "resnet50": ResNetSpec((3, 4, 6, 3), "bottleneck"),
}

_OVERRIDABLE = {f.name for f in dataclasses.fields(ResNetSpec)} | {"dtype", "padding"}


def resnet_spec(model: ResNet) -> ResNetSpec:
    """The architecture of `model`, comparable with `TEACHERS`' entries."""
    return ResNetSpec(tuple(model.stage_sizes), model.block, model.num_filters, model.small_input)


def registered_resnet(model: ResNet) -> str | None:
    """The `TEACHERS` name whose architecture `model` has, or None."""
    spec = resnet_spec(model)
    return next((name for name, s in TEACHERS.items() if s == spec), None)


def create_teacher(name: str, num_classes: int, **overrides: Any) -> nn.Module:
    """A registered ResNet (`TEACHERS`) or RegNet (`deit.regnet.REGNETS`) with `num_classes`
    outputs.

    Overrides replace spec fields (`num_filters`, `small_input`, `stage_sizes`, `block`) or set
    the compute `dtype` or the `padding` (`"torch"` for torchvision / timm weights).
    """
    from deit.regnet import REGNETS, close_names, create_regnet

    if name in REGNETS:  # the paper's teacher family (`deit.regnet`); no small-input stem
        overrides.pop("small_input", None)
        return create_regnet(name, num_classes, **overrides)
    if name not in TEACHERS:
        near = close_names(name, [*TEACHERS, *REGNETS])
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(
            f"unknown teacher {name!r}; {hint}expected one of {sorted(TEACHERS) + list(REGNETS)}"
        )
    unknown = sorted(set(overrides) - _OVERRIDABLE)
    if unknown:
        raise InputError(
            f"unknown override(s) {unknown} for {name}; expected {sorted(_OVERRIDABLE)}"
        )
    kwargs = dataclasses.asdict(TEACHERS[name]) | overrides
    kwargs["stage_sizes"] = tuple(kwargs["stage_sizes"])
    return ResNet(num_classes=num_classes, **kwargs)


@dataclass(frozen=True)
class _LogitsFn:
    """`(variables, images) -> (B, K)` in eval mode; compares by model so jit caches are shared."""

    model: nn.Module
    deit: bool = False

    def __call__(self, variables: Any, images: jax.Array) -> jax.Array:
        out = self.model.apply(variables, images, train=False)
        return out.logits if self.deit else out


@struct.dataclass
class Teacher:
    """A frozen classifier with its own input normalisation.

    `variables` is the only pytree field (traced by jit); the rest is static. Call it, or use
    `teacher_logits`, on images in [0, 1] `(B, H, W, C)`; it returns logits `(B, K)` float32.
    """

    variables: Any
    apply_fn: Callable[[Any, jax.Array], jax.Array] = struct.field(pytree_node=False)
    mean: tuple[float, ...] = struct.field(pytree_node=False)
    std: tuple[float, ...] = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False)
    image_size: tuple[int, int] | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self) -> None:
        # Canonical static fields: equal teachers share jit caches whatever was passed in.
        size = self.image_size
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "mean", tuple(map(float, self.mean)))
        object.__setattr__(self, "std", tuple(map(float, self.std)))
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise InputError(
                f"mean {self.mean} and std {self.std}; expected one value per channel, std > 0"
            )

    def __call__(self, images_01: jax.Array) -> jax.Array:
        return teacher_logits(self, images_01)

    def with_dtype(self, dtype: Any) -> Teacher:
        """The same teacher computing in `dtype` (its variables stay as they are, float32;
        logits are float32 either way): a bfloat16 teacher beside a float32 student."""
        fn = self.apply_fn
        if not isinstance(fn, _LogitsFn) or not hasattr(fn.model, "dtype"):
            raise InputError(f"this teacher ({type(fn).__name__}) has no compute dtype to change")
        model = fn.model.clone(dtype=jnp.dtype(dtype))
        return dataclasses.replace(self, apply_fn=_LogitsFn(model, fn.deit))

    @classmethod
    def from_resnet(
        cls,
        model: ResNet,
        variables: Any,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | tuple[int, int] | None = None,
    ) -> Teacher:
        """Wrap a trained `ResNet` (variables hold `params` and `batch_stats`)."""
        return cls(variables, _LogitsFn(model), mean, std, model.num_classes, image_size)

    @classmethod
    def from_deit(
        cls, model: nn.Module, variables: Any, mean: Sequence[float], std: Sequence[float]
    ) -> Teacher:
        """Wrap a trained DeiT; its logits are the mean of the two heads (`DeiTOutput.logits`)."""
        fn = _LogitsFn(model, deit=True)
        return cls(variables, fn, mean, std, model.num_classes, model.img_size)


def teacher_logits(teacher: Teacher, images_01: jax.Array) -> jax.Array:
    """Teacher logits `(B, K)` float32 for images in [0, 1] `(B, H, W, C)`.

    Pure: jit a step that takes `teacher` as an argument so its variables stay arguments.
    Nothing flows back: inputs and outputs are under `stop_gradient`.
    """
    if images_01.ndim != 4 or images_01.shape[-1] != len(teacher.mean):
        raise InputError(
            f"images have shape {tuple(images_01.shape)}; "
            f"expected (B, H, W, {len(teacher.mean)}) in [0, 1]"
        )
    variables = jax.lax.stop_gradient(teacher.variables)
    mean = jnp.asarray(teacher.mean, jnp.float32)
    std = jnp.asarray(teacher.std, jnp.float32)
    x = jax.lax.stop_gradient(images_01).astype(jnp.float32)
    if teacher.image_size is not None and tuple(x.shape[1:3]) != teacher.image_size:
        # A teacher trained at another resolution sees the same mixed images, resized.
        b, _, _, c = x.shape
        x = jax.image.resize(x, (b, *teacher.image_size, c), method="bilinear")
    x = (x - mean) / std
    return jax.lax.stop_gradient(teacher.apply_fn(variables, x).astype(jnp.float32))


def check_teacher(teacher: Teacher, num_classes: int) -> None:
    """Raise ValueError when the teacher's class count differs from the student's."""
    if teacher.num_classes != num_classes:
        raise InputError(
            f"teacher predicts {teacher.num_classes} classes but the student has {num_classes}; "
            "train or convert a teacher on the student's label set"
        )
