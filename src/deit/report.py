"""What a run tells its user: the header before any work (`announce`), the teacher's line before
the student starts (`report_teacher`), and the results table (`results_rows`, `results_table`)
that `deit train` / `deit eval` print and `visualize.plot_results` draws.

Above `progress` (which draws bars and lines and knows nothing of runs): the header reads the
config tree, the mesh and the network, which the data pipeline's use of `progress` must not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from deit import budget as budget_lib
from deit import checkpoint, parallel, progress
from deit import data as data_lib
from deit.configs import TrainConfig
from deit.errors import InputError
from deit.export import CONFIG
from deit.model import param_count
from deit.optim import REFERENCE_BATCH, OptimConfig, scaled_lr

log = logging.getLogger("deit")
# A peak lr below this barely moves a network in the epochs a run has (the 40-image
# folder at batch 16 scaled the recipe's 5e-4 down to 1.6e-5 and stayed at chance).
LOW_LR = 1e-5
# A teacher below this top-1 that was still rising when its share of the budget ended is
# likely worse than the student would be alone (issue 25: a 73% teacher, still climbing, left
# its student at 34%): the run says so before the student starts.
WEAK_TEACHER = 90.0


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


def _teacher_plan(cfg: TrainConfig, out: Path) -> str:
    if cfg.loss.distillation == "none":
        return "none (no distillation)"
    if cfg.teacher.path is not None:
        return f"loaded from {cfg.teacher.path}"
    final = out / "teacher" / "final"
    if (final / CONFIG).is_file():
        return f"{cfg.teacher.arch}, reused from {final}"
    steps = checkpoint.finished_steps(out / "teacher" / "checkpoints")
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
    teacher_row: str | None = None,
) -> None:
    """The run's plan on stderr before any work (`progress.header`), and warnings for settings
    that make a run that cannot learn (an lr scaled too low, a teacher longer than the student).
    A batch larger than the training set is an InputError naming the batch that fits.
    `teacher_row` replaces the teacher's row (a teacher given by name, URL or file)."""
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
        ("teacher", teacher_row or _teacher_plan(cfg, out)),
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
        and not (out / "teacher" / "final" / CONFIG).is_file()
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


def results_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """`(row name, {"top1", "top5", ...})` of a run's `results.json` (or `{"val": ...}` of
    `deit eval`), teacher first."""
    rows = [("teacher", summary["teacher"])] if "teacher" in summary else []
    names = {"cls": "class head", "dist": "distillation head", "avg": "averaged heads"}
    for split, suffix in (("val", ""), ("val_ema", " (EMA)")):
        heads = summary.get(split, {})
        for head, name in names.items():
            # A plain model's "avg" is its class head again: shown once.
            if head in heads and not (head == "avg" and "dist" not in heads):
                rows.append((name + suffix, heads[head]))
    return rows


def results_table(summary: dict[str, Any]) -> str:
    """`results_rows` as the text table `deit train` and `deit eval` print."""
    lines = [f"{'':24} {'top-1':>7} {'top-5':>7}"]
    lines += [f"{name:24} {m['top1']:7.2f} {m['top5']:7.2f}" for name, m in results_rows(summary)]
    return "\n".join(lines)
