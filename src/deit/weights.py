"""The pretrained-weights registry: every checkpoint this package knows by name, as data.

`PRETRAINED` holds the eight official DeiT checkpoints (the official README's top-1 / top-5, the
file name's hash prefix that a download is checked by) and the sixteen DeiT III ones
(README_revenge.md's top-1; the Hub's timm copies, their official files carrying no hash).
`TEACHER_WEIGHTS` holds the CNN teachers: the paper's RegNetY-16GF and torchvision's ResNets.
`weights(name)` looks a name up. Downloading, converting and caching them is `deit.pretrained`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from deit.errors import InputError
from deit.variants import Preprocessing

Source = Literal["official", "hf", "timm"]
SOURCES: tuple[str, ...] = ("official", "hf", "timm")
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/deit/"


@dataclass(frozen=True)
class Weights:
    """One official checkpoint: its file, Hub repositories and the official README's ImageNet-1k
    val accuracy (top-1 / top-5 %, at the registry's eval crop: 0.875 at 224, 1.0 at 384)."""

    name: str
    file: str
    top1: float | None
    top5: float | None
    url_base: str = OFFICIAL_URL
    hub_tag: str = "fb_in1k"
    """The timm Hub repository's tag: `timm/<variant>.<hub_tag>`."""
    crop_pct: float | None = None
    """The eval crop when it is not the variant's (`variants.ModelSpec.crop_pct`)."""
    preprocessing: Preprocessing | None = None
    """The weights' own evaluation preprocessing where the variant registry does not give it
    (the CNN teachers)."""

    @property
    def url(self) -> str:
        return self.url_base + self.file

    @property
    def variant(self) -> str:
        """The registered network: the name without a timm tag (`deit3_base_patch16_224`)."""
        return self.name.partition(".")[0]

    @property
    def pinned(self) -> bool:
        """Whether the official file's name carries a hash prefix a download is checked by."""
        return re.search(r"-([0-9a-f]{6,})\.", self.file) is not None

    @property
    def default_source(self) -> Source:
        """The official file where its hash is known, else the Hub's timm copy."""
        return "official" if self.pinned else "timm"

    @property
    def sha256_prefix(self) -> str:
        """The hex digits after the last `-` of the file name (torch.hub's `check_hash` rule)."""
        found = re.search(r"-([0-9a-f]{6,})\.", self.file)
        if not found:
            raise InputError(f"{self.file} carries no hash prefix; expected NAME-<hex>.pth")
        return found[1]

    @property
    def hf_repo(self) -> str:
        return "facebook/" + self.name.replace("_", "-")

    @property
    def timm_repo(self) -> str:
        return f"timm/{self.variant}.{self.hub_tag}"


PRETRAINED: dict[str, Weights] = {
    w.name: w
    for w in (
        Weights("deit_tiny_patch16_224", "deit_tiny_patch16_224-a1311bcf.pth", 72.2, 91.1),
        Weights("deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth", 79.9, 95.0),
        Weights("deit_base_patch16_224", "deit_base_patch16_224-b5f2ef4d.pth", 81.8, 95.6),
        Weights(
            "deit_tiny_distilled_patch16_224",
            "deit_tiny_distilled_patch16_224-b40b3cf7.pth",
            74.5,
            91.9,
        ),
        Weights(
            "deit_small_distilled_patch16_224",
            "deit_small_distilled_patch16_224-649709d9.pth",
            81.2,
            95.4,
        ),
        Weights(
            "deit_base_distilled_patch16_224",
            "deit_base_distilled_patch16_224-df68dfff.pth",
            83.4,
            96.5,
        ),
        Weights("deit_base_patch16_384", "deit_base_patch16_384-8de9b5d1.pth", 82.9, 96.2),
        Weights(
            "deit_base_distilled_patch16_384",
            "deit_base_distilled_patch16_384-d0272ac0.pth",
            85.2,
            97.2,
        ),
    )
}


def _deit3(
    size: str, img: int, top1_1k: float | None, top1_21k: float | None
) -> tuple[Weights, ...]:
    """DeiT III's 1k and 21k -> 1k weights of one size (README_revenge.md's top-1; no top-5
    published); timm's `pretrained_cfg` evaluates the 1k ones at crop 0.9 at 224 (the
    variant's), the 21k ones at 1.0."""
    patch = 14 if size == "huge" else 16
    name = f"deit3_{size}_patch{patch}_{img}"
    v1 = "_v1" if size == "huge" else ""  # the official name of the 21k huge file
    return (
        Weights(name, f"deit_3_{size}_{img}_1k.pth", top1_1k, None),
        Weights(
            f"{name}.fb_in22k_ft_in1k",
            f"deit_3_{size}_{img}_21k{v1}.pth",
            top1_21k,
            None,
            hub_tag="fb_in22k_ft_in1k",
            crop_pct=1.0,
        ),
    )


# The medium model is in timm and on the Hub but not in README_revenge.md: no official top-1.
DEIT3_PRETRAINED: dict[str, Weights] = {
    w.name: w
    for w in (
        *_deit3("small", 224, 81.4, 83.1),
        *_deit3("small", 384, 83.4, 84.8),
        *_deit3("medium", 224, None, None),
        *_deit3("base", 224, 83.8, 85.7),
        *_deit3("base", 384, 85.0, 86.7),
        *_deit3("large", 224, 84.9, 87.0),
        *_deit3("large", 384, 85.8, 87.7),
        *_deit3("huge", 224, 85.2, 87.2),
    )
}
PRETRAINED.update(DEIT3_PRETRAINED)


# The paper's teacher (DeiT §5.2): timm's `regnety_160` as the DeiT authors trained it, 82.9%
# top-1 at 224 (the official README gives no top-5). Converted by `deit.regnet_convert`; the Hub
# holds it in timm's layout only (`timm/regnety_160.deit_in1k`).
# torchvision's ResNets (`deit.teacher.TEACHERS`, converted by `deit.resnet_convert`), with its
# published accuracy and evaluation transform (resize 256 -> crop 224, bilinear; resnet50's V2
# weights resize to 232). `@timm` takes the Hub's copy of the same file (`tv_in1k`, `tv2_in1k`);
# timm's own ResNet checkpoints (`a1_in1k`, ...) share the layout and load as files or URLs.
TORCHVISION_URL = "https://download.pytorch.org/models/"
TEACHER_WEIGHTS: dict[str, Weights] = {
    "regnety_160": Weights(
        "regnety_160", "regnety_160-a5fe301d.pth", 82.9, None, hub_tag="deit_in1k"
    ),
    "resnet18": Weights(
        "resnet18",
        "resnet18-f37072fd.pth",
        69.758,
        89.078,
        url_base=TORCHVISION_URL,
        hub_tag="tv_in1k",
        preprocessing=Preprocessing(224, crop_pct=0.875, interpolation="bilinear"),
    ),
    "resnet50": Weights(
        "resnet50",
        "resnet50-11ad3fa6.pth",
        80.858,
        95.434,
        url_base=TORCHVISION_URL,
        hub_tag="tv2_in1k",
        preprocessing=Preprocessing(224, crop_pct=224 / 232, interpolation="bilinear"),
    ),
}


def weights(name: str) -> Weights:
    if name in TEACHER_WEIGHTS:
        return TEACHER_WEIGHTS[name]
    if name not in PRETRAINED:
        import difflib

        names = [*PRETRAINED, *TEACHER_WEIGHTS]
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(
            f"no pretrained weights named {name!r}; {hint}expected one of {', '.join(names)}"
        )
    return PRETRAINED[name]
