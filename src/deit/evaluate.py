"""Evaluation and prediction: top-1 / top-5 / cross-entropy of the class head, the distillation
head and their average (the paper's Table 3 reports all three) over a whole validation set, for a
run's weights (each epoch, `train.evaluate_state`), a teacher, or an exported model (`deit eval`,
`evaluate_checkpoint`); the top classes of image files (`deit predict`, `predict`), and their
pre-logits (`deit predict --features`, `predict_features`).

An exported model (`pretrained.open_model`) sees images through its `variants.Preprocessing`:
the eval transform in the data pipeline's workers (or `Preprocessing.crop` for files),
normalisation on the device in the step.

Over 400 lines, kept whole: every number a user reads about a model's accuracy comes from the
one set of sums here (`batch_sums`, `head_sums`, `finish`), whether the training loop, `deit
eval` or `deit predict` asks; one module keeps them from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from deit import data as data_lib
from deit import parallel
from deit.augment import normalize
from deit.class_names import class_names, is_imagenet
from deit.compiler import compiler_options
from deit.errors import InputError
from deit.features import pre_logits
from deit.model import DeiT, forward
from deit.pretrained import open_model
from deit.progress import Mode, RateColumn, resolve_mode
from deit.serving import is_artifact, open_artifact
from deit.signals import Interrupted, Stop, StopSignals
from deit.teacher import Teacher, teacher_logits
from deit.transforms import decode_image

HEADS = ("cls", "dist", "avg")


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the batch of top-1 hits, top-5 hits and cross-entropy, weighted by `mask`.

    `logits (B, K)` float, `labels (B,)` int, `mask (B,)` 1 for real samples, 0 for padding.
    With fewer than 5 classes top-5 is top-K.
    """
    logits = logits.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank of the true class = how many classes score strictly higher; ties count as hits.
    rank = jnp.sum(logits > true, axis=-1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return {
        "top1": jnp.sum((rank < 1) * mask),
        "top5": jnp.sum((rank < k) * mask),
        "loss": jnp.sum(nll * mask),
        "count": jnp.sum(mask),
    }


def head_sums(
    cls_logits: jax.Array, dist_logits: jax.Array | None, labels: jax.Array, mask: jax.Array
) -> dict[str, dict[str, jax.Array]]:
    """`batch_sums` for each head; a plain model has only `cls` (reported as `avg` too)."""
    if dist_logits is None:
        sums = batch_sums(cls_logits, labels, mask)
        return {"cls": sums, "avg": sums}
    return {
        "cls": batch_sums(cls_logits, labels, mask),
        "dist": batch_sums(dist_logits, labels, mask),
        "avg": batch_sums((cls_logits + dist_logits) / 2, labels, mask),
    }


def per_class_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Top-1 hits and sample counts per class, `(K,)` each (`logits (B, K)`, as `batch_sums`)."""
    logits = logits.astype(jnp.float32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    hit = (jnp.sum(logits > true, axis=-1) < 1) * mask
    zeros = jnp.zeros(logits.shape[-1], jnp.float32)
    return {"hits": zeros.at[labels].add(hit), "count": zeros.at[labels].add(mask)}


def finish(totals: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Sums -> percentages for top-1/top-5 and the mean loss, per head."""
    out = {}
    for head, sums in totals.items():
        n = max(float(sums["count"]), 1.0)
        out[head] = {
            "top1": 100.0 * float(sums["top1"]) / n,
            "top5": 100.0 * float(sums["top5"]) / n,
            "loss": float(sums["loss"]) / n,
            "count": int(sums["count"]),
        }
    return out


def accumulate(totals: dict[str, dict[str, float]], sums: dict[str, dict[str, Any]]) -> None:
    """Add one batch's `head_sums` (device arrays are fetched) into `totals`, in place."""
    for head, values in jax.device_get(sums).items():
        acc = totals.setdefault(head, dict.fromkeys(values, 0.0))
        for key, value in values.items():
            value = np.asarray(value, np.float64)
            acc[key] = acc[key] + (value if value.ndim else float(value))


def evaluate(
    step_fn: Callable[[dict[str, jax.Array]], dict[str, dict[str, jax.Array]]],
    batches: Iterable[dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """Run `step_fn` (a jitted function of one batch returning `head_sums`) over all batches."""
    totals: dict[str, dict[str, float]] = {}
    for batch in batches:
        accumulate(totals, step_fn(batch))
    per_class = totals.pop("per_class", None)  # `per_class_sums` of the averaged heads
    out = finish(totals)
    if per_class is not None:
        out["per_class"] = per_class
    return out


# ----------------------------------------------------------------------------- steps


def make_eval_step(
    model: Any, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Any, Any, dict[str, jax.Array]], dict]:
    """`eval_step(params, batch_stats, batch) -> per-head sums` (see `head_sums`); batch images
    uint8, normalised here with `mean` and `std`."""

    def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array]) -> dict:
        x = normalize(batch["image"], mean, std)
        cls, dist, _ = forward(model, params, batch_stats, x, train=False)
        return head_sums(cls, dist, batch["label"], batch["mask"])

    return eval_step


def make_teacher_eval_step(
    teacher: Teacher, dtype: Any = jnp.float32
) -> Callable[[dict[str, jax.Array]], dict]:
    """`eval_step(batch) -> {"avg": sums}` of a frozen teacher (its own normalisation), jitted."""

    def eval_step(batch: dict[str, jax.Array]) -> dict:
        logits = teacher_logits(teacher, batch["image"].astype(jnp.float32) / 255.0)
        return {"avg": batch_sums(logits, batch["label"], batch["mask"])}

    return jax.jit(eval_step, compiler_options=compiler_options(dtype))


# ----------------------------------------------------------------------------- whole passes


class SetSums:
    """The per-head sums of one model's weight sets (`{"val": params, "val_ema": ema_params}`)
    over the batches of one evaluation: `train.fit` adds each validation batch of its stream,
    `run_eval_sets` a whole source; both end in `result`."""

    def __init__(
        self,
        eval_step: Callable[[Any, Any, dict[str, jax.Array]], dict],
        weights: dict[str, Any],
        batch_stats: Any,
    ) -> None:
        self.eval_step, self.weights, self.batch_stats = eval_step, weights, batch_stats
        self.totals: dict[str, dict[str, dict[str, float]]] = {}
        self.batches = 0

    def add(self, batch: dict[str, jax.Array]) -> None:
        """One device batch (`parallel.put_batch`) through every weight set."""
        for split, params in self.weights.items():
            accumulate(
                self.totals.setdefault(split, {}), self.eval_step(params, self.batch_stats, batch)
            )
        self.batches += 1

    def result(self) -> dict[str, dict[str, dict[str, float]]]:
        """`{split: per-head metrics}` (`finish`) of the batches added."""
        return {split: finish(t) for split, t in self.totals.items()}


def _over_source(
    consume: Callable[[Iterable[dict[str, jax.Array]]], Any],
    source: data_lib.RecordSource,
    data_cfg: data_lib.DataConfig,
    mesh: Any,
    global_batch: int,
    phase: str,
) -> Any:
    """`consume(device batches of source's eval pipeline)` (unreadable images: see
    `data.take_bad`). SIGINT/SIGTERM stop it between batches: `Interrupted` naming `phase`."""
    batches = data_lib.eval_batches(
        source,
        data_cfg,
        global_batch=global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    def on_mesh(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        parallel.take_bad(batch, source, data_cfg.bad_images)
        return parallel.put_batch(batch, mesh)

    stop = StopSignals()
    try:
        return consume(map(on_mesh, stop.batches(batches)))
    except Stop:
        raise Interrupted(stop.requested, phase) from None
    finally:
        batches.close(now=stop.requested is not None)
        stop.restore()


def run_eval(
    step_fn: Callable[[dict[str, jax.Array]], dict],
    source: data_lib.RecordSource,
    data_cfg: data_lib.DataConfig,
    mesh: Any,
    global_batch: int,
    phase: str = "evaluation",
) -> dict[str, dict[str, float]]:
    """One pass of `step_fn` (a batch -> `head_sums`) over `source` (`evaluate`)."""
    return _over_source(
        lambda batches: evaluate(step_fn, batches), source, data_cfg, mesh, global_batch, phase
    )


def run_eval_sets(
    sums: SetSums,
    source: data_lib.RecordSource,
    data_cfg: data_lib.DataConfig,
    mesh: Any,
    global_batch: int,
    phase: str = "evaluation",
) -> dict[str, dict[str, dict[str, float]]]:
    """One pass over `source` adding every batch into `sums`: its `result`."""

    def consume(batches: Iterable[dict[str, jax.Array]]) -> dict:
        for batch in batches:
            sums.add(batch)
        return sums.result()

    return _over_source(consume, source, data_cfg, mesh, global_batch, phase)


# ----------------------------------------------------------------------------- exported models


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str,
    batch_size: int = 128,
    workers: int | None = None,
    bad_images: str = "error",
    per_class: bool = False,
) -> dict[str, Any]:
    """`deit eval`: per-head top-1/top-5/loss of an exported model on `data`'s val split; with
    `per_class`, also `per_class`: `[{"class", "name", "top1", "count"}]` of the averaged heads,
    by class index (`name`: ImageNet-1k's for a converted 1000-class head, else the class)."""
    opened = open_model(checkpoint)
    model, variables, prep = opened.model, opened.variables, opened.preprocessing
    cfg = data_lib.DataConfig(
        dataset=data,
        img_size=prep.img_size,
        crop_pct=prep.crop_pct,
        interpolation=prep.interpolation,
        mean=prep.mean,
        std=prep.std,
        workers=workers,
        bad_images=bad_images,
    )
    _, val_src = data_lib.load_sources(cfg)
    classes = opened.classes
    if classes is not None and classes != val_src.classes:
        raise InputError(
            f"the checkpoint was trained on classes {classes[:5]}... but {data} has "
            f"{val_src.classes[:5]}...; expected the same class folders"
        )
    mesh = parallel.make_mesh()
    batch_size = max(batch_size // mesh.devices.size, 1) * mesh.devices.size
    step = jax.jit(
        make_eval_step(model, prep.mean, prep.std), compiler_options=compiler_options(model.dtype)
    )
    if per_class:
        step = jax.jit(
            _with_per_class(model, prep.mean, prep.std),
            compiler_options=compiler_options(model.dtype),
        )
    params, stats = variables["params"], variables.get("batch_stats", {})
    results = run_eval(lambda b: step(params, stats, b), val_src, cfg, mesh, batch_size)
    if per_class:
        sums = results.pop("per_class")
        num_classes = len(sums["count"])
        names = class_names(opened.config, num_classes)
        if not is_imagenet(opened.config, num_classes):
            names = list(val_src.classes)
        results["per_class"] = [
            {"class": c, "name": names[c], "count": int(n),
             "top1": 100.0 * float(h) / max(float(n), 1.0)}
            for c, (h, n) in enumerate(zip(sums["hits"], sums["count"], strict=True))
        ]  # fmt: skip
    return results


def _with_per_class(
    model: Any, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Any, Any, dict[str, jax.Array]], dict]:
    """`make_eval_step`'s sums plus `per_class`: `per_class_sums` of the averaged heads."""

    def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array]) -> dict:
        x = normalize(batch["image"], mean, std)
        cls, dist, _ = forward(model, params, batch_stats, x, train=False)
        logits = cls if dist is None else (cls + dist) / 2
        return {
            **head_sums(cls, dist, batch["label"], batch["mask"]),
            "per_class": per_class_sums(logits, batch["label"], batch["mask"]),
        }

    return eval_step


def predict(
    checkpoint: str | Path, images: list[str], top: int = 5
) -> list[list[tuple[str, float]]]:
    """`deit predict`: the `top` classes with probabilities (averaged heads) for each image file,
    named by `class_names` (a run's folders, ImageNet-1k's for converted weights). `checkpoint`
    may also be a serving artifact (`deit export --format stablehlo|onnx`), run as exported."""
    if top < 1:
        raise InputError(f"top {top}; expected 1 or more classes to show")
    if is_artifact(checkpoint):
        artifact = open_artifact(checkpoint)
        classes = artifact.classes
        x = artifact.preprocessing.inputs([decode_image(p) for p in images])
        logits = artifact(np.asarray(x))
    else:
        opened = open_model(checkpoint)
        model, variables = opened.model, opened.variables
        classes = class_names(opened.config, model.num_classes)
        x = opened.preprocessing.inputs([decode_image(p) for p in images])
        cls, dist, _ = forward(
            model, variables["params"], variables.get("batch_stats", {}), x, train=False
        )
        logits = cls if dist is None else (cls + dist) / 2
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = min(top, probs.shape[-1])
    order = np.argsort(-probs, axis=-1)[:, :k]
    return [[(classes[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a folder as every image under it (`IMAGE_SUFFIXES`, any depth, sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in data_lib.IMAGE_SUFFIXES
            )
            if not found:
                raise InputError(
                    f"folder {path} holds no images; expected files ending in "
                    f"{', '.join(data_lib.IMAGE_SUFFIXES)}"
                )
            files += found
        else:
            files.append(path)
    return files


def predict_features(
    checkpoint: str | Path,
    images: Iterable[str | Path],
    out: str | Path,
    *,
    batch_size: int = 32,
    progress: Mode = "auto",
) -> np.ndarray:
    """`deit predict --features OUT.npy`: the pre-logits `(N, D)` of image files and folders
    (`image_files`), float32, one row per image in that order, saved to `out` with the images'
    paths one per line beside it (`OUT.txt`). Pre-logits are what a head reads: the mean of the
    CLS and DIST tokens for a distilled model, the CLS token otherwise (timm's
    `forward_head(pre_logits=True)`, `features.pre_logits`). Batches are padded to `batch_size`
    so one program serves them all; a progress bar on stderr counts the images."""
    out = Path(out)
    if out.suffix != ".npy":
        raise InputError(f"--features {out}; expected a file name ending in .npy")
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size}; expected 1 or more")
    files = image_files(images)
    opened = open_model(checkpoint)
    model, variables = opened.model, {"params": opened.variables["params"]}
    if not isinstance(model, DeiT):
        raise InputError(
            f"{checkpoint} holds a {type(model).__name__}; features are a DeiT's pre-logits"
        )
    run = jax.jit(lambda v, x: pre_logits(model, v, x))
    rows = []
    columns = (BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    shown = resolve_mode(progress) == "bars"
    with Progress("features", *columns, console=console, disable=not shown) as bar:
        task = bar.add_task("features", total=len(files))
        for lo in range(0, len(files), batch_size):
            chunk = files[lo : lo + batch_size]
            x = opened.preprocessing.inputs([decode_image(p) for p in chunk])
            x = jnp.pad(x, ((0, batch_size - len(chunk)), (0, 0), (0, 0), (0, 0)))
            rows.append(np.asarray(run(variables, x))[: len(chunk)])
            bar.advance(task, len(chunk))
    feats = np.concatenate(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    out.with_suffix(".txt").write_text("".join(f"{p}\n" for p in files))
    return feats
