"""Whole runs, as the CLI offers them: train (teacher first when needed) and evaluate, fine-tune an
exported model, evaluate an exported model, predict classes of image files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from deit import configs, export, parallel
from deit import data as data_lib
from deit.compiler import compiler_options
from deit.configs import ModelConfig, TrainConfig
from deit.losses import LossConfig
from deit.model import DeiT, create_model, init_params, resample_pos_embed
from deit.teacher import TEACHERS, Teacher, check_teacher, create_teacher
from deit.train import fit, make_eval_step, make_teacher_eval_step, run_eval
from deit.transforms import decode_image, eval_transform
from deit.variants import VARIANTS


def load_exported(folder: str | Path) -> tuple[Any, dict, dict[str, Any]]:
    """`export.load_model`, with a one-line ValueError naming the differing arrays when the
    weights do not fit the architecture in `config.json` (instead of Flax's error mid-apply)."""
    model, variables, config = export.load_model(folder)
    size = _model_size(model) if isinstance(model, DeiT) else int(config.get("img_size") or 32)
    x = jax.ShapeDtypeStruct((1, size, size, getattr(model, "in_chans", 3)), jnp.float32)
    shapes = lambda tree: {k: tuple(v.shape) for k, v in flatten_dict(tree, sep="/").items()}
    wanted = shapes(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    diff = export.layout_mismatch(shapes(variables), wanted)
    if diff:
        raise ValueError(
            f"the weights in {folder} do not fit its {export.CONFIG}: {diff}; expected a folder "
            "written by deit train or deit convert, unchanged"
        )
    return model, variables, config


def teacher_from_export(folder: str | Path) -> Teacher:
    """A frozen teacher from an exported model folder (a trained ResNet or any DeiT)."""
    model, variables, config = load_exported(folder)
    mean = config.get("mean", data_lib.IMAGENET_MEAN)
    std = config.get("std", data_lib.IMAGENET_STD)
    if isinstance(model, DeiT):
        return Teacher.from_deit(model, variables, mean, std)
    return Teacher.from_resnet(model, variables, mean, std, config.get("img_size"))


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
    cfg: TrainConfig, train_src: data_lib.RecordSource, val_src: data_lib.RecordSource, resume: bool
) -> tuple[Teacher, Path]:
    """`cfg.teacher.path` (an exported folder or a run), or `cfg.teacher.arch` trained into
    `OUTPUT/teacher` first (reused when that folder already holds a finished teacher)."""
    if cfg.teacher.path is not None:
        folder = Path(cfg.teacher.path)
        if not folder.is_dir():
            raise ValueError(
                f"teacher.path {cfg.teacher.path!r} is not a folder; expected an exported model "
                "folder or a run folder"
            )
        final = folder / "final" if (folder / "final").is_dir() else folder
        return teacher_from_export(final), final
    name = cfg.teacher.arch
    if name not in TEACHERS:
        raise ValueError(f"teacher.arch {name!r}; expected one of {', '.join(TEACHERS)}")
    out = Path(cfg.output).absolute() / "teacher"
    final = out / "final"
    if not (final / export.CONFIG).is_file():
        tcfg = teacher_config(cfg, out)
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
        raise ValueError(
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
    cfg: TrainConfig, *, resume: bool = False, pretrained: Pretrained | None = None
) -> dict[str, Any]:
    """`deit train`: data, optional teacher, the student; writes `OUTPUT/results.json`.

    With `pretrained` the student is that network (at `cfg`'s image size and the data's class
    count, see `adapt_params`) and starts from its weights instead of a fresh init.
    """
    out = Path(cfg.output).absolute()
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
    teacher, teacher_path = None, None
    if cfg.loss.distillation != "none":
        teacher, teacher_path = resolve_teacher(cfg, train_src, val_src, resume)
        check_teacher(teacher, num_classes)
    results = fit(
        student,
        cfg,
        train_src,
        val_src,
        teacher=teacher,
        resume=resume,
        extra_meta={
            "variant": cfg.model.name,
            **({"finetuned_from": pretrained.path} if pretrained else {}),
        },
        init_params=init,
    )
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "distillation": cfg.loss.distillation,
        "epochs": cfg.epochs,
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
        mesh = parallel.make_mesh()
        summary["teacher"] = run_eval(
            make_teacher_eval_step(teacher, cfg.model.dtype),
            val_src,
            cfg.data,
            mesh,
            cfg.batch_size,
        )["avg"]
        summary["teacher_path"] = str(teacher_path)
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        from deit.visualize import plot_curves

        plot_curves(out)
    return summary


def exported_folder(path: str | Path) -> Path:
    """The exported model in `path`: the folder itself, or a run folder's `final/` (or `best/`)."""
    path = Path(path)
    for candidate in (path, path / "final", path / "best"):
        if (candidate / export.CONFIG).is_file():
            return candidate
    raise ValueError(
        f"{path} holds no exported model; expected a folder with {export.CONFIG} (a run's "
        "final/ or best/, or the output of deit convert)"
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str,
    batch_size: int = 128,
    workers: int | None = None,
    bad_images: str = "error",
) -> dict[str, dict[str, float]]:
    """`deit eval`: per-head top-1/top-5/loss of an exported model on `data`'s val split."""
    folder = exported_folder(checkpoint)
    model, variables, config = load_exported(folder)
    cfg = data_lib.DataConfig(
        dataset=data,
        img_size=int(config.get("img_size", _model_size(model))),
        crop_pct=float(config.get("crop_pct", 0.875)),
        mean=tuple(config.get("mean", data_lib.IMAGENET_MEAN)),
        std=tuple(config.get("std", data_lib.IMAGENET_STD)),
        workers=workers,
        bad_images=bad_images,
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
    step = jax.jit(
        make_eval_step(model, cfg.mean, cfg.std), compiler_options=compiler_options(model.dtype)
    )
    params, stats = variables["params"], variables.get("batch_stats", {})
    return run_eval(lambda b: step(params, stats, b), val_src, cfg, mesh, batch_size)


def _model_size(model: Any) -> int:
    size = getattr(model, "img_size", 224)
    return size if isinstance(size, int) else size[0]


def predict(
    checkpoint: str | Path, images: list[str], top: int = 5
) -> list[list[tuple[str, float]]]:
    """`deit predict`: the `top` classes with probabilities (averaged heads) for each image file."""
    folder = exported_folder(checkpoint)
    model, variables, config = load_exported(folder)
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


def finetune(cfg: TrainConfig, checkpoint: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """`deit train --finetune CKPT`: `train_and_evaluate` from an exported DeiT.

    `checkpoint` is a `deit convert` output or a run (its `final/`). The network is the
    checkpoint's, at `cfg.data.img_size` with the data's class count (`adapt_params`); its
    normalisation (mean, std) is kept, since the weights were trained on it. Everything else
    (optimiser, augmentation, `--distillation`/`--teacher`) comes from `cfg`.
    """
    folder = exported_folder(checkpoint)
    model, variables, config = load_exported(folder)
    if not isinstance(model, DeiT):
        raise ValueError(f"{folder} holds a {type(model).__name__}; finetune needs a DeiT")
    spec = VARIANTS.get(config.get("variant", ""))
    mean = config.get("mean", spec.mean if spec else cfg.data.mean)
    std = config.get("std", spec.std if spec else cfg.data.std)
    cfg = dataclasses.replace(
        cfg,
        finetune=str(checkpoint),
        model=dataclasses.replace(
            cfg.model, name=_variant_at(config.get("variant"), cfg.data.img_size)
        ),
        data=dataclasses.replace(cfg.data, mean=tuple(mean), std=tuple(std)),
    )
    pretrained = Pretrained(model, variables["params"], str(folder.absolute()))
    return train_and_evaluate(cfg, resume=resume, pretrained=pretrained)
