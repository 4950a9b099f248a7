"""The DeiT III recipes (Touvron, Cord, Jégou 2022, "DeiT III: Revenge of the ViT"), as
facebookresearch/deit's README_revenge.md gives their commands: `deit3` (ImageNet-1k), `deit3-ft`
(its fine-tune at 224, S at 384), `deit3-21k` (ImageNet-21k) and `deit3-21k-ft` (21k -> 1k).
Each is sized from the model it trains (`deit3_size`); `recipes.RECIPES` lists them.
"""

from __future__ import annotations

from dataclasses import replace

from deit.augment import ErasingConfig, MixupConfig
from deit.configs import ModelConfig, TrainConfig
from deit.data import DataConfig
from deit.losses import LossConfig
from deit.optim import REFERENCE_BATCH, OptimConfig

# DeiT III (Touvron, Cord, Jégou 2022), facebookresearch/deit README_revenge.md's commands: every
# global batch there is 2048 for pretraining (S/B: --batch 256 x 8 GPUs; L/H: 64 x 32) and 512
# for the 1k fine-tune (B/L: 64 x 8; H: 32 x 16), and `--unscale-lr` makes `--lr` the peak lr at
# that batch. Here it is `base_lr` per 512 (the project's `lr x batch / 512` rule: the same lr at
# the official batch, scaled linearly at another).
DEIT3_SIZES = ("small", "base", "large", "huge")
DEIT3_MODELS = {
    "small": "deit3_small_patch16_224",
    "base": "deit3_base_patch16_224",
    "large": "deit3_large_patch16_224",
    "huge": "deit3_huge_patch14_224",
}
DEIT3_BATCH, DEIT3_FT_BATCH = 2048, 512
# size: (peak lr at batch 2048, uniform drop path, training side)
DEIT3_1K = {
    "small": (4e-3, 0.05, 224),
    "base": (3e-3, 0.2, 192),
    "large": (3e-3, 0.45, 192),
    "huge": (3e-3, 0.6, 160),
}
# size: (drop path, side) of the fine-tune at lr 1e-5 (batch 512): B/L/H at 224, S at 384.
DEIT3_FT = {"small": (0.0, 384), "base": (0.2, 224), "large": (0.45, 224), "huge": (0.55, 224)}
# ImageNet-21k: size: (drop path, epochs, side) at lr 1e-3 (batch 2048); then the 1k fine-tune
# at lr 3e-4 with its own drop path.
DEIT3_21K = {
    "small": (0.05, 240, 224),
    "base": (0.1, 240, 224),
    "large": (0.3, 240, 224),
    "huge": (0.5, 90, 128),
}
DEIT3_21K_FT = {"small": 0.05, "base": 0.15, "large": 0.4, "huge": 0.45}


def deit3_size(model: str) -> str:
    """The README_revenge.md size whose constants `model` takes: small, base, large or huge by
    name; any other model (medium, which has no command there, or a test variant) small's."""
    return next((s for s in DEIT3_SIZES if f"_{s}_" in model), "small")


def _per_512(lr: float, batch: int) -> float:
    return lr * REFERENCE_BATCH / batch


def _deit3_common(name: str, recipe_name: str, model: str, drop_path: float) -> TrainConfig:
    """What every DeiT III stage shares: the LAMB stages' settings (README_revenge.md's
    `--opt fusedlamb --weight-decay ... --sched cosine --warmup-epochs 5 --warmup-lr 1e-6
    --reprob 0.0 --drop 0.0 --cutmix 1.0 --color-jitter 0.3 --ThreeAugment`), no distillation
    (DeiT III §3 trains without a teacher; its ViT has no distillation token)."""
    return TrainConfig(
        recipe=recipe_name,
        model=ModelConfig(name=model, drop_path_rate=drop_path, drop_path_schedule="uniform"),
        batch_size=DEIT3_BATCH,
        output=f"runs/{name}",
        loss=LossConfig(distillation="none"),
        data=DataConfig(randaugment=None, three_augment=True, color_jitter=0.3),
        # FusedLAMB (`--opt fusedlamb`) clips the global gradient norm at 1.0 (max_grad_norm)
        optim=OptimConfig(opt="lamb", clip_grad_norm=1.0, warmup_epochs=5, warmup_lr=1e-6),
        erasing=ErasingConfig(prob=0.0),
    )


def deit3(model: str | None = None) -> TrainConfig:
    """DeiT III on ImageNet-1k (Touvron, Cord, Jégou 2022; README_revenge.md "Training on
    ImageNet-1k"). Expected top-1 at 224 after the fine-tune stage: S 81.4, B 83.8, L 84.9,
    H 85.2 (README_revenge.md's table). The size comes from `--model` (default S):

        deit train --recipe deit3 --data /data/imagenet --model deit3_base_patch16_224
        deit train --recipe deit3-ft --finetune runs/deit3/final --data /data/imagenet

    - Model: `deit3_*` (LayerScale, no distillation token), uniform stochastic depth (the same
      rate in every block, official `models_v2.py`): S 0.05, B 0.2, L 0.45, H 0.6 (`--drop-path`).
    - LAMB (`--opt fusedlamb`, gradient norm clipped at 1.0 as FusedLAMB does), peak lr 4e-3 (S)
      or 3e-3 (B/L/H) at global batch 2048 (`--lr ... --unscale-lr`, `--batch 256` x 8 GPUs or
      64 x 32): `base_lr` 1e-3 / 7.5e-4 per 512; weight decay 0.05; 800 epochs, 5 warm-up from
      1e-6 (`--warmup-lr`), cosine to 1e-5 (main.py's `--min-lr`).
    - Binary cross-entropy on the mixed targets binarised at > 0 (`--bce-loss`), no label
      smoothing (`--smoothing 0.0`); mixup 0.8, cutmix 1.0 (`--mixup .8 --cutmix 1.0`).
    - 3-Augment (`--ThreeAugment`, `--color-jitter 0.3`) after the random-resized crop, no
      RandAugment, no random erasing (`--reprob 0.0`); repeated augmentation (`--repeated-aug`).
    - Side: S at 224; B and L at 192, H at 160 (`--input-size`), then `deit3-ft` at 224.
    - Weight EMA as main.py's default (on, 0.99996); evaluation crop 0.875 (`--eval-crop-ratio`).
    """
    model = model or DEIT3_MODELS["small"]
    size = deit3_size(model)
    lr, drop_path, side = DEIT3_1K[size]
    base = _deit3_common("deit3", "deit3", model, drop_path)
    return replace(
        base,
        loss=replace(base.loss, bce=True),
        data=replace(base.data, img_size=side, repeats=3),
        optim=replace(base.optim, base_lr=_per_512(lr, DEIT3_BATCH), weight_decay=0.05, epochs=800),
        mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0),
    )


def deit3_ft(model: str | None = None) -> TrainConfig:
    """DeiT III's fine-tune after `deit3` (README_revenge.md "finetuning for ViT-B, L and H at
    resolution 224x224" and "finetuning for ViT-S at resolution 384x384"): B/L/H trained at
    192/160 are fine-tuned at 224, S (trained at 224) at 384. Start it from the trained run:

        deit train --recipe deit3-ft --finetune runs/deit3/final --data /data/imagenet

    The size comes from the checkpoint's model (or `--model` without `--finetune`; default S).
    AdamW (`--opt adamw`), lr 1e-5 at global batch 512 (`--unscale-lr`, `--batch 64` x 8 GPUs;
    H 32 x 16): `base_lr` 1e-5; weight decay 0.1; 20 epochs, 5 warm-up from 1e-6; soft-target
    cross-entropy with label smoothing 0.1 (`--smoothing 0.1`, no `--bce-loss`); mixup 0.8,
    cutmix 1.0; RandAugment `rand-m9-mstd0.5-inc1` (`--aa`) instead of 3-Augment, no erasing, no
    repeated augmentation (`--no-repeated-aug`); uniform stochastic depth B 0.2, L 0.45, H 0.55,
    S 0.0 (`--drop-path`). S's 384 model is `deit3_small_patch16_384`.
    """
    model = model or DEIT3_MODELS["small"]
    size = deit3_size(model)
    drop_path, side = DEIT3_FT[size]
    if size == "small" and model == DEIT3_MODELS["small"]:
        model = "deit3_small_patch16_384"
    base = _deit3_common("deit3-ft", "deit3-ft", model, drop_path)
    return replace(
        base,
        batch_size=DEIT3_FT_BATCH,
        data=DataConfig(img_size=side, repeats=1),
        optim=OptimConfig(
            opt="adamw",
            base_lr=_per_512(1e-5, DEIT3_FT_BATCH),
            weight_decay=0.1,
            epochs=20,
            warmup_epochs=5,
            warmup_lr=1e-6,
        ),
        mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
    )


def deit3_21k(model: str | None = None) -> TrainConfig:
    """DeiT III pretraining on ImageNet-21k (README_revenge.md "Training on ImageNet-21k"),
    before `deit3-21k-ft`; with it, top-1 on ImageNet-1k at 224: S 83.1, B 85.7, L 87.0, H 87.2.

        deit train --recipe deit3-21k --data /data/imagenet21k --model deit3_base_patch16_224

    LAMB (gradient norm clipped at 1.0), lr 1e-3 at global batch 2048 (`base_lr` 2.5e-4; the
    README adds that batch 4096 trains at 1.5e-3, where this linear rule gives 2e-3: pass
    `--lr 0.0015 --unscale-lr` there), weight decay 0.02; 240 epochs at 224 (H: 90 at 128), 5
    warm-up; soft-target cross-entropy with smoothing 0.1 (no `--bce-loss`); cutmix 1.0 only
    (`--mixup 0`); 3-Augment after the simple random crop (`--ThreeAugment --src`), colour
    jitter 0.3; no repeated augmentation, no erasing; uniform stochastic depth S 0.05, B 0.1,
    L 0.3, H 0.5.
    """
    model = model or DEIT3_MODELS["small"]
    drop_path, epochs, side = DEIT3_21K[deit3_size(model)]
    base = _deit3_common("deit3-21k", "deit3-21k", model, drop_path)
    return replace(
        base,
        data=replace(base.data, img_size=side, src=True, repeats=1),
        optim=replace(
            base.optim, base_lr=_per_512(1e-3, DEIT3_BATCH), weight_decay=0.02, epochs=epochs
        ),
        mixup=MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1),
    )


def deit3_21k_ft(model: str | None = None) -> TrainConfig:
    """DeiT III's ImageNet-1k fine-tune of a 21k-pretrained model (README_revenge.md
    "finetuning on ImageNet-1k"): `deit3-21k` with lr 3e-4 at batch 2048 (`base_lr` 7.5e-5), 50
    epochs at 224 and uniform stochastic depth S 0.05, B 0.15, L 0.4, H 0.45; the rest as there
    (LAMB, weight decay 0.02, smoothing 0.1, cutmix only, 3-Augment with the simple random crop).

        deit train --recipe deit3-21k-ft --finetune runs/deit3-21k/final --data /data/imagenet
    """
    model = model or DEIT3_MODELS["small"]
    pre = deit3_21k(model)
    return replace(
        pre,
        recipe="deit3-21k-ft",
        output="runs/deit3-21k-ft",
        model=replace(pre.model, drop_path_rate=DEIT3_21K_FT[deit3_size(model)]),
        data=replace(pre.data, img_size=224),
        optim=replace(pre.optim, base_lr=_per_512(3e-4, DEIT3_BATCH), epochs=50),
    )
