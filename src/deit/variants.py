"""The registry of DeiT variants under timm's names, with the preprocessing their weights expect
(`ModelSpec`; `Preprocessing`, the one description of how images become a model's input).

Sizes from the DeiT paper (Table 1) and timm's `deit.py`: Ti = 192 wide, 3 heads; S = 384, 6 heads;
B = 768, 12 heads; all 12 blocks deep with MLP ratio 4 and 16×16 patches. The `test_*` variants
are tiny models of the same family used by the test suite and the built-in data recipe.

DeiT III (Touvron et al. 2022, "DeiT III: Revenge of the ViT"; official `models_v2.py`, timm's
`deit3_*`): the same ViT with LayerScale in every block (`init_values`, timm's 1e-6), the position
embedding over the patches only (`no_embed_class`), one class token and one head. Sizes from
timm's `deit.py`: S 384/6, M 512/8, B 768/12 (12 blocks), L 1024/16 (24 blocks), H 1280/16 (32
blocks, 14×14 patches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deit.errors import InputError

if TYPE_CHECKING:
    import jax
    import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and eval preprocessing of one registered variant."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    distilled: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The official README's numbers use crop 0.875 at 224; the 384 models are evaluated uncropped.
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    init_values: float | None = None
    """DeiT III's LayerScale start value; None: no LayerScale (DeiT)."""
    no_embed_class: bool = False
    """DeiT III: the position embedding covers the patches only (timm's `no_embed_class`)."""


def _family(prefix: str, d: int, heads: int, size: int = 224) -> dict[str, ModelSpec]:
    crop = 0.875 if size == 224 else 1.0
    spec = ModelSpec(d, 12, heads, 4 * d, img_size=size, crop_pct=crop)
    return {
        f"deit_{prefix}_patch16_{size}": spec,
        f"deit_{prefix}_distilled_patch16_{size}": dataclasses.replace(spec, distilled=True),
    }


def _deit3(d: int, depth: int, heads: int, img: int, patch: int = 16) -> ModelSpec:
    """timm's `deit3_{size}_patch{patch}_{img}`; its 1k weights' eval crop (timm's
    `pretrained_cfg`: 0.9 at 224, 1.0 at 384; the 21k ones, 1.0, are `pretrained.Weights`')."""
    return ModelSpec(
        d,
        depth,
        heads,
        4 * d,
        patch_size=patch,
        img_size=img,
        crop_pct=0.9 if img == 224 else 1.0,
        init_values=1e-6,
        no_embed_class=True,
    )


DEIT3_VARIANTS: dict[str, ModelSpec] = {
    "deit3_small_patch16_224": _deit3(384, 12, 6, 224),
    "deit3_small_patch16_384": _deit3(384, 12, 6, 384),
    "deit3_medium_patch16_224": _deit3(512, 12, 8, 224),
    "deit3_base_patch16_224": _deit3(768, 12, 12, 224),
    "deit3_base_patch16_384": _deit3(768, 12, 12, 384),
    "deit3_large_patch16_224": _deit3(1024, 24, 16, 224),
    "deit3_large_patch16_384": _deit3(1024, 24, 16, 384),
    "deit3_huge_patch14_224": _deit3(1280, 32, 16, 224, patch=14),
    # A tiny DeiT III for tests.
    "deit3_test_patch4_32": ModelSpec(
        32,
        2,
        2,
        64,
        patch_size=4,
        img_size=32,
        num_classes=10,
        init_values=1e-6,
        no_embed_class=True,
    ),
}

VARIANTS: dict[str, ModelSpec] = {
    **_family("tiny", 192, 3),
    **_family("small", 384, 6),
    **_family("base", 768, 12),
    **_family("base", 768, 12, size=384),
    # Tiny members of the family for tests and the 32×32 built-in data set.
    "deit_test_patch4_32": ModelSpec(32, 2, 2, 64, patch_size=4, img_size=32, num_classes=10),
    "deit_test_distilled_patch4_32": ModelSpec(
        32, 2, 2, 64, patch_size=4, img_size=32, num_classes=10, distilled=True
    ),
    # The built-in data set's student: 8x8 digits upscaled to 16x16, one token per 2x2 pixels.
    "deit_digits_distilled_patch4_16": ModelSpec(
        96, 4, 3, 384, patch_size=4, img_size=16, num_classes=10, distilled=True
    ),
    # The same student with 8x8 patches, for small folders of 24-64 px images (the `small`
    # recipe): a 28-px image upsampled to 32 is 16 tokens, not 49 at patches of 4, so a step
    # costs about a third and a time budget buys three times the steps.
    "deit_digits_distilled_patch8_32": ModelSpec(
        96, 4, 3, 384, patch_size=8, img_size=32, num_classes=10, distilled=True
    ),
    # Their DeiT III counterparts (the `deit3-small` recipe): one class token, LayerScale, the
    # position embedding over the patches only.
    "deit3_digits_patch4_16": ModelSpec(
        96,
        4,
        3,
        384,
        patch_size=4,
        img_size=16,
        num_classes=10,
        init_values=1e-6,
        no_embed_class=True,
    ),
    "deit3_digits_patch8_32": ModelSpec(
        96,
        4,
        3,
        384,
        patch_size=8,
        img_size=32,
        num_classes=10,
        init_values=1e-6,
        no_embed_class=True,
    ),
    **DEIT3_VARIANTS,
}

ALIASES: dict[str, str] = {
    "tiny": "deit_tiny_patch16_224",
    "tiny-distilled": "deit_tiny_distilled_patch16_224",
    "small": "deit_small_patch16_224",
    "small-distilled": "deit_small_distilled_patch16_224",
    "base": "deit_base_patch16_224",
    "base-distilled": "deit_base_distilled_patch16_224",
    "base-384": "deit_base_patch16_384",
    "base-distilled-384": "deit_base_distilled_patch16_384",
}

REFERENCE_NAMES: tuple[str, ...] = tuple(
    n for n in VARIANTS if n.split("_")[1] not in ("test", "digits")
)


def resolve_name(name: str) -> str:
    """Canonical registry name for `name` or an alias; ValueError listing the choices otherwise."""
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        known = ", ".join([*VARIANTS, *ALIASES])
        raise InputError(f"unknown model {name!r}; expected one of: {known}")
    return name


def get_spec(name: str) -> ModelSpec:
    return VARIANTS[resolve_name(name)]


def variant_at(name: str | None, img_size: int) -> str:
    """The registered name of variant `name` at `img_size` (base 224 -> base 384), if any."""
    spec = VARIANTS.get(name or "")
    if spec is None:
        return name or "DeiT"
    keys = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "distilled")
    keys += ("init_values", "no_embed_class")
    same = [
        n
        for n, s in VARIANTS.items()
        if s.img_size == img_size and all(getattr(s, k) == getattr(spec, k) for k in keys)
    ]
    return same[0] if same else name


def model_size(model: Any) -> int | None:
    """A DeiT's input side; None for a model without a fixed size (a ResNet)."""
    size = getattr(model, "img_size", None)
    return size if size is None or isinstance(size, int) else int(size[0])


@dataclass(frozen=True)
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
            img_size=config.get("img_size") or model_size(model) or default.img_size,
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
        import numpy as np  # here, not at the top: a grain worker reading the registry skips it

        from deit.transforms import eval_transform

        return np.stack(
            [eval_transform(im, self.img_size, self.crop_pct, self.interpolation) for im in images]
        )

    def normalize(self, batch: np.ndarray | jax.Array) -> jax.Array:
        """A uint8 batch of crops `(B, S, S, 3)` -> the float32 model input, on the device:
        `augment.normalize`'s arithmetic, written out because augment reads this registry's
        ImageNet defaults (importing it here would close an import circle); tests/test_evaluate
        checks the two agree."""
        import jax.numpy as jnp  # here: importing the registry must not start JAX

        x = jnp.asarray(batch).astype(jnp.float32) / 255.0
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

    def inputs(self, images: Sequence[np.ndarray]) -> jax.Array:
        """Decoded uint8 images -> the model input `(B, S, S, 3)`: `normalize(crop(images))`."""
        return self.normalize(self.crop(images))
