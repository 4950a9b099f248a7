"""The run configuration: one typed tree (`TrainConfig`) and its (de)serialisation.

Every setting of a run lives in exactly one field of the tree, next to the code that uses it
(`OptimConfig` in optim.py, `DataConfig` in data/, `MixupConfig` in augment.py, ...). A recipe
(`recipes.py`) is a whole tree; a config file and command-line overrides then change single
fields (`cli_train.py`). What a run uses is what `OUTPUT/config.json` records (`to_dict`), and
`from_dict` of that file gives the same tree back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deit import budget as budget_lib
from deit.augment import ErasingConfig, MixupConfig
from deit.data import DataConfig
from deit.errors import InputError
from deit.losses import LossConfig
from deit.optim import EmaConfig, OptimConfig
from deit.parallel import ParallelConfig

VERSION = 1  # of the config.json layout
# A decimal number as text, scientific notation included (`1e-08`, `5e-4`, `-0.5`, `.25E+2`).
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


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
    """Stochastic depth: the rate of the last block (official `--drop-path`)."""
    drop_path_schedule: Literal["linear", "uniform"] = "linear"
    """linear: rising from 0 to `drop_path_rate` over the blocks (DeiT); uniform: every block at
    `drop_path_rate` (DeiT III, official `models_v2.py`)."""
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
class TrainConfig:
    """One `deit train` run: student, data, recipe, teacher and loop settings."""

    recipe: str = "imagenet"
    """The recipe the defaults came from: digits (the default without a data folder), small (a
    folder of few or small images), imagenet (a larger folder), finetune (with finetune),
    finetune-384, or DeiT III's deit3, deit3-ft, deit3-21k, deit3-21k-ft (sized from the model)
    and deit3-small (small's counterpart)."""
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
        if self.loss.bce and self.mixup.label_smoothing > 0:
            raise InputError(
                f"loss.bce with mixup.label_smoothing {self.mixup.label_smoothing}; expected 0 "
                "(binarised at > 0, every smoothed target is 1: DeiT III trains BCE unsmoothed)"
            )
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


def to_dict(cfg: Any) -> dict[str, Any]:
    """The tree as plain JSON values (tuples become lists), with the layout version. A float
    field is written as a float even where a recipe gave an int (`warmup_epochs=1` as 1.0):
    reading it back gives a float, and the printed config must print the same again."""
    return {"version": VERSION, **_plain(cfg)}


def _plain(node: Any) -> Any:
    """`dataclasses.asdict`, with each float field's value a float (by the field's type)."""
    values = dataclasses.asdict(node)
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, hint = getattr(node, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            values[f.name] = _plain(value)
        elif _is_float(hint) and isinstance(value, int) and not isinstance(value, bool):
            values[f.name] = float(value)
        elif typing.get_origin(hint) is tuple and isinstance(value, tuple):
            args = [a for a in typing.get_args(hint) if a is not Ellipsis]
            if args and all(a is float for a in args):  # mean, std, scale, ...
                values[f.name] = [float(v) for v in value]
    return values


def _is_float(hint: Any) -> bool:
    """`float`, or `float | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return float in args and all(a in (float, type(None)) for a in args)
    return hint is float


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
    if hint is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads `1e-08` and `5e-4` as strings (its floats need a dot), yet
        # they are what `--print-config` prints and how people write a learning rate.
        return float(value)
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


def from_dict(values: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """A tree from `to_dict`'s output; keys not given keep `base`'s values (`recipes.from_dict`
    takes the recipe the values name). Unknown keys, wrong types and values out of range raise
    `ConfigError`."""
    values = dict(values)
    version = values.pop("version", VERSION)
    if version != VERSION:
        raise ConfigError("version", f"{version!r}; this deit reads config version {VERSION}")
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


def load_file(path: str | Path, base: TrainConfig) -> TrainConfig:
    """`from_dict` of a JSON or YAML file; errors name the file."""
    values = read_values(path)
    try:
        return from_dict(values, base)
    except ConfigError as err:
        raise ConfigError(err.key, err.message, source=str(path)) from None
