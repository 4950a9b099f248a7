"""Training: the loop (`fit`) around the jitted step, from the first batch to the final export.

The step and its state are `train_step.py`'s, the checks before any work and the run folder's
files `run_folder.py`'s; their names stay importable from here (`train.TrainState`, ...). The
loop, with its evaluation, checkpoint cadence, non-finite check and time budget, reads as one
piece.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp

from deit import budget as budget_lib
from deit import data as data_lib
from deit import evaluate as eval_lib
from deit import parallel
from deit.checkpoint import Checkpoints, abstract_like
from deit.compiler import compiler_options
from deit.configs import TrainConfig
from deit.errors import InputError
from deit.evaluate import make_eval_step
from deit.optim import create_optimizer
from deit.progress import RunLogger, duration
from deit.run_folder import OpenedRun, export_weights, open_run, write_config
from deit.signals import Interrupted, Stop, StopSignals
from deit.teacher import Teacher
from deit.train_step import (
    StepConfig,
    TrainState,
    evaluate_state,
    init_state,
    make_train_step,
    weight_sets,
    with_finite_flag,
)

__all__ = [
    "OpenedRun",
    "StepConfig",
    "TrainState",
    "evaluate_state",
    "fit",
    "init_state",
    "make_train_step",
    "open_run",
    "weight_sets",
    "with_finite_flag",
]


def _check_finite(first_bad: jax.Array, ckpts: Checkpoints) -> None:
    """Stop before a non-finite state can be checkpointed or exported (the last checkpoint
    written stays good); a host sync, done only where the loop waits for the device anyway."""
    bad = int(first_bad)
    if bad >= 0:
        ckpts.wait()
        last = ckpts.latest_step()
        raise FloatingPointError(
            f"the loss or the parameters became non-finite (NaN/inf) at step {bad}; stopped "
            f"without saving them. The last good checkpoint (step {last}) is in "
            f"{ckpts.directory}. Lower optim.base_lr or set optim.clip_grad_norm, then resume "
            "the run"
        )


def fit(
    model: Any,
    cfg: TrainConfig,
    train_src: data_lib.RecordSource,
    val_src: data_lib.RecordSource,
    *,
    teacher: Teacher | None = None,
    resume: bool = False,
    title: str = "student",
    extra_meta: dict[str, Any] | None = None,
    init_params: dict | None = None,
    budget: budget_lib.PhaseBudget | None = None,
) -> dict[str, Any]:
    """Train `model` on `train_src` with `cfg`, evaluating on `val_src` every epoch.

    `init_params` start the run instead of a fresh init (fine-tuning); a resumed run ignores them.
    With `budget` (a fresh run) `cfg.optim.epochs` is the most it runs: after the first epoch the
    epochs that fit in `budget.seconds` are fixed (`budget.epochs_within`), the schedule is laid
    over them and `config.json` records them; with `budget.plateau` the run also stops once its
    validation top-1 levels off (`budget.Plateau`).
    The teacher's variables are placed on the mesh once, like the student's (replicated, or
    split the same way under `cfg.fsdp`). One grain pipeline (`data.run_batches`) feeds the
    whole run, each epoch's validation batches following its training batches.

    Writes to `cfg.output`: `config.json` (`cfg`: what the run uses), `metrics.jsonl` (its
    first line, `kind: start`, says how long the first batch took from here), TensorBoard events,
    `checkpoints/` (Orbax), `best/` and
    `final/` (exported models, see `export.py`). Returns the final evaluation, with
    `bad_images`: the unreadable files replaced under `bad_images="skip"`.
    """
    started: float | None = time.perf_counter()
    clock = budget_lib.EpochClock(started)
    opened = open_run(cfg, train_src, val_src, teacher=teacher, resume=resume)
    out, mesh, ckpts = opened.out, opened.mesh, opened.ckpts
    spe, latest = opened.steps_per_epoch, opened.latest
    if latest is not None:
        budget = None  # a resumed run keeps the epochs its config.json records
    global_batch = cfg.batch_size
    total = cfg.epochs * spe
    tx, schedule = create_optimizer(cfg.optim, global_batch, spe)
    step_cfg = StepConfig(
        num_classes=len(train_src.classes),
        mean=cfg.data.mean,
        std=cfg.data.std,
        mixup=cfg.mixup,
        # 3-Augment replaces random erasing as it does RandAugment (official `--ThreeAugment`)
        erasing=replace(cfg.erasing, prob=0.0) if cfg.data.three_augment else cfg.erasing,
        loss=cfg.loss,
        ema=cfg.ema,
    )
    # Started before the state is built and compiled, so the workers start meanwhile.
    stream = data_lib.run_batches(
        train_src,
        val_src,
        cfg.data,
        seed=cfg.seed,
        global_batch=global_batch,
        epochs=cfg.epochs,
        start_step=latest or 0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    logger = None
    try:
        image_shape = (cfg.data.img_size, cfg.data.img_size, 3)
        state = init_state(model, tx, step_cfg, cfg.seed, image_shape, init_params)
        shardings = parallel.state_shardings(state, mesh, cfg.parallel.fsdp)
        state = jax.device_put(state, shardings)
        best = {"top1": -1.0, "epoch": -1}
        if latest is not None:
            state, saved = ckpts.restore(abstract_like(state))
            best = saved.get("best", best)
            classes = saved.get("classes")
            if classes is not None and classes != list(train_src.classes):
                raise InputError(
                    f"the checkpoint in {ckpts.directory} was trained on {len(classes)} classes "
                    f"{classes[:3]}... but the data has {len(train_src.classes)} "
                    f"{list(train_src.classes)[:3]}...; expected the same class list"
                )
        meta = lambda best, epoch: {
            "best": best,
            "epoch": epoch,
            "classes": list(train_src.classes),
        }
        if teacher is not None:
            teacher = jax.device_put(
                teacher, parallel.state_shardings(teacher, mesh, cfg.parallel.fsdp)
            )
        compile_step = lambda tx, schedule: jax.jit(
            with_finite_flag(make_train_step(model, tx, schedule, step_cfg)),
            donate_argnums=(0, 3),
            out_shardings=(shardings, None, parallel.replicated(mesh)),
            compiler_options=compiler_options(model.dtype),
        )
        train_step = compile_step(tx, schedule)
        first_bad = jax.device_put(jnp.int32(-1), parallel.replicated(mesh))
        eval_step = jax.jit(
            make_eval_step(model, step_cfg.mean, step_cfg.std),
            compiler_options=compiler_options(model.dtype),
        )
        logger = RunLogger(
            out,
            title=title,
            total_steps=total,
            epochs=cfg.epochs,
            mode=cfg.progress,
            enabled=jax.process_index() == 0,
        )
        logger.sized_later = budget is not None
    except BaseException:
        stream.close()
        ckpts.close()
        if logger is not None:
            logger.close()
        raise
    step = saved = int(state.step)
    results: dict[str, Any] = {}
    stop = StopSignals()
    epoch, evaluating = step // spe, False
    bad = data_lib.SkippedImages()
    eval_steps = -(-len(val_src) // global_batch)
    sums: eval_lib.SetSums | None = None  # the evaluation under way
    tick, seen, begin = time.perf_counter(), 0, step
    plateau: budget_lib.Plateau | None = None  # with budget.plateau, once the run is sized

    def resize(cfg: TrainConfig, epochs: int) -> tuple[TrainConfig, Any, Any, Any]:
        """`cfg` with `epochs`, the schedule laid over them and the step compiled for it; the
        logger and config.json say so."""
        cfg = replace(cfg, optim=replace(cfg.optim, epochs=epochs))
        tx, schedule = create_optimizer(cfg.optim, global_batch, spe)
        logger.resize(epochs * spe, epochs)
        write_config(out, cfg)
        clock.recompiled()
        return cfg, tx, schedule, compile_step(tx, schedule)

    ended_early = False
    interrupted = lambda: Interrupted(
        stop.requested,
        f"{title} {'evaluation' if evaluating else 'training'}, epoch {epoch + 1}",
        step=step,
        checkpoints=ckpts.directory if step > 0 else None,
        output=out,
    )
    try:
        # `stop.batches` raises `Stop` only where the loop waits for a batch: the state is then
        # that of `step`, complete. An evaluation cut short is not repeated on resume.
        for kind, epoch, batch in stop.batches(stream):
            source = train_src if kind == "train" else val_src
            bad.add(source, *parallel.take_bad(batch, source, cfg.data.bad_images))
            if started is not None:
                logger.log_start({"first_batch_s": time.perf_counter() - started})
                started = None
            if kind == "eval":
                if sums is None:  # the epoch's first validation batch: the weights are final
                    sums = eval_lib.SetSums(eval_step, weight_sets(state), state.batch_stats)
                sums.add(parallel.put_batch(batch, mesh))
                if sums.batches == 1:
                    clock.mark("first_eval")
                if sums.batches < eval_steps:
                    continue
                _check_finite(first_bad, ckpts)  # before its results, the best/ export, the save
                results = sums.result()
                clock.mark("eval_end")
                sums, evaluating = None, False
                logger.log_eval(step, epoch, results)
                which = max(results, key=lambda k: results[k]["avg"]["top1"])
                if results[which]["avg"]["top1"] > best["top1"]:
                    top1 = results[which]["avg"]["top1"]
                    best = {"top1": top1, "epoch": epoch, "weights": which}
                    ema = which == "val_ema"
                    export_weights(out / "best", model, state, ema, train_src, cfg, extra_meta)
                ckpts.save(step, state, meta(best, epoch), wait=stop.requested is not None)
                saved = step
                clock.epoch_end()
                if budget is not None and clock.mark("saved"):  # the first epoch: size the run
                    epochs = budget_lib.epochs_within(
                        budget, clock.elapsed(), clock.epoch_time(spe, eval_steps)
                    )
                    logger.note(clock.sizing_text(title, budget, spe, eval_steps, epochs))
                    if epochs != cfg.epochs:
                        cfg, tx, schedule, train_step = resize(cfg, epochs)
                    if budget.plateau:
                        plateau = budget_lib.Plateau(budget_lib.patience_for(epochs))
                        plateau.update(results["val"]["avg"]["top1"])
                elif budget is not None and budget.strict and epoch + 1 < cfg.epochs:
                    per = clock.measured_epoch() or 0.0  # 0: not yet measured, no trim
                    epochs = budget_lib.trimmed_epochs(
                        budget, clock.elapsed(), epoch + 1, cfg.epochs, per
                    )
                    if epochs < cfg.epochs:
                        logger.note(
                            f"[{title}] an epoch now takes {duration(per)}: {epochs} "
                            f"epoch(s) in all instead of {cfg.epochs}, to end within the time "
                            "budget"
                        )
                        cfg, tx, schedule, train_step = resize(cfg, epochs)
                elif (
                    plateau is not None
                    and plateau.update(results["val"]["avg"]["top1"])
                    and epoch + 1 < cfg.epochs
                ):
                    logger.note(plateau.text(title, epoch + 1, cfg.epochs))
                    ended_early = True
                    break
                if epoch + 1 >= cfg.epochs:
                    break
                tick, seen = time.perf_counter(), 0
                continue
            del batch["mask"]
            state, metrics, first_bad = train_step(
                state, parallel.put_batch(batch, mesh), teacher, first_bad
            )
            step += 1
            seen += global_batch
            logger.advance(step)
            last = step % spe == 0
            evaluating = last
            # The epoch's last step is saved after its evaluation (with the new best); a signal
            # that comes first stops the run at the next wait (`Stop`, below), which saves it.
            saving = step % cfg.checkpoint_every == 0 and not last
            if saving or step % cfg.log_every == 0 or last or step == begin + 1:
                _check_finite(first_bad, ckpts)
                if saving:  # first: a full disk is then reported as the save's
                    ckpts.save(step, state, meta(best, epoch))
                    saved = step
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["img_per_s"] = seen / max(now - tick, 1e-9)
                values["bad_images"] = bad.count
                tick, seen = now, 0
                if step % cfg.log_every == 0 or last or saving:
                    logger.log_train(step, epoch, values)
                else:  # the first step, compiled and run: the time estimate starts here
                    logger.first_step(step)
                if step == begin + 1:
                    clock.mark("first_step")
                if last:
                    clock.mark("train_end")
        ckpts.wait()
        _check_finite(first_bad, ckpts)
        if not results:  # resumed a finished run: evaluate what it ended with
            results = evaluate_state(eval_step, state, val_src, cfg.data, mesh, global_batch)
        export_weights(out / "final", model, state, False, train_src, cfg, extra_meta)
    except Stop:
        _check_finite(first_bad, ckpts)
        if step > saved:
            ckpts.save(step, state, meta(best, epoch), wait=True)
        ckpts.wait()
        raise interrupted() from None
    finally:
        stream.close(now=stop.requested is not None or ended_early)
        stop.restore()
        ckpts.close()
        logger.close()
    results["best"] = best
    results["steps"] = step
    results["epochs"] = step // spe
    results["stopped_early"] = ended_early
    results["bad_images"] = bad.report()
    return results
