"""Whole runs, as the CLI offers them: train (teacher first when needed) and evaluate, evaluate an
exported model, predict classes of image files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from deit import data as data_lib
from deit import export, parallel
from deit.configs import TrainConfig
from deit.model import DeiT, create_model
from deit.teacher import TEACHERS, Teacher, check_teacher, create_teacher
from deit.train import fit, make_eval_step, make_teacher_eval_step, run_eval
from deit.transforms import decode_image, eval_transform


def teacher_from_export(folder: str | Path) -> Teacher:
    """A frozen teacher from an exported model folder (a trained ResNet or any DeiT)."""
    model, variables, config = export.load_model(folder)
    mean = config.get("mean", data_lib.IMAGENET_MEAN)
    std = config.get("std", data_lib.IMAGENET_STD)
    if isinstance(model, DeiT):
        return Teacher.from_deit(model, variables, mean, std)
    return Teacher.from_resnet(model, variables, mean, std, config.get("img_size"))


def _teacher_config(cfg: TrainConfig, output: Path) -> TrainConfig:
    t = cfg.teacher_cfg
    return dataclasses.replace(
        cfg,
        epochs=t.epochs,
        optim=t.optim,
        mixup=t.mixup,
        distillation="none",
        output=str(output),
        drop_path_rate=0.0,
    )


def resolve_teacher(
    cfg: TrainConfig, train_src: data_lib.Source, val_src: data_lib.Source, resume: bool
) -> tuple[Teacher, Path]:
    """`--teacher` as an exported folder, or a ResNet name trained into `OUTPUT/teacher` first
    (reused when that folder already holds a finished teacher)."""
    name = cfg.teacher or cfg.teacher_cfg.arch
    if name not in TEACHERS:
        folder = Path(name)
        if not folder.is_dir():
            raise ValueError(
                f"teacher {name!r} is neither an exported model folder nor one of "
                f"{', '.join(TEACHERS)}"
            )
        final = folder / "final" if (folder / "final").is_dir() else folder
        return teacher_from_export(final), final
    out = Path(cfg.output).absolute() / "teacher"
    final = out / "final"
    if not (final / export.CONFIG).is_file():
        tcfg = _teacher_config(
            dataclasses.replace(cfg, teacher_cfg=dataclasses.replace(cfg.teacher_cfg, arch=name)),
            out,
        )
        model = create_teacher(name, len(train_src.classes), small_input=cfg.data.img_size < 64)
        fit(
            model,
            tcfg,
            train_src,
            val_src,
            resume=resume or (out / "checkpoints").is_dir(),
            title="teacher",
        )
    return teacher_from_export(final), final


def train_and_evaluate(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """`deit train`: data, optional teacher, the student; writes `OUTPUT/results.json`."""
    train_src, val_src = data_lib.load_sources(cfg.data)
    num_classes = len(train_src.classes)
    student = create_model(
        cfg.model,
        num_classes=num_classes,
        img_size=cfg.data.img_size,
        drop_path_rate=cfg.drop_path_rate,
        dtype=cfg.dtype,
    )
    teacher, teacher_path = None, None
    if cfg.distillation != "none":
        teacher, teacher_path = resolve_teacher(cfg, train_src, val_src, resume)
        check_teacher(teacher, num_classes)
    results = fit(
        student,
        cfg,
        train_src,
        val_src,
        teacher=teacher,
        resume=resume,
        extra_meta={"variant": cfg.model},
    )
    summary: dict[str, Any] = {
        "model": cfg.model,
        "distillation": cfg.distillation,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "val": results["val"],
    }
    if "val_ema" in results:
        summary["val_ema"] = results["val_ema"]
    summary["best"] = results["best"]
    if teacher is not None:
        mesh = parallel.make_mesh()
        summary["teacher"] = run_eval(
            make_teacher_eval_step(teacher), val_src, cfg.data, mesh, cfg.batch_size
        )["avg"]
        summary["teacher_path"] = str(teacher_path)
    out = Path(cfg.output).absolute()
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        from deit.visualize import plot_curves

        plot_curves(out)
    return summary


def _exported(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / "final", path / "best"):
        if (candidate / export.CONFIG).is_file():
            return candidate
    raise ValueError(
        f"{path} holds no exported model; expected a folder with {export.CONFIG} (a run's "
        "final/ or best/, or the output of deit convert)"
    )


def evaluate_checkpoint(
    checkpoint: str | Path, data: str, batch_size: int = 128, workers: int = 0
) -> dict[str, dict[str, float]]:
    """`deit eval`: per-head top-1/top-5/loss of an exported model on `data`'s val split."""
    folder = _exported(checkpoint)
    model, variables, config = export.load_model(folder)
    cfg = data_lib.DataConfig(
        dataset=data,
        img_size=int(config.get("img_size", _model_size(model))),
        crop_pct=float(config.get("crop_pct", 0.875)),
        mean=tuple(config.get("mean", data_lib.IMAGENET_MEAN)),
        std=tuple(config.get("std", data_lib.IMAGENET_STD)),
        workers=workers,
    )
    _, val_src = data_lib.load_sources(cfg)
    classes = config.get("classes")
    if classes is not None and classes != val_src.classes:
        raise ValueError(
            f"the checkpoint was trained on classes {classes[:5]}... but {data} has "
            f"{val_src.classes[:5]}...; expected the same class folders"
        )
    mesh = parallel.make_mesh()
    batch_size = max(batch_size // mesh.devices.size, 1) * mesh.devices.size
    step = jax.jit(make_eval_step(model, cfg.mean, cfg.std))
    params, stats = variables["params"], variables.get("batch_stats", {})
    return run_eval(lambda b: step(params, stats, b), val_src, cfg, mesh, batch_size)


def _model_size(model: Any) -> int:
    size = getattr(model, "img_size", 224)
    return size if isinstance(size, int) else size[0]


def predict(
    checkpoint: str | Path, images: list[str], top: int = 5
) -> list[list[tuple[str, float]]]:
    """`deit predict`: the `top` classes with probabilities (averaged heads) for each image file."""
    folder = _exported(checkpoint)
    model, variables, config = export.load_model(folder)
    size = int(config.get("img_size", _model_size(model)))
    mean = np.asarray(config.get("mean", data_lib.IMAGENET_MEAN), np.float32)
    std = np.asarray(config.get("std", data_lib.IMAGENET_STD), np.float32)
    classes = config.get("classes") or [str(i) for i in range(model.num_classes)]
    batch = np.stack(
        [
            eval_transform(decode_image(p), size, crop_pct=float(config.get("crop_pct", 0.875)))
            for p in images
        ]
    )
    x = (batch.astype(np.float32) / 255.0 - mean) / std
    from deit.train import forward

    cls, dist, _ = forward(
        model, variables["params"], variables.get("batch_stats", {}), x, train=False
    )
    logits = cls if dist is None else (cls + dist) / 2
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = min(top, probs.shape[-1])
    order = np.argsort(-probs, axis=-1)[:, :k]
    return [[(classes[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]
