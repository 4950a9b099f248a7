"""The named recipes: each a whole `configs.TrainConfig` that says what it reproduces, with the
command and the accuracy to expect in its docstring. `deit train --recipe NAME` starts from one
(`cli_train` picks a default from the data), then a config file and flags change single fields.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from deit import budget as budget_lib
from deit.augment import ErasingConfig, MixupConfig
from deit.configs import ConfigError, ModelConfig, TeacherConfig, TrainConfig
from deit.configs import from_dict as _from_dict
from deit.data import DataConfig
from deit.data.survey import DIGITS, SMALL_SIDE, DataSurvey
from deit.losses import LossConfig
from deit.optim import EmaConfig, OptimConfig
from deit.recipes_deit3 import deit3, deit3_21k, deit3_21k_ft, deit3_ft
from deit.variants import get_spec


def imagenet() -> TrainConfig:
    """The paper's ImageNet-1k recipe (DeiT §6, Table 9; official `main.py` defaults), distilled
    from a CNN with hard distillation. The paper's headline run, DeiT-S⚗ hard-distilled from the
    RegNetY-16GF for 300 epochs at global batch 1024 (lr 5e-4 x 1024 / 512), expects 81.2% top-1
    (the official README; the same command with the Ti / B distilled models: 74.5 / 83.4):

        deit train --recipe imagenet --data /data/imagenet \\
            --model deit_small_distilled_patch16_224 --teacher regnety_160

    `--teacher regnety_160` is the official teacher (regnety_160-a5fe301d.pth, 82.9% top-1),
    downloaded once, checked against its SHA-256 prefix and converted once into $DEIT_HOME;
    `regnety_160@timm` takes the Hub copy, and the official `--teacher-model regnety_160
    --teacher-path URL_OR_FILE` works as well. Its bf16 forward speed: docs/teacher.md.
    """
    return TrainConfig(recipe="imagenet", data=DataConfig(img_size=224))


def digits() -> TrainConfig:
    """The built-in set (scikit-learn's 8x8 digits upscaled to 16x16): what `deit train` runs.

        deit train            # = deit train --recipe digits --output runs/digits

    A small DeiT (`deit_digits_distilled_patch4_16`: 96 wide, 4 blocks, one token per 2x2
    original pixels) hard-distilled from a ResNet-8 teacher that the same command trains first
    (30 epochs, ~97-98% top-1). Changes to the paper's recipe, sized for 1,437 tiny grey images
    on 2 CPU cores: no horizontal flip (digits are not mirror symmetric); crops of 35-100% of the
    area; RandAugment at magnitude 5 instead of 9 (at 9 rotations and shears turn some 8x8 digits
    into others); no repeated augmentation (it thins an already small epoch); mixup/cutmix on 30%
    of the batches; random erasing p 0.1; batch 128 at lr 2e-3 (a fixed lr: the /512 scaling rule
    gives a ViT far too small a step on 11 steps per epoch); 90 epochs, 3 warm-up; a constant EMA
    decay of 0.99 (a window of ~100 of the run's 990 steps; the reference 0.99996 would average
    over 25x more steps than the run has). Expect ~97% top-1 for the averaged heads in under 5
    minutes on 2 cores (see the README).
    """
    data = DataConfig(
        dataset="digits",
        img_size=16,
        scale=(0.35, 1.0),
        hflip=0.0,
        randaugment="rand-m5-mstd0.5-inc1",
        crop_pct=1.0,
        repeats=1,
        workers=0,  # 16x16 crops of in-memory arrays: a worker's start-up costs more than it saves
    )
    return TrainConfig(
        recipe="digits",
        model=ModelConfig(name="deit_digits_distilled_patch4_16", drop_path_rate=0.05),
        batch_size=128,
        output="runs/digits",
        loss=LossConfig(distillation="hard"),
        data=data,
        optim=OptimConfig(lr=2e-3, warmup_epochs=3, epochs=90, min_lr=1e-5),
        ema=EmaConfig(decay=0.99),
        mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.3),
        erasing=ErasingConfig(prob=0.1),
        teacher=TeacherConfig(
            arch="resnet8",
            optim=OptimConfig(lr=1e-2, warmup_epochs=1, epochs=30, weight_decay=0.05),
            ema=EmaConfig(enabled=False),
            mixup=MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0),
        ),
        log_every=10,
        checkpoint_every=200,
    )


# The `small` recipe's sizing. Epochs are set by the time budget (SMALL_BUDGET by default) from
# each phase's measured first epoch; the epochs below are only their ceilings, and what a run
# without a budget (`--time-budget None`) trains. SMALL_RATE (student images/s at 16 px on 2
# CPU cores, teacher included) scaled by the model's work per image estimates the steps a
# budget buys, for the EMA window and the log interval.
SMALL_BUDGET = "15m"
SMALL_RATE = 600.0
SMALL_EPOCHS = (10, 300)  # ceiling of the student's epochs: 10-300
SMALL_TEACHER_EPOCHS = 150  # ceiling of the teacher's
SMALL_MAX_BATCH = 128
# The student below SMALL_SIDE px: no RandAugment, mixup/cutmix or label smoothing, and a lighter
# weight decay. On a few thousand small images in minutes it is short of steps, not over-fitting
# (docs/small_recipe.md), and the teacher's hard labels already regularise it.
SMALL_WEIGHT_DECAY = 0.01
TINY_MODEL, TINY_PATCH, TINY_SIDES = "deit_digits_distilled_patch4_16", 4, (16, 20)
MINI_MODEL, MINI_PATCH, MINI_SIDES = "deit_digits_distilled_patch8_32", 8, (24, 64)
LARGE_MODEL, LARGE_PATCH, LARGE_SIDES = "deit_tiny_distilled_patch16_224", 16, (112, 224)


def _work(embed_dim: int, depth: int, tokens: int) -> float:
    return embed_dim**2 * depth * tokens


def small_batch(train_images: int) -> int:
    """The largest power of two up to 1/32 of the training images (at least 32 steps per epoch:
    a few thousand images need steps more than wide batches), but not below a quarter of a
    tiny set's 16, and at most `SMALL_MAX_BATCH`."""
    n = max(1, train_images)
    want = max(n // 32, min(16, n // 4), 1)
    return min(SMALL_MAX_BATCH, 2 ** int(math.log2(want)))


def small(survey: DataSurvey = DIGITS) -> TrainConfig:
    """A folder of few or small images (`deit train --data FOLDER` picks it below 10,000
    training images or a shorter side below 112 px): everything chosen from `survey`
    (`data.survey`: image count, side, channels, class balance), within a time budget of 15
    minutes for the teacher and the student together.

        deit train --data /data/my_small_set      # = --recipe small --time-budget 15m

    - Model and image size: the images' median shorter side rounded to the patch: the digits
      student (96 wide, 4 blocks) with patches of 4 within 16-20 px for sides below 22 px, with
      patches of 8 within 24-64 px up to 111 px (a 28-px image at 32 is 16 tokens), else
      DeiT-Ti with patches of 16 within 112-224 px: the patch grid always divides the image.
    - Batch (`small_batch`): a power of two near 1/32 of the training images, at most 128; a
      fixed lr of 2e-3 x sqrt(batch / 128) (Adam's square-root rule from the digits recipe's
      2e-3 at 128), 2 warm-up epochs.
    - Epochs: sized by `time_budget` (15m) after each phase's first epoch (`deit.budget`):
      the ResNet-8 teacher gets up to a third and stops earlier once its validation top-1
      levels off; the student the rest. A constant EMA decay with a window of about a tenth of
      the steps the budget buys.
    - Augmentation, light for small images (a few minutes of training on a few thousand images
      underfits long before it overfits): below 112 px crops of 60-100% of the area and nothing
      else for the student: no RandAugment, mixup/cutmix, label smoothing, random erasing or
      stochastic depth, weight decay `SMALL_WEIGHT_DECAY` (0.01; the teacher's hard labels on
      its crops regularise it); no repeated augmentation; horizontal flips only for colour
      images (a grey folder is most often characters or symbols, which a mirror changes);
      evaluation on the whole image below 112 px. From 112 px the digits recipe's RandAugment,
      mixup/cutmix, erasing and weight decay 0.05.

    Measured with `bench/small_suite.py` at the default 15m budget, on one core of an AMD EPYC
    per run, two sets side by side (`bench/results/small_suite.md`, README "Your own folder");
    fitted on the other sets, shapes40c held out; what was tried: docs/small_recipe.md:

        set                    teacher  student (avg heads)  epochs t / s  time
        digits16 (16 px grey)  99.4%    98.5%                55 / 231      14.3 min
        digits28 (28 px grey)  99.5%    97.6%                25 / 72       14.9 min
        shapes28 (28 px grey)  100.0%   95.1%                16 / 83       14.8 min
        textures64c (colour)   98.3%    98.2%                37 / 54       14.6 min
        digits48c (colour)     93.1%    79.7%                27 / 37       14.9 min
        shapes40c (held out)   97.9%    83.8%                30 / 62       14.8 min

    On both cores, one run at a time (`bench/results/small_suite_2core.md`):

        digits48c (colour)     95.2%    89.8%                30 / 61       14.9 min
        shapes40c (held out)   98.9%    91.8%                31 / 109      14.2 min
    """
    tiny = survey.side < SMALL_SIDE
    name, patch, (lo, hi) = (
        (LARGE_MODEL, LARGE_PATCH, LARGE_SIDES)
        if not tiny
        else (MINI_MODEL, MINI_PATCH, MINI_SIDES)
        if survey.side >= 22
        else (TINY_MODEL, TINY_PATCH, TINY_SIDES)
    )
    img = min(hi, max(lo, patch * round(survey.side / patch)))
    spec = get_spec(name)
    tokens = (img // patch) ** 2 + 2
    rate = SMALL_RATE * _work(96, 4, 18) / _work(spec.embed_dim, spec.depth, tokens)
    n = max(1, survey.train_images)
    batch = small_batch(n)
    _, student_seconds = budget_lib.split(budget_lib.parse_duration(SMALL_BUDGET))
    expected = min(SMALL_EPOCHS[1], max(SMALL_EPOCHS[0], round(student_seconds * rate / n)))
    steps = expected * max(1, n // batch)
    base = digits()
    data = replace(
        base.data,
        dataset=survey.dataset,
        img_size=img,
        scale=(0.6, 1.0) if tiny else (0.35, 1.0),
        randaugment=None if tiny else base.data.randaugment,
        hflip=0.0 if survey.channels == 1 else 0.5,
        crop_pct=1.0 if tiny else 0.875,
        workers=0 if survey.dataset == "digits" else None,
    )
    lr = 2e-3 * math.sqrt(batch / 128)
    return replace(
        base,
        recipe="small",
        output="runs/small",
        time_budget=SMALL_BUDGET,
        model=ModelConfig(name=name, drop_path_rate=0.0 if tiny else 0.1),
        batch_size=batch,
        data=data,
        optim=OptimConfig(
            lr=lr,
            warmup_epochs=2,
            epochs=SMALL_EPOCHS[1],
            weight_decay=SMALL_WEIGHT_DECAY if tiny else OptimConfig.weight_decay,
        ),
        ema=EmaConfig(decay=min(0.9999, max(0.9, 1 - 10 / steps))),
        mixup=replace(base.mixup, prob=0.0, label_smoothing=0.0) if tiny else base.mixup,
        erasing=ErasingConfig(prob=0.0 if tiny else base.erasing.prob),
        teacher=replace(
            base.teacher,
            optim=replace(
                base.teacher.optim,
                lr=1e-2 * math.sqrt(batch / 128),
                epochs=SMALL_TEACHER_EPOCHS,
            ),
        ),
        log_every=max(1, min(50, steps // 20)),
    )


# `small`'s models -> their DeiT III counterparts (one class token, LayerScale, patch-only
# position embedding; `variants.py`). DeiT III has no Ti: images of 112 px and more take its S
# (4x DeiT-Ti's work per image, so fewer epochs in the same budget).
SMALL_DEIT3 = {
    TINY_MODEL: "deit3_digits_patch4_16",
    MINI_MODEL: "deit3_digits_patch8_32",
    LARGE_MODEL: "deit3_small_patch16_224",
}
DEIT3_SMALL_MIXUP_PROB = 0.1  # share of mixed batches below 112 px
DEIT3_SMALL_LR = 1e-2  # LAMB's peak lr at batch 128 (docs/deit3.md), x sqrt(batch / 128)


def deit3_small(survey: DataSurvey = DIGITS) -> TrainConfig:
    """`small`'s counterpart with DeiT III's recipe (`recipes_deit3.deit3`), for a folder of few
    or small images or the built-in digits; the same budget (15 minutes), model size, image side,
    batch, crops, flips and mixup/cutmix share as `small` picks from `survey`, and what DeiT III
    changes:

        deit train --recipe deit3-small                  # the built-in digits
        deit train --recipe deit3-small --data /data/my_small_set

    - The DeiT III counterpart of `small`'s model (`SMALL_DEIT3`: no distillation token,
      LayerScale 1e-6; DeiT III S for images of 112 px and more, as there is no DeiT III Ti),
      uniform stochastic depth 0.05 (DeiT III S's), no teacher: the whole budget trains the
      student.
    - LAMB (gradient norm clipped at 1.0), weight decay 0.05, lr `DEIT3_SMALL_LR` x sqrt(batch /
      128), 2 warm-up epochs (small's).
    - Binary cross-entropy, no label smoothing; 3-Augment (colour jitter 0.3) instead of
      RandAugment; no erasing.

    What it reached against `small` in the same budget: docs/deit3.md.
    """
    base = small(survey)
    return replace(
        base,
        recipe="deit3-small",
        output="runs/deit3-small",
        model=ModelConfig(
            name=SMALL_DEIT3[base.model.name], drop_path_rate=0.05, drop_path_schedule="uniform"
        ),
        loss=LossConfig(distillation="none", bce=True),
        data=replace(base.data, randaugment=None, three_augment=True, color_jitter=0.3),
        optim=OptimConfig(
            opt="lamb",
            lr=DEIT3_SMALL_LR * math.sqrt(base.batch_size / 128),
            weight_decay=0.05,
            clip_grad_norm=1.0,
            warmup_epochs=2,
            epochs=SMALL_EPOCHS[1],
        ),
        # DeiT III's regularisation is its own (3-Augment, BCE), so it keeps the mixup/cutmix
        # share that `small` had before its student dropped them: 10% of batches below 112 px.
        mixup=replace(
            base.mixup,
            prob=DEIT3_SMALL_MIXUP_PROB if survey.side < SMALL_SIDE else base.mixup.prob,
            label_smoothing=0.0,
        ),
        erasing=ErasingConfig(prob=0.0),
    )


def finetune() -> TrainConfig:
    """Transfer of a pretrained model to a small data set (`deit train --finetune CKPT`): the
    maintainers' settings for CIFAR-10 and Stanford Cars (facebookresearch/deit issue #45). SGD
    (momentum 0.9), lr 0.01 scaled by the official rule `x global batch / 512` (0.015 at the
    batch of 768), weight decay 1e-4, 1000 epochs, images at 224 (or 384: the patch size stays),
    no random erasing, no stochastic depth; the rest as on ImageNet (RandAugment, mixup/cutmix,
    label smoothing, repeated augmentation, 5 warm-up epochs). The paper (Table 7) reports 99.1
    top-1 on CIFAR-10 and 90.8 on CIFAR-100 for DeiT-B transferred this way.

        deit train --finetune deit_base_224/ --data /data/cifar10 --img-size 224

    The network and its normalisation come from the checkpoint; heads are re-initialised when
    the class count differs. For a distilled model the maintainers advise keeping the
    distillation signal: add `--distillation hard --teacher DIR` (a teacher for the new classes).
    """
    return TrainConfig(
        recipe="finetune",
        batch_size=768,
        output="runs/finetune",
        loss=LossConfig(distillation="none"),
        model=ModelConfig(drop_path_rate=0.0),
        data=DataConfig(img_size=224),
        optim=OptimConfig(opt="sgd", base_lr=0.01, weight_decay=1e-4, epochs=1000),
        erasing=ErasingConfig(prob=0.0),
    )


def finetune_384() -> TrainConfig:
    """ImageNet fine-tuning at 384 of a model trained at 224 (official README: DeiT-B 81.8 ->
    82.9 top-1). Its command, `--finetune ... --input-size 384 --batch-size 32 --nodes 2 --lr 5e-6
    --weight-decay 1e-8 --epochs 30 --min-lr 5e-6`, runs 32 images on each of 2 x 8 GPUs: a
    global batch of 512, at which the official scaling `lr x batch / 512` leaves 5e-6; with min
    lr 5e-6 the lr is constant after the 5 warm-up epochs. The rest is the ImageNet recipe, without
    distillation as in that command (add `--distillation hard --teacher DIR` to keep it). Eval
    uses the whole 384 image (crop 1.0), as timm's 384 models do.

        deit train --recipe finetune-384 --finetune deit_base_224/ --data /data/imagenet
    """
    base = imagenet()
    return replace(
        base,
        recipe="finetune-384",
        model=replace(base.model, name="deit_base_patch16_384"),
        batch_size=512,
        output="runs/finetune-384",
        loss=LossConfig(distillation="none"),
        data=replace(base.data, img_size=384, crop_pct=1.0),
        optim=replace(base.optim, base_lr=5e-6, weight_decay=1e-8, min_lr=5e-6, epochs=30),
    )


RECIPES = {
    "digits": digits,
    "small": small,
    "imagenet": imagenet,
    "finetune": finetune,
    "finetune-384": finetune_384,
    "deit3": deit3,
    "deit3-ft": deit3_ft,
    "deit3-21k": deit3_21k,
    "deit3-21k-ft": deit3_21k_ft,
    "deit3-small": deit3_small,
}
# Recipes sized from the model they train (README_revenge.md's per-size constants).
SIZED = ("deit3", "deit3-ft", "deit3-21k", "deit3-21k-ft")


def recipe(name: str, model: str | None = None) -> TrainConfig:
    """The recipe `name`; a DeiT III one (`SIZED`) with the constants of `model`'s size."""
    if name not in RECIPES:
        raise ConfigError(None, f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name](model) if name in SIZED else RECIPES[name]()


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """`configs.from_dict` with `base` defaulting to the recipe named in `values` (else
    imagenet): a partial tree, or a run's config.json, filled in as that recipe would."""
    if base is None:
        model = values.get("model")
        name = model.get("name") if isinstance(model, dict) else None
        base = recipe(values.get("recipe", "imagenet"), name if isinstance(name, str) else None)
    return _from_dict(values, base)
