"""Where distillation pays: DeiT students with a fraction of the training labels, with and
without a teacher that saw the same labels, over several seeds, with paired intervals.

For each labelled fraction (stratified per class, drawn by the seed: `data.label_fraction`,
`data.subset_seed`) and each seed: a ResNet-8 teacher trained on that fraction, then three DeiT
students on it, `--distillation none`, `soft` and `hard`, all at the same step budget (each
labelled image appears ~1/fraction times per epoch, `data.subset_repeats`, so every fraction
trains the same steps and is evaluated as often). The soft and hard students share the teacher.
Per run and for the table: val top-1 of the class head, the distillation head and their average,
the teacher's, the cosine of the CLS and DIST tokens after every block (mean over the validation
images) and the argmax agreement of the two heads.

    python bench/distillation_study.py                      # the default study (~1 h, 2 cores)
    python bench/distillation_study.py --quick              # a smoke run (a few minutes)
    python bench/distillation_study.py --data FOLDER --fractions 0.2 1.0 --seeds 0 1 2

Every run is a run folder under `--out` (`f0.10/seed0/{teacher,none,soft,hard}`); a student
with results.json and a teacher with final/ are skipped, a stopped one is resumed, so the same
command continues a study where it stopped. Writes `distillation_study.{json,md,png}` into
`--results` (default bench/results).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tyro
from study_stats import cell, mean_std, paired_cell, paired_t

from deit import data as data_lib
from deit import export, pretrained, recipes
from deit.checkpoint import saved_progress
from deit.configs import TrainConfig
from deit.data import survey as data_survey
from deit.losses import LossConfig
from deit.model import forward_with_attention
from deit.progress import duration
from deit.run import resolve_teacher, train_and_evaluate
from deit.visualize import token_similarity

HERE = Path(__file__).parent
METHODS = ("none", "soft", "hard")
NAMES = {"none": "no distillation", "soft": "soft", "hard": "hard"}

# Seconds on the project's 2-core machine (Intel Xeon), measured alone with one cell of the
# default study (`--fractions 0.1 --seeds 0 --epochs 40`: teacher 14 s, students 51-54 s each,
# compiles included; the students ran at ~1,400 img/s): a run's fixed cost (start, exports, the
# final evaluation, the token pass), each step, each epoch's end (an evaluation of the validation
# set, a checkpoint and often a best/ export), and the first compiles (later runs take them from
# the persistent cache).
FIXED_S = {"teacher": 3.0, "student": 6.0}
STEP_S = {"teacher": 0.08, "student": 0.09}
EPOCH_S = {"teacher": 0.2, "student": 0.19}
COMPILE_S = 10.0


@dataclass(frozen=True)
class Study:
    data: str = "digits"
    """The data: digits (built in) or an ImageFolder / shard folder (the `small` recipe)."""
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    """Labelled fractions of the training split."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Seeds: each draws its own labelled subset, teacher and students."""
    epochs: int = 36
    """Student epochs (each as long as the whole split at every fraction). On digits the
    students need ~35 epochs of their cosine schedule to come near their teachers (15 left them
    at ~50-60%); 36 keeps the default study inside an hour on 2 cores."""
    teacher_epochs: int = 10
    """Teacher epochs (ResNet-8)."""
    batch_size: int | None = None
    """Global batch of teachers and students; None: the recipe's (128 for digits, sized from
    the folder by the small recipe otherwise)."""
    token_images: int = 512
    """Validation images for the token story (cosine per block, head agreement)."""
    out: str = "runs/distillation_study"
    """Folder of the run folders (resumable)."""
    results: str = str(HERE / "results")
    """Where distillation_study.{json,md,png} go."""
    quick: bool = False
    """Smoke run: fractions 0.25 and 1.0, seeds 0 and 1, 2 student and 1 teacher epochs, into
    OUT-quick and RESULTS/quick."""

    def sized(self) -> Study:
        if not self.quick:
            return self
        return dataclasses.replace(
            self,
            fractions=(0.25, 1.0),
            seeds=(0, 1),
            epochs=2,
            teacher_epochs=1,
            out=self.out.rstrip("/") + "-quick",
            results=str(Path(self.results) / "quick"),
        )


def base_config(study: Study) -> TrainConfig:
    """The recipe the runs start from: digits, or `small` sized from the folder."""
    if study.data == "digits":
        base = recipes.digits()
    else:
        base = recipes.small(data_survey.survey(study.data))
    # No EMA: the table reads the raw weights, and an EMA evaluation would double each epoch's.
    return dataclasses.replace(
        base,
        batch_size=study.batch_size or base.batch_size,
        progress="none",
        ema=dataclasses.replace(base.ema, enabled=False),
    )


def run_config(
    base: TrainConfig, study: Study, fraction: float, seed: int, method: str, out: Path
) -> TrainConfig:
    data = dataclasses.replace(
        base.data,
        label_fraction=fraction,
        subset_seed=seed,
        subset_repeats=max(1, round(1 / fraction)),
    )
    teacher = dataclasses.replace(
        base.teacher,
        path=None if method == "teacher" else str(out.parent / "teacher"),
        optim=dataclasses.replace(
            base.teacher.optim,
            epochs=study.teacher_epochs,
            warmup_epochs=min(base.teacher.optim.warmup_epochs, study.teacher_epochs / 4),
        ),
    )
    optim = dataclasses.replace(
        base.optim,
        epochs=study.epochs,
        warmup_epochs=min(base.optim.warmup_epochs, study.epochs / 4),
    )
    return dataclasses.replace(
        base,
        seed=seed,
        output=str(out),
        data=data,
        optim=optim,
        teacher=teacher,
        loss=LossConfig(distillation="none" if method == "teacher" else method),
        log_every=10_000,  # the study prints one line per run
        checkpoint_every=10_000,  # a checkpoint at each epoch's end is enough to resume
    )


def cell_dir(study: Study, fraction: float, seed: int) -> Path:
    return Path(study.out) / f"f{fraction:.2f}" / f"seed{seed}"


def train_teacher(cfg: TrainConfig, cell: Path) -> None:
    """The cell's ResNet teacher into `cell/teacher` (`run.resolve_teacher`, which resumes a
    stopped one and reuses a finished one)."""
    train, val = data_lib.load_sources(cfg.data)
    resolve_teacher(dataclasses.replace(cfg, output=str(cell)), train, val, resume=False)


def token_story(folder: Path, images: list[np.ndarray]) -> dict[str, Any]:
    """CLS vs DIST cosine through the student in `folder` (`visualize.token_similarity`) and how
    often the two heads' argmax agree, over `images`."""
    opened = pretrained.open_model(folder)
    x = opened.preprocessing.inputs(images)
    out, _, tokens = forward_with_attention(opened.model, opened.variables, x)
    sim = token_similarity(opened.variables["params"], tokens)
    agree = np.argmax(out.cls_logits, -1) == np.argmax(out.dist_logits, -1)
    return {**sim, "agreement": float(agree.mean() * 100)}


def estimate(study: Study, cfg: TrainConfig, todo: dict[str, int], first: bool) -> float:
    """Seconds for `todo` runs of each kind, from the constants above (`first`: nothing has
    been compiled yet)."""
    train, _ = data_lib.load_sources(dataclasses.replace(cfg.data, label_fraction=1.0))
    per_epoch = len(train) // cfg.batch_size
    total = COMPILE_S if first else 0.0
    for kind, epochs in (("teacher", study.teacher_epochs), ("student", study.epochs)):
        each = FIXED_S[kind] + epochs * (per_epoch * STEP_S[kind] + EPOCH_S[kind])
        total += todo[kind] * each
    return total


def done(kind: str, folder: Path) -> bool:
    if kind == "teacher":
        return (folder / "final" / export.CONFIG).is_file()
    return (folder / "results.json").is_file()


def main(study: Study) -> None:
    study = study.sized()
    jax.config.update("jax_compilation_cache_dir", str(Path(study.out).absolute() / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    base = base_config(study)
    plan = [
        (f, s, kind)
        for f in study.fractions
        for s in study.seeds
        for kind in ("teacher", "hard", "soft", "none")
    ]
    folder = lambda f, s, kind: cell_dir(study, f, s) / kind
    todo = {"teacher": 0, "student": 0}
    for f, s, kind in plan:
        if not done(kind, folder(f, s, kind)):
            todo["teacher" if kind == "teacher" else "student"] += 1
    guess = estimate(study, base, todo, first=sum(todo.values()) == len(plan))
    print(
        f"distillation study on {study.data}: fractions {list(study.fractions)}, seeds "
        f"{list(study.seeds)}, {study.epochs} student / {study.teacher_epochs} teacher epochs at "
        f"batch {base.batch_size}; {todo['teacher']} teachers and {todo['student']} students to "
        f"train ({len(plan) - sum(todo.values())} done already): about {duration(guess)}",
        flush=True,
    )
    _, val = data_lib.load_sources(base.data)
    picks = np.linspace(0, len(val) - 1, min(study.token_images, len(val))).round().astype(int)
    images = [val.load(int(i)) for i in np.unique(picks)]
    start, ran = time.perf_counter(), 0
    for f, s, kind in plan:
        out = folder(f, s, kind)
        if done(kind, out):
            continue
        cfg = run_config(base, study, f, s, kind, out)
        tick = time.perf_counter()
        if kind == "teacher":
            train_teacher(cfg, out.parent)
            note = "teacher trained"
        else:
            summary = train_and_evaluate(cfg, resume=saved_progress(out) is not None)
            tokens = token_story(out / "final", images)
            (out / "tokens.json").write_text(json.dumps(tokens, indent=2))
            note = f"avg {summary['val']['avg']['top1']:.2f}%"
            if "teacher" in summary:
                note += f" (teacher {summary['teacher']['top1']:.2f}%)"
            note += f", heads agree {tokens['agreement']:.1f}%"
        ran += 1
        left = sum(1 for g, t, k in plan if not done(k, folder(g, t, k)))
        pace = (time.perf_counter() - start) / ran
        print(
            f"[fraction {f:g} seed {s} {kind}] {note} in {duration(time.perf_counter() - tick)}; "
            f"{left} run(s) left, about {duration(pace * left)}",
            flush=True,
        )
    report(study, base)


def _rows(study: Study) -> list[dict[str, Any]]:
    rows = []
    for f in study.fractions:
        for s in study.seeds:
            cell = cell_dir(study, f, s)
            for kind in METHODS:
                summary = json.loads((cell / kind / "results.json").read_text())
                tokens = json.loads((cell / kind / "tokens.json").read_text())
                row = {"fraction": f, "seed": s, "method": kind, "tokens": tokens}
                row.update({h: summary["val"][h]["top1"] for h in ("cls", "dist", "avg")})
                if "teacher" in summary:
                    row["teacher"] = summary["teacher"]["top1"]
                rows.append(row)
    return rows


def report(study: Study, base: TrainConfig) -> None:
    """The JSON of every run, the markdown tables and the plot."""
    rows = _rows(study)
    results = Path(study.results)
    results.mkdir(parents=True, exist_ok=True)
    n_train = len(data_lib.load_sources(base.data)[0])
    pick = lambda f, kind, key="avg": [
        r[key] for r in rows if r["fraction"] == f and r["method"] == kind
    ]
    teacher = {
        f: [r["teacher"] for r in rows if r["fraction"] == f and r["method"] == "soft"]
        for f in study.fractions
    }
    n = len(study.seeds)
    lines = [
        f"Val top-1 % (averaged heads), mean ± std over {n} seeds; distilled − undistilled: the "
        f"mean paired difference per seed with its 95% paired t interval (* excludes 0).",
        "",
        "| labelled | teacher (ResNet-8) | no distillation | soft | hard | soft − none "
        "| hard − none |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in study.fractions:
        none = pick(f, "none")
        diffs = [paired_cell(paired_t(pick(f, k), none)) for k in ("soft", "hard")]
        count = sum(max(1, round(f * c)) for c in _class_counts(base))
        lines.append(
            f"| {f:.0%} ({count:,} of {n_train:,}) | {cell(teacher[f])} | {cell(none)} | "
            f"{cell(pick(f, 'soft'))} | {cell(pick(f, 'hard'))} | {diffs[0]} | {diffs[1]} |"
        )
    lines += ["", "Per head (class / distillation), mean over seeds:", ""]
    lines += ["| labelled | method | class head | dist. head | averaged |", "|---|---|---|---|---|"]
    for f in study.fractions:
        for kind in METHODS:
            heads = " | ".join(cell(pick(f, kind, h)) for h in ("cls", "dist", "avg"))
            lines.append(f"| {f:.0%} | {NAMES[kind]} | {heads} |")
    depth = len(rows[0]["tokens"]["layers"])
    lines += [
        "",
        "CLS vs DIST: cosine of the learned tokens (input), after each block and after the final "
        "norm (output), of the two heads' weights, and the heads' argmax agreement (%), mean over "
        "seeds:",
        "",
        "| labelled | method | input | "
        + " | ".join(f"block {i + 1}" for i in range(depth))
        + " | output | head weights | heads agree |",
        "|---|---|---|" + "---|" * depth + "---|---|---|",
    ]
    for f in study.fractions:
        for kind in METHODS:
            tok = [r["tokens"] for r in rows if r["fraction"] == f and r["method"] == kind]
            mean = lambda key, tok=tok: mean_std([t[key] for t in tok])[0]
            blocks = " | ".join(
                f"{mean_std([t['layers'][i] for t in tok])[0]:.2f}" for i in range(depth)
            )
            lines.append(
                f"| {f:.0%} | {NAMES[kind]} | {mean('input'):.2f} | {blocks} | "
                f"{mean('output'):.2f} | {mean('heads'):.2f} | {mean('agreement'):.1f} |"
            )
    table = "\n".join(lines) + "\n"
    (results / "distillation_study.md").write_text(table)
    (results / "distillation_study.json").write_text(
        json.dumps({"study": dataclasses.asdict(study), "runs": rows}, indent=2)
    )
    plot(study, rows, teacher, results / "distillation_study.png")
    print(table)


def _class_counts(base: TrainConfig) -> list[int]:
    train, _ = data_lib.load_sources(dataclasses.replace(base.data, label_fraction=1.0))
    return np.bincount(np.asarray(train.labels)).tolist()


def plot(study: Study, rows: list[dict], teacher: dict[float, list[float]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(study.fractions)
    series = {"teacher (ResNet-8)": [mean_std(teacher[f]) for f in xs]}
    for kind in METHODS:
        series[f"DeiT, {NAMES[kind]}"] = [
            mean_std([r["avg"] for r in rows if r["fraction"] == f and r["method"] == kind])
            for f in xs
        ]
    for label, points in series.items():
        means, spreads = zip(*points, strict=True)
        dashed = label.startswith("teacher")
        ax.errorbar(
            [x * 100 for x in xs],
            means,
            yerr=spreads,
            label=label,
            capsize=3,
            marker="o",
            linestyle="--" if dashed else "-",
            color="grey" if dashed else None,
        )
    ax.set_xscale("log")
    ax.set_xticks([x * 100 for x in xs], [f"{x:.0%}" for x in xs])
    ax.minorticks_off()
    ax.set(
        xlabel="labelled fraction of the training set",
        ylabel="val top-1 % (averaged heads)",
        title=f"{study.data}: mean ± std over {len(study.seeds)} seeds, equal steps",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main(tyro.cli(Study))
