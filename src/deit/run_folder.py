"""A training run's folder: the checks before any work and what `fit` writes there besides the
checkpoints and the logs (`config.json`, the exported `best/` and `final/`).

`open_run` is everything `train.fit` checks before it starts a worker or compiles a step: the
same data on every process, a batch the mesh and the training set allow, a teacher when
distilling, a folder that holds no other run (or, resuming, the checkpoint to continue from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deit import configs, diskspace, export, parallel
from deit import data as data_lib
from deit.checkpoint import Checkpoints, least_free, state_bytes
from deit.configs import TrainConfig
from deit.errors import InputError
from deit.teacher import Teacher
from deit.train_step import TrainState


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
    write_config(out, cfg)  # what this run uses, whatever the caller derived it from
    return OpenedRun(out, mesh, spe, ckpts, latest)


def write_config(out: Path, cfg: TrainConfig) -> None:
    """`out/config.json` <- `cfg` (process 0): what the run uses, rewritten when a time budget
    resizes it."""
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(configs.to_dict(cfg), indent=2) + "\n")


def export_weights(
    folder: Path,
    model: Any,
    state: TrainState,
    ema: bool,
    source: data_lib.RecordSource,
    cfg: TrainConfig,
    extra: dict[str, Any] | None,
) -> None:
    """`folder` <- the run's model (`ema`: its EMA weights) as an exported folder (`export.py`),
    with `train_config.json`; every process takes part (the gather is a collective), process 0
    writes. A disk too full for the weights stops every process before anything is written."""
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
