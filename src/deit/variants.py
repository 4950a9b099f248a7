"""The registry of DeiT variants under timm's names, with the preprocessing their weights expect.

Sizes from the DeiT paper (Table 1) and timm's `deit.py`: Ti = 192 wide, 3 heads; S = 384, 6 heads;
B = 768, 12 heads; all 12 blocks deep with MLP ratio 4 and 16×16 patches. The `test_*` variants
are tiny models of the same family used by the test suite and the built-in data recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deit.errors import InputError

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


def _family(prefix: str, d: int, heads: int, size: int = 224) -> dict[str, ModelSpec]:
    crop = 0.875 if size == 224 else 1.0
    spec = ModelSpec(d, 12, heads, 4 * d, img_size=size, crop_pct=crop)
    return {
        f"deit_{prefix}_patch16_{size}": spec,
        f"deit_{prefix}_distilled_patch16_{size}": dataclasses.replace(spec, distilled=True),
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
