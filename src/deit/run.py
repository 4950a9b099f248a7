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

from deit import budget as budget_lib
from deit import checkpoint, configs, export, parallel, pretrained, progress, report, teacher_source
from deit import data as data_lib
from deit.configs import TrainConfig
from deit.errors import InputError
from deit.evaluate import make_teacher_eval_step, run_eval
from deit.model import DeiT, adapt_params, create_model
from deit.regnet import REGNETS, close_names
from deit.runlock import RunLock
from deit.signals import Interrupted, StopSignals
from deit.teacher import TEACHERS, Teacher, check_teacher, create_teacher
from deit.teacher_source import teacher_config
from deit.train import fit
from deit.variants import ALIASES, VARIANTS, variant_at

log = logging.getLogger("deit")


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
            report.report_teacher(results, time.perf_counter() - tick, cfg.progress)
    return pretrained.open_model(final).as_teacher(), final


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """An exported DeiT to start a run from: its module, its params and the folder it came from."""

    model: DeiT
    params: dict
    path: str


def check_student(cfg: TrainConfig, pretrained: Pretrained | None) -> None:
    """Refuse, before any work, distillation into a DeiT III (`init_values` set): it has no
    distillation token, and its paper trains it without a teacher (DeiT III §3)."""
    if cfg.loss.distillation == "none":
        return
    if pretrained is not None:
        student, name = pretrained.model, pretrained.path
    else:
        student, name = VARIANTS.get(ALIASES.get(cfg.model.name, cfg.model.name)), cfg.model.name
    if student is not None and getattr(student, "init_values", None) is not None:
        raise InputError(
            f"distillation {cfg.loss.distillation!r} into {name}: a DeiT III student has no "
            "distillation token; expected --distillation none, or a DeiT student"
        )


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
    check_student(cfg, pretrained)
    out = Path(cfg.output).absolute()
    if resume and not out.is_dir():
        checkpoint.check_resumable(out)  # said before the lock would create the folder
    # Process 0 writes the folder's files: before it writes any, no other live run may hold it.
    with (
        RunLock(out) if jax.process_index() == 0 else contextlib.nullcontext(),
        StopSignals(),
    ):
        if resume:  # under the lock: a live run in the folder is named first
            checkpoint.check_resumable(out)
        try:
            return _train_and_evaluate(cfg, out, resume, pretrained, why, started)
        except Interrupted as stop:
            stop.run_output = out
            saved = checkpoint.saved_progress(out) is not None
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
    fields = dict(
        num_classes=num_classes,
        img_size=cfg.data.img_size,
        drop_path_rate=cfg.model.drop_path_rate,
        drop_path_schedule=cfg.model.drop_path_schedule,
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
    )
    init = None
    if pretrained is None:
        student = create_model(cfg.model.name, **fields)
    else:
        student = pretrained.model.clone(**fields, capture=False)
        init = adapt_params(pretrained.params, pretrained.model, student, rng=cfg.seed)
    row = teacher_source.plan(cfg, Path(cfg.output).absolute(), len(train_src.classes))
    report.announce(cfg, student, train_src, val_src, why=why, teacher_row=row)
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
    opened = pretrained.open_model(checkpoint)
    if not isinstance(opened.model, DeiT):
        raise InputError(
            f"{opened.folder} holds a {type(opened.model).__name__}; finetune needs a DeiT"
        )
    prep = opened.preprocessing  # the weights' own normalisation
    cfg = dataclasses.replace(
        cfg,
        finetune=str(checkpoint),
        model=dataclasses.replace(
            cfg.model, name=variant_at(opened.config.get("variant"), cfg.data.img_size)
        ),
        data=dataclasses.replace(cfg.data, mean=prep.mean, std=prep.std),
    )
    start = Pretrained(opened.model, opened.variables["params"], str(opened.folder.absolute()))
    return train_and_evaluate(cfg, resume=resume, pretrained=start, why=why, started=started)
