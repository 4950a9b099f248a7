"""`deit train`'s command line: every field of the config tree as a dotted flag, a config file,
the official `main.py` flag names as aliases, and the launch flags.

The flags come from the dataclasses themselves through `tyro` (types, defaults and the field
docstrings as help), so a new setting is one new field. The defaults a command line overrides
are, in order: the recipe (`--recipe`, else digits / imagenet / finetune from the other flags),
then `--config FILE`, or the run's own `config.json` under `--resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

from deit import configs, recipes
from deit.configs import ConfigError, TrainConfig
from deit.data import survey as data_survey
from deit.errors import InputError

# The official main.py's flag names (and this CLI's older short ones) -> flags of the tree.
# A tuple is a flag that stands for a value.
ALIASES: dict[str, str | tuple[str, str]] = {
    "--data": "--data.dataset",
    "--data-path": "--data.dataset",
    "--input-size": "--data.img-size",
    "--img-size": "--data.img-size",
    "--aa": "--data.randaugment",
    "--train-interpolation": "--data.interpolation",
    "--eval-crop-ratio": "--data.crop-pct",
    "--num_workers": "--data.workers",
    "--workers": "--data.workers",
    "--bad-images": "--data.bad-images",
    "--repeated-aug": ("--data.repeats", "3"),
    "--no-repeated-aug": ("--data.repeats", "1"),
    "--model": "--model.name",
    "--drop-path": "--model.drop-path-rate",
    "--dtype": "--model.dtype",
    "--remat": "--model.remat",
    "--epochs": "--optim.epochs",
    "--lr": "--optim.base-lr",
    "--opt": "--optim.opt",
    "--opt-eps": "--optim.eps",
    "--opt-betas": "--optim.betas",
    "--momentum": "--optim.momentum",
    "--weight-decay": "--optim.weight-decay",
    "--clip-grad": "--optim.clip-grad-norm",
    "--warmup-epochs": "--optim.warmup-epochs",
    "--warmup-lr": "--optim.warmup-lr",
    "--min-lr": "--optim.min-lr",
    "--smoothing": "--mixup.label-smoothing",
    "--mixup": "--mixup.mixup-alpha",
    "--cutmix": "--mixup.cutmix-alpha",
    "--mixup-prob": "--mixup.prob",
    "--mixup-switch-prob": "--mixup.switch-prob",
    "--reprob": "--erasing.prob",
    "--remode": "--erasing.mode",
    "--model-ema": "--ema.enabled",
    "--no-model-ema": "--ema.no-enabled",
    "--model-ema-decay": "--ema.decay",
    "--distillation": "--loss.distillation",
    "--distillation-type": "--loss.distillation",
    "--alpha": "--loss.alpha",
    "--distillation-alpha": "--loss.alpha",
    "--tau": "--loss.tau",
    "--distillation-tau": "--loss.tau",
    "--soft-reduction": "--loss.soft-reduction",
    "--teacher": "--teacher.path",
    "--teacher-path": "--teacher.path",
    "--teacher-model": "--teacher.arch",
    "--teacher-epochs": "--teacher.optim.epochs",
    "--output_dir": "--output",
    "--output-dir": "--output",
    "--fsdp": "--parallel.fsdp",
    # DeiT III's (README_revenge.md); `--unscale-lr` is `UNSCALE_LR`, `--opt fusedlamb` `VALUES`'
    "--bce-loss": "--loss.bce",
    "--ThreeAugment": "--data.three-augment",
    "--src": "--data.src",
    "--color-jitter": "--data.color-jitter",
    "--quiet": ("--progress", "none"),
}

# Official values that name one of this tree's: `--opt fusedlamb` (apex's LAMB) is `lamb`.
VALUES: dict[str, dict[str, str]] = {"--optim.opt": {"fusedlamb": "lamb"}}
# Official `--unscale-lr`: `--lr` is the peak lr itself, not a base lr scaled by batch / 512.
UNSCALE_LR = ("--unscale-lr", "--unscale_lr")


def _unscaled(argv: list[str]) -> list[str]:
    """`argv` without `--unscale-lr`, and with it `--lr X` as `--optim.lr X` (the absolute lr);
    without `--lr` it changes nothing (the recipe's lr is already what it states)."""
    if not any(t in UNSCALE_LR for t in argv):
        return argv
    out = []
    for token in argv:
        if token in UNSCALE_LR:
            continue
        name, eq, value = token.partition("=")
        out.append(("--optim.lr" + eq + value) if name == "--lr" else token)
    return out


@dataclass(frozen=True)
class TrainCommand:
    """Train (and distil) a DeiT; with no flags, on the built-in digits.

    Every setting is a dotted flag (`--optim.weight-decay 0.05`); the official main.py names
    work too (`--drop-path`, `--warmup-epochs`, `--smoothing`, `--reprob`, `--mixup`, `--aa`,
    `--model-ema-decay`, `--clip-grad`, `--distillation-type`, `--input-size`, `--data-path`,
    `--output_dir`, ...; `--lr` is the official base lr, scaled by global batch / 512, unless
    `--unscale-lr`), and DeiT III's (`--bce-loss`, `--ThreeAugment`, `--src`, `--color-jitter`,
    `--opt lamb` or `fusedlamb`, `--unscale-lr`).
    """

    settings: Annotated[TrainConfig, tyro.conf.arg(name="")] = field(default_factory=TrainConfig)
    config_file: Annotated[str | None, tyro.conf.arg(name="config")] = None
    """JSON or YAML file of settings (a run's config.json, or a partial tree) over the recipe."""
    print_config: bool = False
    """Print the resolved settings as JSON (for --config) and exit."""
    compile_cache: bool = True
    """Keep compiled programs in $DEIT_HOME/jax-cache (JAX's persistent compilation cache), so
    that a second run of the same shapes starts without compiling again (also
    DEIT_COMPILE_CACHE=0 turns it off)."""
    resume: bool = False
    """Continue the run in --output with its config.json (flags given here override it)."""
    coordinator: str | None = None
    """HOST:PORT of process 0 (multi-host runs)."""
    num_processes: int | None = None
    """Processes of a multi-host run."""
    process_id: int | None = None
    """This process's index in a multi-host run."""


def _canonical(tokens: list[str]) -> list[str]:
    """Aliases replaced by the tree's flags; `--flag=value` split; `_` in names as `-`."""
    out: list[str] = []
    for token in tokens:
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        target = ALIASES.get(name, ALIASES.get(name.replace("_", "-")))
        if isinstance(target, tuple):
            out.extend(target)
            continue
        out.append(target or name.replace("_", "-"))
        if eq:
            out.append(value)
    for i, token in enumerate(out[:-1]):  # official values: `--opt fusedlamb`
        out[i + 1] = VALUES.get(token, {}).get(out[i + 1], out[i + 1])
    return out


def _field_of(flag: str) -> str:
    """`--ema.no-enabled` and `--ema.enabled` set one field."""
    head, dot, last = flag[2:].rpartition(".")
    last = last.removeprefix("no-")
    return f"{head}{dot}{last}"


def _check_repeats(original: list[str], tokens: list[str]) -> None:
    """Two spellings of one field (an alias and its dotted flag) are refused; the same flag
    twice is argparse's rule, the last one wins."""
    seen: dict[str, str] = {}
    spelled = [t.partition("=")[0] for t in original if t.startswith("--")]
    flags = [t for t in tokens if t.startswith("--")]
    for flag, as_typed in zip(flags, spelled, strict=False):
        key = _field_of(flag)
        if seen.setdefault(key, as_typed) != as_typed:
            raise ConfigError(
                None, f"{as_typed} and {seen[key]} are the same setting; expected one of them"
            )


def _value(tokens: list[str], flag: str) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == flag:
            return tokens[i + 1]
    return None


@functools.lru_cache(maxsize=4)
def _survey(dataset: str) -> data_survey.DataSurvey | None:
    """The data's survey, or None when it cannot be read (the run then names the problem)."""
    try:
        return data_survey.survey(dataset)
    except (InputError, OSError):
        return None


def _default_for_data(tokens: list[str]) -> tuple[str, data_survey.DataSurvey | None]:
    """digits without --data; for a folder, small when it has few or small images, else
    imagenet (the survey is None when the folder cannot be read, or under --resume)."""
    data = _value(tokens, "--data.dataset")
    if not data or data == "digits":
        return "digits", None
    found = None if "--resume" in tokens else _survey(data)
    return ("small" if found is not None and found.small else "imagenet"), found


def _recipe_name(tokens: list[str], file_values: dict[str, Any] | None) -> str:
    name = _value(tokens, "--recipe")
    if name:
        return name
    if file_values and "recipe" in file_values:
        return str(file_values["recipe"])
    if _value(tokens, "--finetune"):
        return "finetune"
    return _default_for_data(tokens)[0]


def _model_hint(tokens: list[str], file_values: dict[str, Any] | None) -> str | None:
    """The model a sized recipe (DeiT III's) takes its constants from: `--model`, the config
    file's `model.name`, else the `--finetune` checkpoint's variant (its config.json) or name."""
    model = _value(tokens, "--model.name")
    if model:
        return model
    given = (file_values or {}).get("model")
    if isinstance(given, dict) and isinstance(given.get("name"), str):
        return given["name"]
    finetune = _value(tokens, "--finetune")
    if not finetune:
        return None
    try:
        variant = json.loads((Path(finetune) / "config.json").read_text()).get("variant")
    except (OSError, ValueError, AttributeError):
        variant = None
    return variant if isinstance(variant, str) else finetune


def _base(name: str, tokens: list[str], file_values: dict[str, Any] | None = None) -> TrainConfig:
    """The recipe `name`; `small` sized from the data given (`recipes.small`), DeiT III's from
    the model (`_model_hint`)."""
    if name in recipes.SIZED:
        return recipes.recipe(name, _model_hint(tokens, file_values))
    if name not in ("small", "deit3-small"):
        return recipes.recipe(name)
    found = _survey(_value(tokens, "--data.dataset") or "digits")
    sized = recipes.small if name == "small" else recipes.deit3_small
    return sized(found) if found is not None else sized()


def _size_text(found: data_survey.DataSurvey) -> str:
    few = found.train_images < data_survey.SMALL_COUNT
    tiny = found.side < data_survey.SMALL_SIDE
    return (
        f"{found.train_images:,} training images{' (under 10,000)' if few else ''} of "
        f"~{found.side} px{' (under 112)' if tiny else ''}"
    )


def recipe_reason(argv: list[str]) -> str:
    """Why `deit train ARGV` starts from the recipe it does (`_recipe_name`), for the header."""
    tokens = _canonical(_unscaled(argv))
    others = "--recipe " + "|".join(recipes.RECIPES)
    if _value(tokens, "--recipe"):
        return "given by --recipe"
    if "--resume" in tokens:
        return "the resumed run's, from its config.json"
    if _value(tokens, "--config"):
        return "from the --config file, or the default for its data"
    if _value(tokens, "--finetune"):
        return f"the default with --finetune; {others} for another"
    name, found = _default_for_data(tokens)
    if name == "digits":
        return f"the default without --data: the built-in digits; {others}"
    if found is None:
        return f"the default for an image folder: the paper's ImageNet settings; {others}"
    if name == "small":
        return (
            f"the default for a small image folder, {found.describe()}: model, image size, "
            f"batch and augmentation chosen from these, epochs from the time budget; {others}"
        )
    return (
        f"the default for a large image folder, {_size_text(found)}: the paper's ImageNet "
        f"settings; {others}"
    )


def _flag(path: str) -> str:
    return "--" + path.removeprefix("settings").lstrip(".").replace("_", "-")


def _one_line(text: str) -> str:
    """tyro's boxed error as one line: the box's title and help pointer dropped, the setting
    named by its flag, the suggestions kept as flag names."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colours, when stdout is a terminal
    # Boxes are drawn in UTF-8 or, when stdout is not UTF-8, in ASCII (+-, |, -).
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("╭", "╰", "+"))]
    lines = [re.sub(r"^[\s│|]+|[\s│|]+$", "", ln) for ln in lines]
    lines = [ln for ln in lines if ln.strip("─-") and not ln.startswith("For full helptext")]
    message = " ".join(lines)
    message, _, hints = message.partition(" Perhaps you meant:")
    message = message.split(" Got errors:")[0].split(" Argument helptext:")[0]
    message = re.sub(
        r"Error parsing (--[\w.-]+): no type matching (\S+) could be instantiated from "
        r"\[(.*)\]\.?",
        lambda m: f"{m[1]} {m[3]}; expected {m[2]}",
        message,
    )
    message = re.sub(
        r"Error parsing (--[\w.-]+): (?:invalid literal for (int)\(\) with base 10|could not "
        r"convert string to (float)): (.*)",
        lambda m: f"{m[1]} {m[4]}; expected {'an integer' if m[2] else 'a number'}",
        message,
    )
    message = re.sub(
        r"Error parsing ([\w.]+): (\w+) ", lambda m: f"{_flag(m[1] + '.' + m[2])} ", message
    )
    message = re.sub(
        r"Unrecognized options: (.*)",
        lambda m: "unknown option(s) " + ", ".join(t for t in m[1].split(", ") if t[:1] == "-"),
        message,
    )
    near = [f for f in dict.fromkeys(re.findall(r"--[\w.-]+", hints))]
    return message + (f"; did you mean {', '.join(near[:4])}?" if near else "")


def parse(argv: list[str]) -> tuple[TrainConfig, TrainCommand]:
    """The resolved tree and the launch flags of `deit train ARGV`; `ConfigError` on bad input.

    `--help` prints the help and raises SystemExit(0)."""
    argv = _unscaled(argv)
    tokens = _canonical(argv)
    _check_repeats(argv, tokens)
    if "--model.name" in tokens and _value(tokens, "--finetune"):
        raise ConfigError(
            None, "--model and --finetune: the fine-tuned network is the checkpoint's"
        )
    file = _value(tokens, "--config")
    values = configs.read_values(file) if file else None
    name = _recipe_name(tokens, values)
    base = _base(name, tokens, values)
    output = _value(tokens, "--output") or base.output
    saved = Path(output) / "config.json"
    if "--resume" in tokens and saved.is_file():
        base = configs.load_file(saved, base)
    elif file is not None:
        base = configs.load_file(file, base)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cmd = tyro.cli(
                TrainCommand,
                default=TrainCommand(settings=base),
                args=tokens,
                prog="deit train",
            )
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        raise ConfigError(None, _one_line(err.getvalue()) or "bad command line") from None
    except ValueError as bad:  # the tree's own checks (tyro reports only nested ones)
        first, _, rest = str(bad).partition(" ")
        if first in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(None, f"{_flag(first)} {rest}") from None
        raise
    return cmd.settings, cmd


def print_config(cfg: TrainConfig) -> str:
    return json.dumps(configs.to_dict(cfg), indent=2)


def changed(before: TrainConfig, after: TrainConfig) -> list[str]:
    """`key: old -> new` for every setting that differs (what a resume overrides)."""
    flat = lambda d, p="": (
        {k: v for key, sub in d.items() for k, v in flat(sub, f"{p}{key}.").items()}
        if isinstance(d, dict)
        else {p.rstrip("."): d}
    )
    a, b = flat(dataclasses.asdict(before)), flat(dataclasses.asdict(after))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
