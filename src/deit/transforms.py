"""Moved to `deit.data.host` (decode, crops, flips, the train and eval transforms) and
`deit.data.randaugment` (RandAugment); this module re-exports them for one release."""

from deit.data.host import (
    DCT_SCALES,
    IMAGENET_FILL,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugment,
    dct_scale,
    decode_image,
    eval_transform,
    hflip,
    random_resized_crop,
    random_resized_crop_box,
    train_transform,
    train_transform_encoded,
)

__all__ = [
    "DCT_SCALES",
    "IMAGENET_FILL",
    "RAND_INCREASING_TRANSFORMS",
    "RAND_TRANSFORMS",
    "RandAugment",
    "dct_scale",
    "decode_image",
    "eval_transform",
    "hflip",
    "random_resized_crop",
    "random_resized_crop_box",
    "train_transform",
    "train_transform_encoded",
]
