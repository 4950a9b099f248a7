"""The run configuration: one typed tree (`TrainConfig`) and the named recipes it starts from.

Every setting of a run lives in exactly one field of the tree, next to the code that uses it
(`OptimConfig` in optim.py, `DataConfig` in data/, `MixupConfig` in augment.py, ...). A recipe is
a whole tree; a config file and command-line overrides then change single fields (`cli_train.py`).
What a run uses is what `OUTPUT/config.json` records (`to_dict`), and `from_dict` of that file
gives the same tree back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deit import budget as budget_lib
from deit.augment import ErasingConfig, MixupConfig
from deit.data import DataConfig
from deit.data.survey import DIGITS, SMALL_SIDE, DataSurvey
from deit.errors import InputError
from deit.losses import LossConfig
from deit.optim import EmaConfig, OptimConfig
from deit.variants import get_spec

VERSION = 1  # of the config.json layout


class ConfigError(InputError):
    """A setting that does not fit the tree: `key` is its dotted path (None: the whole file)."""

    def __init__(self, key: str | None, message: str, source: str | None = None) -> None:
        self.key, self.message, self.source = key, message, source
        where = f" (in {source})" if source else ""
        super().__init__((f"{key} {message}" if key else message) + where)


@dataclass(frozen=True)
class ModelConfig:
    """The network that is trained (a registered variant: see `deit info`)."""

    name: str = "deit_tiny_distilled_patch16_224"
    """Registered variant (official `--model`); with `finetune` the checkpoint's network."""
    drop_path_rate: float = 0.1
    """Stochastic depth, rising linearly to this rate over the blocks (official `--drop-path`)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype; parameters, optimiser state and the loss stay float32. auto: bfloat16 on a
    GPU (as the official code's AMP), float32 elsewhere (`resolve_dtype`)."""
    remat: bool = False
    """Recompute block activations in the backward pass (less memory, more compute)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise InputError(f"drop_path_rate {self.drop_path_rate} is outside [0, 1)")


# A pretrained CNN teacher fitted to new classes (`TeacherConfig.finetune`): the usual
# transfer recipe for a convnet, short, since the whole network starts trained.
FINETUNE_OPTIM = OptimConfig(
    opt="sgd",
    base_lr=0.02,
    weight_decay=1e-4,
    momentum=0.9,
    epochs=10,
    warmup_epochs=1.0,
    warmup_lr=1e-6,
    min_lr=1e-6,
)
FINETUNE_MIXUP = MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0, label_smoothing=0.1)


@dataclass(frozen=True)
class TeacherConfig:
    """Where the distillation targets come from: an exported model, or a CNN trained first."""

    path: str | None = None
    """Exported model folder (a run, `deit convert` output) to distil from (official
    `--teacher-path`); None: train `arch` first into OUTPUT/teacher."""
    arch: str = "resnet26"
    """ResNet trained as the teacher when `path` is None (official `--teacher-model`)."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Compute dtype of the frozen teacher while the student trains (bfloat16: a cheaper
    teacher beside a float32 student); None: the dtype it was saved with."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The teacher's optimiser and schedule, with its own epochs."""
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(enabled=False))
    """The teacher's weight EMA."""
    mixup: MixupConfig = field(default_factory=MixupConfig)
    """The teacher's mixup/cutmix and label smoothing."""
    finetune: bool | None = None
    """Fine-tune a pretrained teacher on the data's classes first (a new head, then
    `finetune_optim` with `finetune_mixup`, into OUTPUT/teacher, resumable) when its class count
    differs from the data's. None: for a teacher given by name, URL or checkpoint file (the
    official maintainers' advice for new classes); true: also for an exported folder; false:
    never (a class-count mismatch is then an error)."""
    finetune_optim: OptimConfig = field(default_factory=lambda: FINETUNE_OPTIM)
    """The fine-tuning recipe: SGD, momentum 0.9, lr 0.01 at batch 256 (base_lr 0.02 per
    512), weight decay 1e-4 (none on BN and biases), 1 warm-up epoch, cosine to 1e-6, 10 epochs."""
    finetune_mixup: MixupConfig = field(default_factory=lambda: FINETUNE_MIXUP)
    """Fine-tuning's augmentation on the device: no mixup/cutmix, label smoothing 0.1."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the state is laid out over the devices (the processes are given at launch)."""

    fsdp: bool = False
    """Shard parameters and optimiser state over the devices instead of replicating them."""
    heartbeat_timeout: int = 60
    """Seconds without a heartbeat after which a process of a multi-process run counts as lost:
    the others then stop with one line naming it (JAX's own runtime gets 30 s more, so that
    this line comes before its abort)."""
    shutdown_timeout: int = 300
    """Seconds a finished process of a multi-process run waits for the others at exit."""
    init_timeout: int = 300
    """Seconds the processes of a multi-process run wait for each other at start-up."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout", "shutdown_timeout", "init_timeout"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} {getattr(self, name)}; expected 1 or more seconds")


@dataclass(frozen=True)
class TrainConfig:
    """One `deit train` run: student, data, recipe, teacher and loop settings."""

    recipe: str = "imagenet"
    """The recipe the defaults came from: digits (the default without a data folder), small (a
    folder of few or small images), imagenet (a larger folder), finetune (with finetune) or
    finetune-384."""
    seed: int = 0
    """Seed of the init, the augmentation and the data order."""
    output: str = "runs/deit"
    """Run folder: config.json, checkpoints, metrics, best/ and final/ (official `--output_dir`)."""
    batch_size: int = 1024
    """Global batch over all devices and processes (the official flag is per GPU)."""
    finetune: str | None = None
    """Start from this exported DeiT (a `deit convert` output or a run's final/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    erasing: ErasingConfig = field(default_factory=ErasingConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(distillation="hard"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log_every: int = 50
    """Steps between logged training metrics."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is also written at every epoch's end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept (the newest ones)."""
    progress: Literal["auto", "bars", "lines", "none"] = "auto"
    """How the run reports on stderr: bars (rich, for a terminal), lines (one flushed line per
    log_every steps and per epoch, for logs), none (`--quiet`: warnings and the results only);
    auto: bars in a terminal, else lines."""
    time_budget: str | None = None
    """Wall-clock time for the teacher and the student together (15m, 900s, 1h30m): each
    phase's epochs (at most optim.epochs / teacher.optim.epochs) are sized from its first
    epoch's measured time, the teacher gets up to a third and stops earlier once its
    validation top-1 levels off (`deit.budget`); None: the epochs as set."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise InputError(f"batch_size {self.batch_size}; expected a positive number")
        if self.time_budget is not None:
            budget_lib.parse_duration(self.time_budget)
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} {getattr(self, name)}; expected 1 or more")

    @property
    def epochs(self) -> int:
        return self.optim.epochs


def resolve_dtype(cfg: TrainConfig, backend: str) -> TrainConfig:
    """`cfg` with `model.dtype` "auto" made concrete for `backend` (`jax.default_backend()`):
    bfloat16 on "gpu", float32 elsewhere; a concrete dtype is kept."""
    if cfg.model.dtype != "auto":
        return cfg
    dtype = "bfloat16" if backend == "gpu" else "float32"
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


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
      underfits long before it overfits): crops of 60-100% of the area, RandAugment magnitude
      3, mixup/cutmix on 10% of the batches, no random erasing, no stochastic depth, no
      repeated augmentation; horizontal flips only for colour images (a grey folder is most
      often characters or symbols, which a mirror changes); evaluation on the whole image
      below 112 px.

    Measured with `bench/small_suite.py` on one core of an AMD EPYC (`taskset -c 1`, 10m
    budget; `bench/results/small_suite.md`, README "Your own folder"); fitted on digits28 alone:

        set                       teacher  student (avg heads)  epochs t / s  time
        digits28 (28 px grey)     99.3%    96.9%                19 / 51       11.0 min
        shapes40c (held out)      75.0%    79.8% (class head 84.0%)  17 / 67  11.1 min

    On shapes40c the teacher's third of the budget was too short (an epoch of the ResNet-8 at
    40 px costs twice the student's): the run warned that it was weak and still improving.
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
        randaugment="rand-m3-mstd0.5-inc1" if tiny else base.data.randaugment,
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
        optim=OptimConfig(lr=lr, warmup_epochs=2, epochs=SMALL_EPOCHS[1]),
        ema=EmaConfig(decay=min(0.9999, max(0.9, 1 - 10 / steps))),
        mixup=replace(base.mixup, prob=0.1 if tiny else base.mixup.prob),
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
}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ConfigError(None, f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The tree as plain JSON values (tuples become lists), with the layout version."""
    return {"version": VERSION, **dataclasses.asdict(cfg)}


def _closest(key: str, known: list[str]) -> str:
    """` (did you mean a.b?)` by the last name alone (a shared `a.` says nothing)."""
    leaf = lambda k: k.rpartition(".")[2]
    near = difflib.get_close_matches(leaf(key), [leaf(k) for k in known], n=3, cutoff=0.6)
    near = [k for k in known if leaf(k) in near]
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` (a JSON/YAML value) as type `hint`, or ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"{value!r}; expected a mapping of {hint.__name__} settings")
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(key, f"{value!r}; expected {len(args)} values")
        return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(key, f"{value!r}; expected {getattr(hint, '__name__', hint)}")


def _unknown(cls: type, values: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of `values`, at any depth, that names no field (with the closest names)."""
    hints = typing.get_type_hints(cls)
    known = [prefix + f.name for f in dataclasses.fields(cls)]
    out = []
    for key, value in values.items():
        if prefix + key not in known:
            out.append(prefix + key + _closest(prefix + key, known))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            out += _unknown(hints[key], value, f"{prefix}{key}.")
    return out


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra = _unknown(cls, values, prefix)
    if extra:
        raise ConfigError(None, f"unknown setting(s) {', '.join(extra)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        # Each class's own check starts with the field's name: give it its dotted path.
        first, _, rest = str(err).partition(" ")
        if first in names:
            raise ConfigError(prefix + first, rest) from None
        raise ConfigError(None, f"{prefix.rstrip('.') or 'config'}: {err}") from None


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A tree from `to_dict`'s output; keys not given keep `base`'s values (default: the
    recipe named in `values`, else imagenet). Unknown keys, wrong types and values out of
    range raise `ConfigError`."""
    values = dict(values)
    version = values.pop("version", VERSION)
    if version != VERSION:
        raise ConfigError("version", f"{version!r}; this deit reads config version {VERSION}")
    if base is None:
        base = recipe(values.get("recipe", "imagenet"))
    return _build(TrainConfig, _merge(dataclasses.asdict(base), values))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read_values(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON or YAML file (a run's config.json, or a partial tree)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(None, f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # both parsers' errors: the file is not what it claims to be
        raise ConfigError(None, f"{path} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(None, f"{path} holds a {type(values).__name__}; expected a mapping")
    return values


def load_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """`from_dict` of a JSON or YAML file; errors name the file."""
    values = read_values(path)
    try:
        return from_dict(values, base)
    except ConfigError as err:
        raise ConfigError(err.key, err.message, source=str(path)) from None
