"""Where a distillation teacher comes from, and a pretrained teacher fitted to new classes.

`--teacher SPEC` (`teacher.path`; official `--teacher-path`) is, in this order:
- an exported model folder or a run folder (`deit train`, `deit convert` output);
- a checkpoint file (`.pth`, `.pth.tar`, `.bin`, `.safetensors`; read by the restricted
  unpickler, never run), converted once into `$DEIT_HOME/pretrained/<stem>/file-<key>`;
- an http(s) URL, downloaded once into `$DEIT_HOME/downloads` (its SHA-256 checked against the
  hash prefix of its file name, `regnety_160-a5fe301d.pth`) and converted once;
- a name with pretrained weights: `regnety_160` (the paper's RegNetY-16GF, official file),
  `regnety_160@timm` (the Hub copy `timm/regnety_160.deit_in1k`), `resnet18` / `resnet50`
  (torchvision's files; `@timm` their Hub copies), or an official DeiT name. A timm or
  torchvision ResNet checkpoint given as a file or URL converts the same way
  (`deit.resnet_convert`).
`teacher.arch` (official `--teacher-model`) naming a RegNet is the network those weights must
be: a checkpoint of another one is refused in one line. `--teacher-model regnety_160` alone
takes the official weights.

A teacher whose class count differs from the data's is first fine-tuned on the data
(`TeacherConfig.finetune`, as the official maintainers advise for new classes): the same
network with a new head, trained with `teacher.finetune_optim` / `finetune_mixup` into
OUTPUT/teacher, resumable like a teacher trained from scratch; then the student distils from it.

In Python, `load_teacher("regnety_160")` returns `(module, variables)`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from deit import export, pretrained
from deit.configs import ModelConfig, TrainConfig
from deit.errors import InputError
from deit.losses import LossConfig
from deit.regnet import REGNETS, RegNet, close_names, describe, registered_name
from deit.torch_pickle import TORCH_SUFFIXES

CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


def teacher_names() -> list[str]:
    """Every name `--teacher` takes: pretrained weights (teachers first), then the networks a
    run can train from scratch (`--teacher-model`)."""
    from deit.teacher import TEACHERS

    names = [*pretrained.TEACHER_WEIGHTS, *pretrained.PRETRAINED, *TEACHERS, *REGNETS]
    return list(dict.fromkeys(names))


def _unknown(spec: str) -> InputError:
    near = close_names(spec.partition("@")[0], teacher_names())
    if near:
        return InputError(
            f"teacher.path {spec!r} is not a folder, a checkpoint file or a teacher name; did "
            f"you mean {', '.join(near)}? (expected a folder, a checkpoint file, a URL or a "
            f"name; pretrained teachers: {', '.join(pretrained.TEACHER_WEIGHTS)})"
        )
    return InputError(
        f"teacher.path {spec!r} is not a folder; expected an exported model folder, a run "
        f"folder, a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), a URL or a pretrained "
        f"name ({', '.join([*pretrained.TEACHER_WEIGHTS, *pretrained.PRETRAINED])})"
    )


def teacher_folder(spec: str, arch: str | None = None) -> Path:
    """The exported folder of `--teacher SPEC` (see the module's docstring); with `arch` a
    `REGNETS` name, the folder's network must be that RegNet."""
    regnet = arch if arch in REGNETS else None
    path = Path(spec)
    name = spec.partition("@")[0]
    if path.is_dir():
        folder = pretrained.exported_folder(path)
    elif path.is_file() and path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        folder = pretrained.file_folder(path, regnet)
    elif spec.startswith(("https://", "http://")):
        folder = pretrained.url_folder(spec, regnet)
    elif name in pretrained.PRETRAINED or name in pretrained.TEACHER_WEIGHTS:
        folder = pretrained.resolve(spec)
    else:
        raise _unknown(spec)
    if regnet is not None:
        check_folder_arch(folder, regnet, spec)
    return folder


def check_folder_arch(folder: Path, arch: str, source: str) -> None:
    """One line when the exported model in `folder` is not the registered RegNet `arch`."""
    from deit.regnet_convert import check_architecture

    config = json.loads((folder / export.CONFIG).read_text())
    model = export.build_model(config)
    if not isinstance(model, RegNet):
        raise InputError(
            f"{source} holds a {config.get('variant') or config.get('kind')}, not the {arch} "
            f"teacher.arch asks for ({describe(_regnet(arch))})"
        )
    check_architecture(model, arch, source)


def _regnet(name: str) -> RegNet:
    from deit.regnet import create_regnet

    return create_regnet(name)


def load_teacher(
    spec: str, *, arch: str | None = None, dtype: Any = None
) -> tuple[Any, dict[str, Any]]:
    """`(module, variables)` of a teacher by name, URL, checkpoint file or folder, e.g.
    `model, variables = deit.load_teacher("regnety_160")` (downloaded, checked and converted once;
    `model.apply(variables, images)` takes normalised `(B, H, W, 3)` images, logits `(B, 1000)`).
    `dtype` sets the compute dtype (bfloat16 for a cheaper forward); variables stay float32."""
    model, variables, _ = export.load_exported(teacher_folder(spec, arch))
    if dtype is not None:
        model = model.clone(dtype=jnp.dtype(dtype))
    return model, variables


def given(cfg: Any) -> Any:
    """`cfg` with `--teacher-model NAME` alone, NAME having pretrained weights (`regnety_160`),
    read as `--teacher NAME`: such a teacher is loaded, not trained from scratch. The ResNets
    (`deit.teacher.TEACHERS`) stay networks to train: `--teacher resnet50` loads their weights."""
    from deit.teacher import TEACHERS

    t = cfg.teacher
    if t.path is None and t.arch in pretrained.TEACHER_WEIGHTS and t.arch not in TEACHERS:
        return dataclasses.replace(cfg, teacher=dataclasses.replace(t, path=t.arch))
    return cfg


def wants_finetune(cfg: Any, folder: Path, model: Any, num_classes: int) -> bool:
    """Whether the teacher in `folder` is fine-tuned on `num_classes` classes first; an
    InputError when its class count differs and fine-tuning is off."""
    from deit.model import DeiT

    have = getattr(model, "num_classes", num_classes)
    if have == num_classes:
        return False
    setting = cfg.teacher.finetune
    by_name = not Path(cfg.teacher.path).is_dir()
    if setting or (setting is None and by_name):
        if isinstance(model, DeiT):
            raise InputError(
                f"the teacher in {folder} is a DeiT with {have} classes and the data has "
                f"{num_classes}; expected a CNN teacher to fine-tune (a RegNet or ResNet), or a "
                "teacher trained on the data's classes"
            )
        return True
    why = "teacher.finetune is false" if setting is False else "it is an exported folder"
    raise InputError(
        f"teacher predicts {have} classes but the student has {num_classes} ({why}); "
        "expected a teacher trained on the data's classes, or teacher.finetune true to "
        "fine-tune it first"
    )


def teacher_config(cfg: TrainConfig, output: Path) -> TrainConfig:
    """The run that trains `cfg.teacher.arch` into `output`: the student's data, batch, seed and
    loop settings with the teacher's network, optimiser, EMA and mixup, and no distillation."""
    t = cfg.teacher
    return dataclasses.replace(
        cfg,
        output=str(output),
        finetune=None,
        model=ModelConfig(name=t.arch, drop_path_rate=0.0, dtype=cfg.model.dtype),
        optim=t.optim,
        ema=t.ema,
        mixup=t.mixup,
        loss=LossConfig(distillation="none"),
    )


def finetune_config(cfg: Any, output: Path, name: str) -> Any:
    """The run that fine-tunes the teacher into `output`: the student's data, batch, seed and
    loop settings with `teacher.finetune_optim`, `finetune_mixup` and no distillation."""
    tcfg = teacher_config(cfg, output)
    t = cfg.teacher
    return dataclasses.replace(
        tcfg,
        model=dataclasses.replace(tcfg.model, name=name),
        optim=t.finetune_optim,
        mixup=t.finetune_mixup,
    )


def _fresh_head(model: Any, variables: dict, seed: int) -> dict:
    """`variables` with `head` initialised for `model`'s class count (the rest kept)."""
    x = jnp.zeros((1, 32, 32, getattr(model, "in_chans", 3)), jnp.float32)
    fresh = jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]["head"]
    return {
        "params": {**variables["params"], "head": fresh},
        "batch_stats": variables["batch_stats"],
    }


def finetune_teacher(
    cfg: Any,
    folder: Path,
    train_src: Any,
    val_src: Any,
    resume: bool,
    budget: Any = None,
) -> Path:
    """The teacher in `folder` fine-tuned on `train_src`'s classes into OUTPUT/teacher (reused
    when that holds a finished one, continued from its checkpoint on a resume); its final
    folder. The run says the fine-tuned teacher's accuracy before the student starts."""
    from deit.report import report_teacher
    from deit.train import fit

    out = Path(cfg.output).absolute() / "teacher"
    final = out / "final"
    if (final / export.CONFIG).is_file():
        return final
    model, variables, config = export.load_exported(folder)
    classes = len(train_src.classes)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "float32"
    model = model.clone(num_classes=classes, dtype=jnp.dtype(dtype))
    name = config.get("variant") or (registered_name(model) if isinstance(model, RegNet) else None)
    tcfg = finetune_config(cfg, out, name or type(model).__name__)
    again = resume or (out / "checkpoints").is_dir()
    if again and (out / "config.json").is_file():  # the epochs a budget sized, kept
        epochs = json.loads((out / "config.json").read_text())["optim"]["epochs"]
        tcfg = dataclasses.replace(tcfg, optim=dataclasses.replace(tcfg.optim, epochs=epochs))
    init = _fresh_head(model, variables, cfg.seed)
    tick = time.perf_counter()
    results = fit(
        model,
        tcfg,
        train_src,
        val_src,
        resume=again,
        title="teacher fine-tuning",
        budget=budget,
        init_params=init,
        extra_meta={"finetuned_from": str(folder), **({"variant": name} if name else {})},
    )
    if jax.process_index() == 0:
        from deit import progress

        progress.say(
            f"teacher: {name or type(model).__name__} from {folder} fine-tuned on {classes} "
            f"classes into {final}",
            cfg.progress,
        )
        report_teacher(results, time.perf_counter() - tick, cfg.progress)
    return final


def resolve_given(
    cfg: Any, train_src: Any, val_src: Any, resume: bool, budget: Any = None
) -> tuple[Any, Path]:
    """`(Teacher, folder)` of `cfg.teacher.path`, fine-tuned first on the data's classes
    when its class count differs (`wants_finetune`)."""
    folder = teacher_folder(cfg.teacher.path, cfg.teacher.arch)
    if train_src is not None:
        final = Path(cfg.output).absolute() / "teacher" / "final"
        if (final / export.CONFIG).is_file() and cfg.teacher.finetune is not False:
            return pretrained.open_model(
                final
            ).as_teacher(), final  # fine-tuned by an earlier (part of the) run
        model, _, _ = export.load_model(folder)
        if wants_finetune(cfg, folder, model, len(train_src.classes)):
            folder = finetune_teacher(cfg, folder, train_src, val_src, resume, budget)
    return pretrained.open_model(folder).as_teacher(), folder


def plan(cfg: Any, out: Path, num_classes: int) -> str | None:
    """The header's teacher row for a teacher given by name, URL or file (None otherwise)."""
    spec = cfg.teacher.path
    if spec is None or Path(spec).is_dir():
        return None
    final = out / "teacher" / "final"
    if (final / export.CONFIG).is_file():
        return f"{spec}, fine-tuned on the data's {num_classes} classes, reused from {final}"
    known = pretrained.TEACHER_WEIGHTS.get(spec.partition("@")[0]) or pretrained.PRETRAINED.get(
        spec.partition("@")[0]
    )
    o = cfg.teacher.finetune_optim
    tune = (
        f"fine-tuned first on the data's {num_classes} classes for {o.epochs} epoch(s) into "
        f"{out / 'teacher'} ({o.opt}, a new head; teacher.finetune_optim)"
    )
    if cfg.teacher.finetune is False:
        tune = "used as it is (teacher.finetune false)"
    if known is not None:
        top1 = "" if known.top1 is None else f", ImageNet-1k top-1 {known.top1}"
        head = f"{spec} (pretrained{top1})"
        return f"{head}, used as it is" if num_classes == 1000 else f"{head}, {tune}"
    return f"{spec}, {tune} if its classes are not the data's"
