"""Pictures of a model and of a run.

Of a model: where the class (CLS) and distillation (DIST) tokens look — last-layer attention and
attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") over the
patches, overlaid on the input — and how similar the two tokens are at every layer (DeiT §4
reports cosine 0.06 between the learned tokens at the input and 0.93 at the last layer).
Of a run: training curves and the per-head accuracy table.

Figures are bare `matplotlib.figure.Figure`s drawn on their own Agg canvas: no pyplot, so importing
or plotting leaves matplotlib's backend and its global figure list as the caller set them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deit.class_names import class_names
from deit.errors import InputError
from deit.layers import LN_EPS
from deit.model import DeiT, forward_with_attention
from deit.pretrained import open_model
from deit.report import results_rows
from deit.transforms import decode_image

# DeiT §4 ("Distillation token"), DeiT-B on ImageNet: cosine of the learned CLS and DIST tokens,
# and of the two tokens' embeddings at the last layer.
PAPER_COSINE = {"input": 0.06, "output": 0.93}
DISPLAY_SIDE = 224  # small inputs (16x16 digits) are enlarged to about this many pixels


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (what `savefig` renders through), outside pyplot."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------- a run


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x["kind"] == "train"], [x for x in lines if x["kind"] == "eval"]


def plot_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """`RUN/curves.png`: training loss, learning rate, and val top-1 of each head (and EMA)."""
    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise InputError(f"{run} has no metrics.jsonl; expected the output folder of deit train")
    train, evals = read_metrics(run)
    fig = _figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    steps = [x["step"] for x in train]
    axes[0].plot(steps, [x["loss"] for x in train], label="total")
    axes[0].plot(steps, [x["base_loss"] for x in train], label="class head (labels)")
    if any(x["kd_loss"] for x in train):
        axes[0].plot(steps, [x["kd_loss"] for x in train], label="dist head (teacher)")
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[0].legend()
    axes[1].plot(steps, [x["lr"] for x in train])
    axes[1].set(xlabel="step", ylabel="lr", title="learning rate")
    epochs = [x["epoch"] + 1 for x in evals]
    for split in ("val", "val_ema"):
        for head in ("cls", "dist", "avg"):
            values = [x[split][head]["top1"] for x in evals if split in x and head in x[split]]
            if len(values) == len(epochs) and values:
                style = "--" if split == "val_ema" else "-"
                name = {"cls": "class head", "dist": "dist head", "avg": "averaged"}[head]
                label = name + (" (EMA)" if split == "val_ema" else "")
                axes[2].plot(epochs, values, style, label=label)
    axes[2].set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    axes[2].legend()
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=100)
    return path


def plot_results(run: str | Path, out: str | Path | None = None) -> Path:
    """`RUN/results.png`: the per-head top-1 / top-5 table of `RUN/results.json`."""
    run = Path(run)
    if not (run / "results.json").is_file():
        raise InputError(f"{run} has no results.json; expected a finished deit train run")
    summary = json.loads((run / "results.json").read_text())
    rows = results_rows(summary)
    cells = [[f"{m['top1']:.2f}", f"{m['top5']:.2f}"] for _, m in rows]
    fig = _figure(figsize=(6, 0.3 * (len(rows) + 1) + 0.4))
    ax = fig.subplots()
    ax.axis("off")
    # The table fills the axes right of the row labels, so the saved figure has no blank margin.
    ax.table(
        cellText=cells,
        rowLabels=[name for name, _ in rows],
        colLabels=["top-1 %", "top-5 %"],
        cellLoc="center",
        bbox=[0.4, 0.0, 0.6, 1.0],
    )
    title = f"{summary.get('model', '')}  distillation: {summary.get('distillation', '?')}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else run / "results.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def visualize_run(run: str | Path, out: str | Path | None = None) -> list[Path]:
    """`deit visualize --run RUN`: `curves.png` and `results.png` into `out` (default: RUN)."""
    run = Path(run)
    folder = Path(out) if out else run
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_curves(run, folder / "curves.png"), plot_results(run, folder / "results.png")]


# ----------------------------------------------------------------------------- attention


def attention_rollout(attn: Sequence[jax.Array | np.ndarray]) -> np.ndarray:
    """Attention rollout over the layers: `depth x (B, heads, T, T)` -> `(B, T, T)`.

    Abnar & Zuidema (2020): average the heads, add the identity for the residual path,
    renormalise the rows, and multiply the layers, last on the left:
    `R = Â_L ... Â_1`. Row `t` of `R` is how much output token `t` draws on each input token;
    rows sum to 1. Works without the batch axis too (`(heads, T, T)` -> `(T, T)`).
    """
    result = None
    for a in attn:
        a = np.asarray(a, np.float64).mean(axis=-3)
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else a @ result
    if result is None:
        raise InputError("attention rollout needs at least one layer; got none")
    return result.astype(np.float32)


def attention_maps(
    attn: Sequence[jax.Array | np.ndarray], grid: tuple[int, int], num_prefix_tokens: int
) -> dict[str, np.ndarray]:
    """Patch maps `(B, gh, gw)` of the class token and, if present, the distillation token.

    Keys `cls_last`, `cls_rollout` (and `dist_last`, `dist_rollout` when `num_prefix_tokens`
    is 2): the token's row of the last layer's head-averaged attention and of the rollout,
    restricted to the patch columns (the prefix columns are dropped, so a map sums to < 1).
    """
    last = np.asarray(attn[-1], np.float32).mean(axis=1)  # (B, T, T)
    rollout = attention_rollout(attn)
    b, p = last.shape[0], num_prefix_tokens
    maps = {}
    for row, token in enumerate(("cls", "dist")[:p]):
        maps[f"{token}_last"] = last[:, row, p:].reshape(b, *grid)
        maps[f"{token}_rollout"] = rollout[:, row, p:].reshape(b, *grid)
    return maps


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    # A floor, not an added eps: a fresh cls_token is ~1e-6 in norm (timm's init).
    return (a * b).sum(-1) / np.maximum(norms, 1e-300)


def token_similarity(params: dict, tokens: Sequence[jax.Array | np.ndarray]) -> dict[str, Any]:
    """Cosine similarity of the CLS and DIST tokens through a distilled model.

    `tokens` are the block outputs `depth x (B, T, D)` of `model.forward_with_attention`.
    Returns `{"input": cos of the learned cls_token and dist_token, "layers": [mean over the
    batch after each block], "output": the same after the final norm (what the heads read),
    "heads": mean over classes of cos(cls_head, dist_head) weight columns, or None}`.
    """
    if "dist_token" not in params:
        raise InputError("token similarity needs a distilled model (a dist_token); this has none")
    layers = [float(_cosine(t[:, 0], t[:, 1]).mean()) for t in map(np.asarray, tokens)]
    # The final LayerNorm applied by hand, so the last point is what the heads see.
    x = np.asarray(tokens[-1], np.float64)[:, :2]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + LN_EPS)
    x = x * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"])
    heads = None
    if "cls_head" in params and "dist_head" in params:
        k_cls, k_dist = (np.asarray(params[h]["kernel"]) for h in ("cls_head", "dist_head"))
        heads = float(_cosine(k_cls.T, k_dist.T).mean())  # kernels are (D, K): one column a class
    return {
        "input": float(_cosine(*(np.ravel(params[k]) for k in ("cls_token", "dist_token")))),
        "layers": layers,
        "output": float(_cosine(x[:, 0], x[:, 1]).mean()),
        "heads": heads,
    }


def _enlarge(image: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image repeated (nearest) to about DISPLAY_SIDE, heat map bilinearly to the same size."""
    h, w = image.shape[:2]
    s = max(1, math.ceil(DISPLAY_SIDE / max(h, w)))
    big = np.repeat(np.repeat(image, s, axis=0), s, axis=1)
    heat = np.asarray(jax.image.resize(jnp.asarray(heat), (h * s, w * s), "bilinear"))
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
    return big, heat


PANELS = {
    "cls_last": "CLS, last layer",
    "dist_last": "DIST, last layer",
    "cls_rollout": "CLS, rollout",
    "dist_rollout": "DIST, rollout",
}


def plot_attention(
    images: np.ndarray,
    maps: dict[str, np.ndarray],
    path: str | Path,
    titles: Sequence[str] | None = None,
) -> Path:
    """One row per image `(B, H, W, 3)` uint8: the input, then each map of `attention_maps`
    (head-averaged, upsampled, min-max scaled per panel) overlaid on it."""
    keys = [k for k in PANELS if k in maps]
    n = len(images)
    fig = _figure(figsize=(2.6 * (len(keys) + 1), 2.7 * n))
    axes = fig.subplots(n, len(keys) + 1, squeeze=False)
    for i, image in enumerate(images):
        big, _ = _enlarge(image, maps[keys[0]][i])
        axes[i, 0].imshow(big)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=9)
        for j, key in enumerate(keys, start=1):
            big, heat = _enlarge(image, maps[key][i])
            axes[i, j].imshow(big)
            axes[i, j].imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            axes[i, j].set_title(PANELS[key], fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_token_similarity(sims: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Cosine of CLS vs DIST from the learned tokens through every block to the final norm, one
    line per `{label: token_similarity(...)}`, and a last column with the cosine of the two heads'
    weights; grey squares are the paper's DeiT-B values (§4) at the input and the last block."""
    depth = max(len(sim["layers"]) for sim in sims.values())
    xs = np.arange(depth + 3)
    fig = _figure(figsize=(max(6.0, 0.5 * depth + 4), 4))
    ax = fig.subplots()
    for label, sim in sims.items():
        ys = [sim["input"], *sim["layers"], sim["output"]]
        (line,) = ax.plot(xs[: len(ys)], ys, "o-", label=label)
        if sim["heads"] is not None:
            ax.plot([depth + 2], [sim["heads"]], "D", color=line.get_color())
    paper = [PAPER_COSINE["input"], PAPER_COSINE["output"]]
    ax.plot([0, depth], paper, "s", color="grey", label="DeiT-B, ImageNet (paper §4)")
    ax.axvline(depth + 1.5, color="grey", lw=0.8)
    ticks = ["tokens", *[str(i + 1) for i in range(depth)], "norm", "head\nweights"]
    ax.set_xticks(xs, ticks)
    ax.set(xlabel="block", ylabel="cosine similarity (CLS vs DIST)", ylim=(-0.1, 1.05))
    ax.set_title("where the class and distillation tokens diverge and converge", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------- a checkpoint


def visualize_checkpoint(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    together: bool = False,
) -> list[Path]:
    """`deit visualize --checkpoint DIR IMAGE...`: `<image stem>_attention.png` per image (or one
    `attention.png` with a row per image if `together`) and, for a distilled model,
    `token_similarity.png` and `.json` (averaged over the images), into `out`."""
    if not images:
        raise InputError("no image files given; expected at least one image with the checkpoint")
    opened = open_model(checkpoint)
    model, variables, config, prep = (
        opened.model,
        opened.variables,
        opened.config,
        opened.preprocessing,
    )
    if not isinstance(model, DeiT):
        raise InputError(f"{checkpoint} holds a {type(model).__name__}; attention needs a DeiT")
    batch = prep.crop([decode_image(p) for p in images])  # shown under the maps
    output, attn, tokens = forward_with_attention(model, variables, prep.normalize(batch))
    maps = attention_maps(attn, model.grid, model.num_prefix_tokens)
    probs = np.asarray(jax.nn.softmax(output.logits, axis=-1))
    classes = class_names(config, probs.shape[-1])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [Path(p).stem for p in images]
    if len(set(stems)) < len(stems):  # a/1.png and b/1.png must not overwrite each other
        stems = [f"{i}_{s}" for i, s in enumerate(stems)]
    titles = [
        f"{Path(path).name}: {classes[p.argmax()]} ({p.max():.0%})"
        for path, p in zip(images, probs, strict=True)
    ]
    if together:
        written = [plot_attention(batch, maps, out / "attention.png", titles)]
    else:
        written = [
            plot_attention(
                batch[i : i + 1],
                {k: v[i : i + 1] for k, v in maps.items()},
                out / f"{stems[i]}_attention.png",
                titles[i : i + 1],
            )
            for i in range(len(images))
        ]
    if model.distilled:
        sim = token_similarity(variables["params"], tokens)
        label = f"mean of {len(images)} image{'s' if len(images) > 1 else ''}"
        written.append(plot_token_similarity({label: sim}, out / "token_similarity.png"))
        (out / "token_similarity.json").write_text(json.dumps(sim, indent=2))
    return written
