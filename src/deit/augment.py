"""Moved to `deit.data.device` (batch ops inside the jitted step); re-exported for one release."""

from deit.data.device import (
    ERASE_ATTEMPTS,
    ERASING_MODES,
    ErasingConfig,
    MixupConfig,
    cutmix_box,
    mix_with_lambda,
    mixup_cutmix,
    normalize,
    random_erasing,
    smooth_one_hot,
)

__all__ = [
    "ERASE_ATTEMPTS",
    "ERASING_MODES",
    "ErasingConfig",
    "MixupConfig",
    "cutmix_box",
    "mix_with_lambda",
    "mixup_cutmix",
    "normalize",
    "random_erasing",
    "smooth_one_hot",
]
