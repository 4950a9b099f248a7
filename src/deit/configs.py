"""Typed run configurations and the named recipes that `deit train --recipe NAME` starts from.

A recipe is a full `TrainConfig`; command-line flags then override single fields. Each recipe's
docstring says what it reproduces and what to expect.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deit.augment import ErasingConfig, MixupConfig
from deit.data import DataConfig
from deit.optim import OptimConfig

DISTILLATION = ("none", "soft", "hard")


@dataclass(frozen=True)
class TeacherConfig:
    """The CNN teacher `deit train` trains first when no `--teacher` checkpoint is given."""

    arch: str = "resnet26"
    epochs: int = 30
    optim: OptimConfig = field(default_factory=OptimConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "deit_tiny_distilled_patch16_224"
    epochs: int = 300
    batch_size: int = 1024  # global, over all devices and processes
    seed: int = 0
    output: str = "runs/deit"
    distillation: str = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    soft_reduction: str = "numel"
    teacher: str | None = None  # an exported model folder, or a ResNet name to train first
    drop_path_rate: float = 0.1
    dtype: str = "float32"
    remat: bool = False  # recompute block activations in the backward pass (DeiT.remat)
    fsdp: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    erasing: ErasingConfig = field(default_factory=ErasingConfig)
    teacher_cfg: TeacherConfig = field(default_factory=TeacherConfig)
    log_every: int = 50
    checkpoint_every: int = 500  # steps; a checkpoint is also written at every epoch's end
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        if self.distillation not in DISTILLATION:
            raise ValueError(
                f"distillation {self.distillation!r}; expected one of {', '.join(DISTILLATION)}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha {self.alpha} is outside [0, 1]")
        if self.tau <= 0:
            raise ValueError(f"tau {self.tau}; expected a positive temperature")
        if self.soft_reduction not in ("numel", "batchmean"):
            raise ValueError(
                f"soft_reduction {self.soft_reduction!r}; expected 'numel' or 'batchmean'"
            )
        if self.epochs <= 0:
            raise ValueError(f"epochs {self.epochs}; expected a positive number")
        if self.batch_size <= 0:
            raise ValueError(f"batch size {self.batch_size}; expected a positive number")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}; expected 'float32' or 'bfloat16'")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {self.drop_path_rate} is outside [0, 1)")


def imagenet() -> TrainConfig:
    """The paper's ImageNet-1k recipe (DeiT §6, Table 9; official `main.py` defaults), distilled
    from a CNN with hard distillation: DeiT-Ti 74.5 / S 81.2 / B 83.4 top-1 with a RegNetY-16GF
    teacher (`--teacher` must then be a converted RegNetY or any exported model).

        deit train --recipe imagenet --data /data/imagenet --teacher /ckpt/regnety_160
    """
    return TrainConfig(data=DataConfig(img_size=224))


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
    gives a ViT far too small a step on 11 steps per epoch); 90 epochs, 3 warm-up; EMA 0.998.
    Expect ~97% top-1 for the averaged heads in under 5 minutes on 2 cores (see the README).
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
        model="deit_digits_distilled_patch4_16",
        epochs=90,
        batch_size=128,
        output="runs/digits",
        distillation="hard",
        drop_path_rate=0.05,
        data=data,
        optim=OptimConfig(lr=2e-3, warmup_epochs=3, epochs=90, min_lr=1e-5, ema_decay=0.998),
        mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.3),
        erasing=ErasingConfig(prob=0.1),
        teacher_cfg=TeacherConfig(
            arch="resnet8",
            epochs=30,
            optim=OptimConfig(
                lr=1e-2, warmup_epochs=1, epochs=30, weight_decay=0.05, ema_decay=None
            ),
            mixup=MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0),
        ),
        log_every=10,
        checkpoint_every=200,
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
        epochs=1000,
        batch_size=768,
        output="runs/finetune",
        distillation="none",
        drop_path_rate=0.0,
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
        model="deit_base_patch16_384",
        epochs=30,
        batch_size=512,
        output="runs/finetune-384",
        distillation="none",
        data=replace(base.data, img_size=384, crop_pct=1.0),
        optim=replace(base.optim, base_lr=5e-6, weight_decay=1e-8, min_lr=5e-6, epochs=30),
    )


RECIPES = {
    "digits": digits,
    "imagenet": imagenet,
    "finetune": finetune,
    "finetune-384": finetune_384,
}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]()
