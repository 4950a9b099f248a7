"""Training: the train state, the pure jitted step, and the loop around it (`fit`).

One step (DeiT §5-6): normalise -> random erasing -> mixup/cutmix with label smoothing -> student
(train mode) and teacher (eval mode, the same mixed images through its own normalisation, under
`stop_gradient`) -> `deit_loss` -> AdamW -> EMA. Randomness is `fold_in(key, step)`, so the step is
a function of `(state, batch)` alone and a resumed run repeats an uninterrupted one.
The same loop trains the CNN teacher (a model with BatchNorm statistics and no distillation).

Over 400 lines: the loop, with its evaluation, checkpoint cadence, non-finite check and time
budget, reads as one piece; what it needs before it starts is `open_run`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deit import budget as budget_lib
from deit import configs, diskspace, export, parallel
from deit import data as data_lib
from deit import evaluate as eval_lib
from deit.checkpoint import Checkpoints, abstract_like, least_free, state_bytes
from deit.compiler import compiler_options
from deit.configs import TrainConfig
from deit.data.device import ErasingConfig, MixupConfig, mixup_cutmix, normalize, random_erasing
from deit.errors import InputError
from deit.evaluate import make_eval_step
from deit.losses import LossConfig, deit_loss
from deit.model import forward
from deit.optim import EmaConfig, create_optimizer, ema_decay_at, ema_update
from deit.progress import RunLogger, duration
from deit.signals import Interrupted, Stop, StopSignals
from deit.teacher import Teacher, teacher_logits

log = logging.getLogger("deit")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any  # BatchNorm statistics ({} for DeiT)
    ema_params: Any  # None without EMA
    rng: jax.Array


@dataclass(frozen=True)
class StepConfig:
    """What the jitted step needs besides the state and the batch (static under jit)."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mixup: MixupConfig
    erasing: ErasingConfig
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(enabled=False))


def init_state(
    model: Any,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    seed: int,
    image_shape: tuple[int, ...],
    params: Any = None,
) -> TrainState:
    """A fresh state; `params` (e.g. a checkpoint adapted for fine-tuning) replace the init;
    `{"params", "batch_stats"}` (a CNN's variables) replace both."""
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    if params is None:
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32)))(
            init_key
        )
    elif set(params) == {"params", "batch_stats"}:  # a CNN's variables (a teacher fine-tuned)
        variables = jax.tree_util.tree_map(jnp.array, dict(params))
    else:
        # Copies: the jitted step donates the state, which must not invalidate the caller's arrays.
        variables = {"params": jax.tree_util.tree_map(jnp.array, params)}
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if cfg.ema.enabled else None,
        rng=state_key,
    )


def make_train_step(
    model: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: StepConfig
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch, teacher=None) -> (state, metrics)`; batch images uint8."""
    mean, std = jnp.asarray(cfg.mean), jnp.asarray(cfg.std)

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], teacher: Teacher | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        erase_key, mix_key, drop_key = jax.random.split(rng, 3)
        # Official order: erasing is a per-image transform, mixup a batch one; the teacher then
        # sees exactly the student's input.
        x = normalize(batch["image"], cfg.mean, cfg.std)
        x = random_erasing(erase_key, x, cfg.erasing)
        x, targets = mixup_cutmix(mix_key, x, batch["label"], cfg.num_classes, cfg.mixup)
        t_logits = None
        if teacher is not None and cfg.loss.distillation != "none":
            t_logits = teacher_logits(teacher, x * std + mean)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict, Any]]:
            cls, dist, stats = forward(
                model, params, state.batch_stats, x, train=True, rng=drop_key
            )
            loss, aux = deit_loss(cls, dist, targets, t_logits, config=cfg.loss)
            return loss, (aux, stats)

        (loss, (aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, ema_decay_at(state.step, cfg.ema))
        metrics = {
            "loss": loss,
            "base_loss": aux["base_loss"],
            "kd_loss": aux["kd_loss"],
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            batch_stats=stats,
            ema_params=ema,
        )
        return new_state, metrics

    return train_step


def with_finite_flag(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
) -> Callable[..., tuple[TrainState, dict[str, jax.Array], jax.Array]]:
    """`step(state, batch, teacher, first_bad) -> (state, metrics, first_bad)`: `first_bad`, an
    int32 scalar kept on the device (-1 while all is well), becomes the first step whose loss
    or new parameters are not finite, and stays so. The loop reads it only where it waits for
    the device anyway (a log step, before a save or an export), so the check costs no host
    sync per step, and yet names the step where it went wrong, not the step it was seen at."""

    def step(
        state: TrainState, batch: dict[str, jax.Array], teacher: Teacher | None, first_bad: Any
    ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
        new, metrics = step_fn(state, batch, teacher)
        leaves = jax.tree_util.tree_leaves(new.params)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.stack([jnp.isfinite(x).all() for x in leaves])
        )
        first_bad = jnp.where((first_bad < 0) & ~finite, new.step, first_bad)
        return new, metrics, first_bad

    return step


def weight_sets(state: TrainState) -> dict[str, Any]:
    """The weights evaluated each epoch: `val` (the trained ones) and `val_ema` (with EMA)."""
    weights = {"val": state.params}
    if state.ema_params is not None:
        weights["val_ema"] = state.ema_params
    return weights


def evaluate_state(
    eval_step: Callable[[Any, Any, dict[str, jax.Array]], dict],
    state: TrainState,
    source: data_lib.RecordSource,
    data_cfg: data_lib.DataConfig,
    mesh: Any,
    global_batch: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """`{"val": per-head metrics of the weights, "val_ema": the same for the EMA weights}`."""
    sums = eval_lib.SetSums(eval_step, weight_sets(state), state.batch_stats)
    return eval_lib.run_eval_sets(sums, source, data_cfg, mesh, global_batch)


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


class _BadImages:
    """Unreadable images met under `bad_images="skip"`: counted, named at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.files: set[str] = set()

    def add(self, source: data_lib.RecordSource, indices: list[int], everywhere: int) -> None:
        """`indices` met by this process; `everywhere`: how many all processes met."""
        self.count += everywhere
        self.files.update(source.name(i) for i in indices)

    def report(self) -> list[str]:
        files = sorted(self.files)  # this process's share (all of it with one process)
        if files:
            more = f" and {len(files) - 10} more" if len(files) > 10 else ""
            log.warning(
                f"skipped {len(files)} unreadable image(s) ({self.count} reads, each replaced by "
                f"the next readable record): {', '.join(files[:10])}{more}"
            )
        return files


@dataclass(frozen=True)
class OpenedRun:
    """A run folder checked and ready for the loop (`open_run`)."""

    out: Path
    """The run folder, absolute."""
    mesh: Mesh
    steps_per_epoch: int
    ckpts: Checkpoints
    """Its checkpoints, open: the caller closes them."""
    latest: int | None
    """The checkpoint step a resume restores (the newest intact one); None: a fresh run."""


def open_run(
    cfg: TrainConfig,
    train_src: data_lib.RecordSource,
    val_src: data_lib.RecordSource,
    *,
    teacher: Teacher | None,
    resume: bool,
) -> OpenedRun:
    """What `fit` checks before any work: the same data on every process, a batch the mesh and
    the training set allow, a teacher when distilling, a folder that holds no other run (or,
    with `resume`, the checkpoint to continue from); then `OUTPUT/config.json` records `cfg`."""
    out = Path(cfg.output).absolute()
    mesh = parallel.make_mesh()
    if jax.process_count() > 1:  # every process must follow one plan over the same records
        sizes = np.asarray(
            multihost_utils.process_allgather(np.array([len(train_src), len(val_src)]))
        )
        if (sizes != sizes[0]).any():
            raise InputError(
                f"the processes see different data: (train, val) sizes {sizes.tolist()}; expected "
                "the same folder, unchanged, on every host"
            )
    global_batch = cfg.batch_size
    parallel.check_batch(global_batch, mesh)
    spe = len(train_src) // global_batch
    if spe == 0:
        raise InputError(
            f"the training set has {len(train_src)} images, fewer than the batch {global_batch}; "
            f"expected batch_size {parallel.fitting_batch(len(train_src), mesh)} or less"
        )
    if teacher is None and cfg.loss.distillation != "none":
        raise InputError(f"distillation {cfg.loss.distillation!r} needs a teacher; none was given")
    ckpts = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    latest = ckpts.latest_step()
    if latest is not None and not resume:
        ckpts.close()
        raise InputError(
            f"{out} already holds a run (checkpoint at step {latest}); resume it or choose "
            "another output folder"
        )
    if latest is not None:
        try:  # the newest intact one: a truncated or changed file falls back, with one line
            latest = ckpts.usable_step()
        except BaseException:
            ckpts.close()
            raise
    if jax.process_index() == 0:  # what this run uses, whatever the caller derived it from
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(configs.to_dict(cfg), indent=2) + "\n")
    return OpenedRun(out, mesh, spe, ckpts, latest)


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
    bad = _BadImages()
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
        if jax.process_index() == 0:
            (out / "config.json").write_text(json.dumps(configs.to_dict(cfg), indent=2) + "\n")
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
                    _export(out / "best", model, state, ema, train_src, cfg, extra_meta)
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
        _export(out / "final", model, state, False, train_src, cfg, extra_meta)
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


def _export(
    folder: Path,
    model: Any,
    state: TrainState,
    ema: bool,
    source: data_lib.RecordSource,
    cfg: TrainConfig,
    extra: dict[str, Any] | None,
) -> None:
    variables = {"params": state.ema_params if ema else state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    # Every process stops together when the weights would not fit (the allgather after this is
    # a collective); the folder's old files stay until new ones are written whole.
    diskspace.check(folder, state_bytes(variables), least_free(folder.parent))
    # Collective: every process takes part in gathering FSDP shards / remote replicas.
    variables = multihost_utils.process_allgather(variables, tiled=True)
    if jax.process_index() != 0:
        return
    try:
        export.save_model(
            folder,
            model,
            variables,
            classes=source.classes,
            **export.Preprocessing.from_data(cfg.data).to_config(),
            ema=ema,
            **(extra or {}),
        )
        (folder / "train_config.json").write_text(json.dumps(configs.to_dict(cfg), indent=2))
    except OSError as err:
        if diskspace.is_no_space(err):
            raise diskspace.no_space(folder, state_bytes(variables)) from None
        raise
