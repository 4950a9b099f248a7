"""Whole runs, as the CLI offers them: train (teacher first when needed) and evaluate, fine-tune an
exported model. Evaluating and predicting with an exported model: `evaluate.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from deit import budget as budget_lib
from deit import configs, export, parallel, progress, runlock, teacher_source
from deit import data as data_lib
from deit.configs import ModelConfig, TrainConfig
from deit.errors import InputError
from deit.evaluate import make_teacher_eval_step, run_eval
from deit.export import exported_folder, load_exported, teacher_from_export
from deit.losses import LossConfig
from deit.model import DeiT, create_model, init_params, param_count, resample_pos_embed
from deit.optim import REFERENCE_BATCH, OptimConfig, scaled_lr
from deit.regnet import REGNETS, close_names
from deit.runlock import RunLock
from deit.signals import Interrupted, StopSignals
from deit.teacher import TEACHERS, Teacher, check_teacher, create_teacher
from deit.train import fit
from deit.variants import VARIANTS

log = logging.getLogger("deit")
# A peak lr below this barely moves a network in the epochs a run has (the 40-image
# folder at batch 16 scaled the recipe's 5e-4 down to 1.6e-5 and stayed at chance).
LOW_LR = 1e-5
# A teacher below this top-1 that was still rising when its share of the budget ended is
# likely worse than the student would be alone (issue 25: a 73% teacher, still climbing, left
# its student at 34%): the run says so before the student starts.
WEAK_TEACHER = 90.0


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


def resolve_teacher(
    cfg: TrainConfig,
    train_src: data_lib.RecordSource,
    val_src: data_lib.RecordSource,
    resume: bool,
    budget: budget_lib.PhaseBudget | None = None,
) -> tuple[Teacher, Path]:
    """`cfg.teacher.path` (an exported folder or a run), or `cfg.teacher.arch` trained into
    `OUTPUT/teacher` first (reused when that folder already holds a finished teacher), within
    `budget` when given (`train.fit`); a teacher trained here is reported (`report_teacher`)."""
    if cfg.teacher.path is not None:  # a folder, file, URL or name; fine-tuned when asked
        return teacher_source.resolve_given(cfg, train_src, val_src, resume, budget)
    name = cfg.teacher.arch
    if name not in TEACHERS and name not in REGNETS:
        near = close_names(name, teacher_source.teacher_names())
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(
            f"teacher.arch {name!r}; {hint}expected one of {', '.join([*TEACHERS, *REGNETS])}"
        )
    out = Path(cfg.output).absolute() / "teacher"
    final = out / "final"
    if not (final / export.CONFIG).is_file():
        tcfg = teacher_config(cfg, out)
        model = create_teacher(name, len(train_src.classes), small_input=cfg.data.img_size < 64)
        again = resume or (out / "checkpoints").is_dir()
        if again and (out / "config.json").is_file():  # the epochs a budget sized, kept
            epochs = json.loads((out / "config.json").read_text())["optim"]["epochs"]
            tcfg = dataclasses.replace(tcfg, optim=dataclasses.replace(tcfg.optim, epochs=epochs))
        tick = time.perf_counter()
        results = fit(model, tcfg, train_src, val_src, resume=again, title="teacher", budget=budget)
        if jax.process_index() == 0:
            report_teacher(results, time.perf_counter() - tick, cfg.progress)
    return teacher_from_export(final), final


def teacher_words(results: dict[str, Any], seconds: float) -> tuple[str, str | None]:
    """What the teacher phase ended with, and a warning when the teacher looks weak: below
    `WEAK_TEACHER` top-1 and still rising when it stopped (its best at its last evaluation)."""
    top1 = results["val"]["avg"]["top1"]
    best = results["best"]
    epochs = results.get("epochs", best["epoch"] + 1)
    why = "its validation top-1 levelled off" if results.get("stopped_early") else "its epochs ran"
    line = (
        f"teacher: {top1:.1f}% top-1 on validation after {epochs} epoch(s) in "
        f"{progress.duration(seconds)} ({why}; best {best['top1']:.1f}% after epoch "
        f"{best['epoch'] + 1})"
    )
    rising = not results.get("stopped_early") and best["epoch"] + 1 >= epochs
    warning = None
    if top1 < WEAK_TEACHER and rising:
        warning = (
            f"warning: the teacher reached only {top1:.1f}% and was still improving when it "
            "stopped: hard distillation pulls the student's distillation head toward its "
            "mistakes, and a fresh student may do better alone. Give a longer --time-budget (or "
            "--teacher-epochs), a trained --teacher, or --distillation none"
        )
    elif top1 < WEAK_TEACHER:
        warning = (
            f"warning: the teacher reached only {top1:.1f}% top-1: the student's distillation "
            "head learns its mistakes; a stronger --teacher, or --distillation none, may do better"
        )
    return line, warning


def report_teacher(results: dict[str, Any], seconds: float, mode: progress.Mode) -> None:
    """The teacher's accuracy, said before the student starts (`teacher_words`)."""
    line, warning = teacher_words(results, seconds)
    progress.say(line, mode)
    if warning:
        log.warning(warning)


def _steps(folder: Path) -> list[int]:
    """Finished Orbax checkpoints in `folder` (a step folder is renamed to its bare number only
    once it is complete)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def saved_progress(output: str | Path) -> str | None:
    """What `deit train --resume --output OUTPUT` would continue from, in words, or None when
    nothing there can be resumed (no checkpoint of the student or the teacher, no finished
    teacher or run)."""
    out = Path(output).absolute()
    if (out / "final" / export.CONFIG).is_file():
        return f"a finished run ({out / 'final'})"
    if steps := _steps(out / "checkpoints"):
        return f"the student's checkpoint at step {steps[-1]}"
    if (out / "teacher" / "final" / export.CONFIG).is_file():
        return "the trained teacher (the student starts)"
    if steps := _steps(out / "teacher" / "checkpoints"):
        return f"the teacher's checkpoint at step {steps[-1]}"
    return None


def check_resumable(output: str | Path) -> str:
    """`saved_progress`, or an InputError naming the folder and what it holds: a resume never
    silently starts a fresh run (a mistyped output folder would go unnoticed)."""
    out = Path(output).absolute()
    found = saved_progress(out)
    if found is not None:
        return found
    if not out.is_dir():
        held = "it does not exist"
    else:
        names = sorted(
            p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != runlock.LOCK
        )
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        held = f"it holds {shown}" if names else "it is empty"
    raise InputError(
        f"nothing to resume in {out}: no checkpoint of a run ({held}); expected the output "
        "folder of a stopped run, or start a new run without resume"
    )


def _teacher_plan(cfg: TrainConfig, out: Path) -> str:
    if cfg.loss.distillation == "none":
        return "none (no distillation)"
    if cfg.teacher.path is not None:
        return f"loaded from {cfg.teacher.path}"
    final = out / "teacher" / "final"
    if (final / export.CONFIG).is_file():
        return f"{cfg.teacher.arch}, reused from {final}"
    steps = _steps(out / "teacher" / "checkpoints")
    again = f", continuing from its step {steps[-1]}" if steps else ""
    upto = "up to " if cfg.time_budget else ""
    return (
        f"{cfg.teacher.arch}, trained first for {upto}{cfg.teacher.optim.epochs} epoch(s) into "
        f"{out / 'teacher'}{again}"
    )


def budget_text(cfg: TrainConfig) -> str:
    """How `cfg.time_budget` is split, for the header."""
    total = budget_lib.parse_duration(cfg.time_budget or "0s")
    share = budget_lib.teacher_budget(total, cfg.teacher.optim.epochs)
    d = progress.duration
    teacher = (
        f"the teacher {d(share.seconds)}, or up to {d(share.max_seconds or 0)} if its first "
        f"{share.min_epochs} epochs need it (it stops earlier once its validation top-1 "
        "levels off), "
        if cfg.loss.distillation != "none" and cfg.teacher.path is None
        else ""
    )
    return (
        f"{d(total)} (time_budget) from launch: {teacher}the student the rest; each phase's "
        f"epochs (at most {cfg.teacher.optim.epochs} / {cfg.epochs}) are sized from its first "
        "epoch's measured time"
    )


def _lr_text(optim: OptimConfig, batch: int) -> str:
    lr = scaled_lr(optim, batch)
    if optim.lr is not None:
        return f"lr {lr:.3g} (optim.lr)"
    return f"lr {lr:.3g} (optim.base_lr {optim.base_lr:g} x {batch} / {REFERENCE_BATCH})"


def _precision_text(dtype: str, platform: str) -> str:
    default = "bfloat16" if platform == "gpu" else "float32"
    why = f" (the {platform} default; --dtype to change)" if dtype == default else ""
    return f"{dtype} compute{why}, float32 parameters"


def announce(
    cfg: TrainConfig,
    student: Any,
    train_src: data_lib.RecordSource,
    val_src: data_lib.RecordSource,
    *,
    why: str | None = None,
) -> None:
    """The run's plan on stderr before any work (`progress.header`), and warnings for settings
    that make a run that cannot learn (an lr scaled too low, a teacher longer than the student).
    A batch larger than the training set is an InputError naming the batch that fits."""
    out = Path(cfg.output).absolute()
    mesh = parallel.make_mesh()
    batch, devices = cfg.batch_size, mesh.devices.size
    if batch > len(train_src):
        raise InputError(
            f"batch_size {batch} is larger than the {len(train_src)} training images of "
            f"{cfg.data.dataset}; expected batch_size "
            f"{parallel.fitting_batch(len(train_src), mesh)} or less"
        )
    size = cfg.data.img_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    count = param_count(jax.eval_shape(student.init, jax.random.PRNGKey(0), x)["params"])
    kind = jax.devices()[0].platform
    rows = [
        ("recipe", f"{cfg.recipe}" + (f" ({why})" if why else "")),
        ("model", f"{cfg.model.name}, {count:,} parameters"),
        (
            "data",
            f"{cfg.data.dataset}: {len(train_src.classes)} classes, {len(train_src):,} train / "
            f"{len(val_src):,} val images at {size}x{size}",
        ),
        (
            "teacher",
            teacher_source.plan(cfg, out, len(train_src.classes)) or _teacher_plan(cfg, out),
        ),
        *([("budget", budget_text(cfg))] if cfg.time_budget else []),
        (
            "batch",
            f"{batch} global ({batch // devices} per device), {len(train_src) // batch} steps "
            f"per epoch, {'up to ' if cfg.time_budget else ''}{cfg.epochs} epochs; "
            f"{_lr_text(cfg.optim, batch)}",
        ),
        ("precision", _precision_text(cfg.model.dtype, kind)),
        ("devices", f"{devices} {kind} device(s), {jax.process_count()} process(es)"),
        ("output", str(out)),
    ]
    if jax.process_index() == 0:
        progress.say(f"training {cfg.model.name} on {cfg.data.dataset}:", cfg.progress)
        progress.header(rows, cfg.progress)
    trains_teacher = (
        cfg.loss.distillation != "none"
        and cfg.teacher.path is None
        and not (out / "teacher" / "final" / export.CONFIG).is_file()
    )
    lrs = [("optim", cfg.optim)] + (
        [("teacher.optim", cfg.teacher.optim)] if trains_teacher else []
    )
    for name, optim in lrs:
        lr = scaled_lr(optim, batch)
        if optim.lr is None and lr < LOW_LR:
            log.warning(
                f"warning: the lr scales to {lr:.2g} ({name}.base_lr {optim.base_lr:g} x batch "
                f"{batch} / {REFERENCE_BATCH}), below {LOW_LR:g}: training will barely move; "
                f"set {name}.lr (an absolute lr) or a larger {name}.base_lr"
            )
    if trains_teacher and cfg.teacher.optim.epochs > cfg.epochs:
        log.warning(
            f"warning: the teacher trains first for {cfg.teacher.optim.epochs} epochs, longer "
            f"than the student's {cfg.epochs}; set teacher.optim.epochs, give a trained "
            "teacher.path, or loss.distillation none"
        )


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """An exported DeiT to start a run from: its module, its params and the folder it came from."""

    model: DeiT
    params: dict
    path: str


def adapt_params(params: dict, src: DeiT, dst: DeiT, *, rng: int | jax.Array = 0) -> dict:
    """`src`'s params fitted to `dst`: the same network at another resolution or class count.

    `pos_embed (1, prefix + N_src, D)` is resampled to `dst.grid` (bicubic on the patch grid,
    the cls/dist rows kept as they are; `model.resample_pos_embed`), and the heads are freshly
    initialised from `rng` when the class count differs; everything else is copied. This is what
    the official `main.py --finetune` does: it interpolates the position embedding and drops
    `head` / `head_dist` of the wrong shape.
    """
    fields = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "in_chans", "distilled")
    fields += ("with_dist_head",)
    differ = [
        f"{f} {getattr(src, f)} -> {getattr(dst, f)}"
        for f in fields
        if getattr(src, f) != getattr(dst, f)
    ]
    if differ:
        raise InputError(
            f"cannot start from this checkpoint: the architecture differs ({', '.join(differ)}); "
            "only the image size and the class count may change"
        )
    out = dict(params)
    out["pos_embed"] = resample_pos_embed(
        params["pos_embed"], dst.grid, src.num_prefix_tokens, old_grid=src.grid
    )
    if src.num_classes != dst.num_classes:
        fresh = init_params(dst, rng)
        for head in ("cls_head", "dist_head"):
            out.pop(head, None)
            if head in fresh:
                out[head] = fresh[head]
    return out


def train_and_evaluate(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    pretrained: Pretrained | None = None,
    why: str | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """`deit train`: data, optional teacher, the student; writes `OUTPUT/results.json`.

    With `pretrained` the student is that network (at `cfg`'s image size and the data's class
    count, see `adapt_params`) and starts from its weights instead of a fresh init. `resume`
    needs something saved in `cfg.output` (`check_resumable`). `why` says why the recipe was
    chosen, for the header (`announce`). `cfg.time_budget` counts from `started` (a
    `time.perf_counter()` value; `deit train` passes its launch), else from this call.

    SIGINT/SIGTERM stop every phase (teacher, student, their evaluations) within seconds
    (`deit.signals`); the `Interrupted` raised names `cfg.output`, the folder to resume,
    whichever phase stopped.
    """
    cfg = configs.resolve_dtype(cfg, jax.default_backend())
    cfg = teacher_source.given(cfg)  # --teacher-model regnety_160 alone: its pretrained weights
    out = Path(cfg.output).absolute()
    if resume and not out.is_dir():
        check_resumable(out)  # said before the lock would create the folder
    # Process 0 writes the folder's files: before it writes any, no other live run may hold it.
    with (
        RunLock(out) if jax.process_index() == 0 else contextlib.nullcontext(),
        StopSignals(),
    ):
        if resume:  # under the lock: a live run in the folder is named first
            check_resumable(out)
        try:
            return _train_and_evaluate(cfg, out, resume, pretrained, why, started)
        except Interrupted as stop:
            stop.run_output = out
            saved = saved_progress(out) is not None
            stop.resume = f"deit train --resume --output {out}" if saved else None
            raise


def _train_and_evaluate(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    pretrained: Pretrained | None,
    why: str | None,
    started: float | None,
) -> dict[str, Any]:
    launched = time.perf_counter() if started is None else started
    if jax.process_index() == 0 and (resume or not (out / "config.json").exists()):
        # Before the teacher phase, so that `resume` finds the run's settings from the start.
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(configs.to_dict(cfg), indent=2) + "\n")
    train_src, val_src = data_lib.load_sources(cfg.data)
    num_classes = len(train_src.classes)
    init = None
    if pretrained is None:
        student = create_model(
            cfg.model.name,
            num_classes=num_classes,
            img_size=cfg.data.img_size,
            drop_path_rate=cfg.model.drop_path_rate,
            dtype=cfg.model.dtype,
            remat=cfg.model.remat,
        )
    else:
        student = pretrained.model.clone(
            num_classes=num_classes,
            img_size=cfg.data.img_size,
            drop_path_rate=cfg.model.drop_path_rate,
            dtype=cfg.model.dtype,
            remat=cfg.model.remat,
            capture=False,
        )
        init = adapt_params(pretrained.params, pretrained.model, student, rng=cfg.seed)
    announce(cfg, student, train_src, val_src, why=why)
    total = budget_lib.parse_duration(cfg.time_budget) if cfg.time_budget and not resume else None
    spent = lambda: time.perf_counter() - launched
    teacher, teacher_path, teacher_val = None, None, None
    if cfg.loss.distillation != "none":
        share = None
        if total is not None:
            share = budget_lib.teacher_budget(total, cfg.teacher.optim.epochs).less(spent())
        teacher, teacher_path = resolve_teacher(cfg, train_src, val_src, resume, share)
        check_teacher(teacher, num_classes)
        if cfg.teacher.dtype is not None:
            teacher = teacher.with_dtype(cfg.teacher.dtype)
        # Before the student, so that its share of a budget is what is truly left.
        teacher_val = run_eval(
            make_teacher_eval_step(teacher, cfg.model.dtype),
            val_src,
            cfg.data,
            parallel.make_mesh(),
            cfg.batch_size,
            phase="the teacher's evaluation",
        )["avg"]
    rest = None
    if total is not None:
        left = total - spent() - budget_lib.TAIL_SECONDS
        rest = budget_lib.PhaseBudget(max(left, 0.0), max_epochs=cfg.epochs, strict=True)
        progress.say(
            f"student: {progress.duration(max(left, 0.0))} of the time budget left; its epochs "
            "are sized after the first one",
            cfg.progress,
        )
    results = fit(
        student,
        cfg,
        train_src,
        val_src,
        teacher=teacher,
        resume=resume,
        budget=rest,
        extra_meta={
            "variant": cfg.model.name,
            **({"finetuned_from": pretrained.path} if pretrained else {}),
        },
        init_params=init,
    )
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "distillation": cfg.loss.distillation,
        "epochs": results.get("epochs", cfg.epochs),
        "seed": cfg.seed,
        "val": results["val"],
    }
    if "val_ema" in results:
        summary["val_ema"] = results["val_ema"]
    summary["best"] = results["best"]
    summary["bad_images"] = results["bad_images"]
    if pretrained is not None:
        summary["finetuned_from"] = pretrained.path
    if teacher is not None:
        summary["teacher"] = teacher_val
        summary["teacher_path"] = str(teacher_path)
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        from deit.visualize import plot_curves

        plot_curves(out)
    return summary


def _variant_at(name: str | None, img_size: int) -> str:
    """The registered name of variant `name` at `img_size` (base 224 -> base 384), if any."""
    spec = VARIANTS.get(name or "")
    if spec is None:
        return name or "DeiT"
    keys = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "distilled")
    same = [
        n
        for n, s in VARIANTS.items()
        if s.img_size == img_size and all(getattr(s, k) == getattr(spec, k) for k in keys)
    ]
    return same[0] if same else name


def finetune(
    cfg: TrainConfig,
    checkpoint: str | Path,
    *,
    resume: bool = False,
    why: str | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """`deit train --finetune CKPT`: `train_and_evaluate` from an exported DeiT.

    `checkpoint` is a `deit convert` output or a run (its `final/`). The network is the
    checkpoint's, at `cfg.data.img_size` with the data's class count (`adapt_params`); its
    normalisation (mean, std) is kept, since the weights were trained on it. Everything else
    (optimiser, augmentation, `loss.distillation`, `teacher`) comes from `cfg`.
    """
    folder = exported_folder(checkpoint)
    model, variables, config = load_exported(folder)
    if not isinstance(model, DeiT):
        raise InputError(f"{folder} holds a {type(model).__name__}; finetune needs a DeiT")
    prep = export.Preprocessing.from_config(config, model)  # the weights' own normalisation
    cfg = dataclasses.replace(
        cfg,
        finetune=str(checkpoint),
        model=dataclasses.replace(
            cfg.model, name=_variant_at(config.get("variant"), cfg.data.img_size)
        ),
        data=dataclasses.replace(cfg.data, mean=prep.mean, std=prep.std),
    )
    pretrained = Pretrained(model, variables["params"], str(folder.absolute()))
    return train_and_evaluate(cfg, resume=resume, pretrained=pretrained, why=why, started=started)
