"""The DeiT III recipes against README_revenge.md's commands (facebookresearch/deit), constant
by constant; sized from the model; and an official command line through `deit train`'s parser
gives the recipe's settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deit import cli, cli_train, recipes
from deit.optim import scaled_lr
from deit.recipes_deit3 import deit3_size

PRETRAIN = [  # size, model, peak lr at 2048, drop path, side (README_revenge.md, 1k training)
    ("small", "deit3_small_patch16_224", 4e-3, 0.05, 224),
    ("base", "deit3_base_patch16_224", 3e-3, 0.2, 192),
    ("large", "deit3_large_patch16_224", 3e-3, 0.45, 192),
    ("huge", "deit3_huge_patch14_224", 3e-3, 0.6, 160),
]


@pytest.mark.parametrize(("size", "model", "lr", "drop_path", "side"), PRETRAIN)
def test_deit3_pretraining_constants(size, model, lr, drop_path, side):
    cfg = recipes.recipe("deit3", model)
    assert deit3_size(model) == size and cfg.recipe == "deit3" and cfg.model.name == model
    assert cfg.batch_size == 2048
    assert scaled_lr(cfg.optim, cfg.batch_size) == pytest.approx(lr, rel=1e-12)
    # the project's linear rule: half the batch, half the lr
    assert scaled_lr(cfg.optim, 1024) == pytest.approx(lr / 2, rel=1e-12)
    assert (cfg.model.drop_path_rate, cfg.model.drop_path_schedule) == (drop_path, "uniform")
    assert cfg.data.img_size == side
    o = cfg.optim
    assert (o.opt, o.weight_decay, o.epochs, o.warmup_epochs, o.warmup_lr) == (
        "lamb", 0.05, 800, 5, 1e-6)  # fmt: skip
    assert o.clip_grad_norm == 1.0  # FusedLAMB's max_grad_norm
    m = cfg.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing) == (0.8, 1.0, 0.0)
    assert cfg.loss.bce and cfg.loss.distillation == "none"
    d = cfg.data
    assert d.three_augment and not d.src and d.color_jitter == 0.3
    assert d.randaugment is None and cfg.erasing.prob == 0.0 and d.repeats == 3


@pytest.mark.parametrize(
    ("model", "drop_path", "side", "ft_model"),
    [
        ("deit3_small_patch16_224", 0.0, 384, "deit3_small_patch16_384"),
        ("deit3_base_patch16_224", 0.2, 224, "deit3_base_patch16_224"),
        ("deit3_large_patch16_224", 0.45, 224, "deit3_large_patch16_224"),
        ("deit3_huge_patch14_224", 0.55, 224, "deit3_huge_patch14_224"),
    ],
)
def test_deit3_finetune_constants(model, drop_path, side, ft_model):
    cfg = recipes.recipe("deit3-ft", model)
    assert cfg.model.name == ft_model and cfg.data.img_size == side
    assert cfg.model.drop_path_rate == drop_path and cfg.model.drop_path_schedule == "uniform"
    assert cfg.batch_size == 512 and scaled_lr(cfg.optim, 512) == pytest.approx(1e-5)
    o = cfg.optim
    assert (o.opt, o.weight_decay, o.epochs, o.warmup_epochs) == ("adamw", 0.1, 20, 5)
    assert cfg.mixup.label_smoothing == 0.1 and not cfg.loss.bce
    assert cfg.data.randaugment == "rand-m9-mstd0.5-inc1" and not cfg.data.three_augment
    assert cfg.data.repeats == 1 and cfg.erasing.prob == 0.0


@pytest.mark.parametrize(
    ("model", "pre", "ft", "epochs", "side"),
    [
        ("deit3_small_patch16_224", 0.05, 0.05, 240, 224),
        ("deit3_base_patch16_224", 0.1, 0.15, 240, 224),
        ("deit3_large_patch16_224", 0.3, 0.4, 240, 224),
        ("deit3_huge_patch14_224", 0.5, 0.45, 90, 128),
    ],
)
def test_deit3_21k_constants(model, pre, ft, epochs, side):
    cfg = recipes.recipe("deit3-21k", model)
    assert scaled_lr(cfg.optim, cfg.batch_size) == pytest.approx(1e-3)
    assert (cfg.model.drop_path_rate, cfg.optim.epochs, cfg.data.img_size) == (pre, epochs, side)
    assert (cfg.optim.opt, cfg.optim.weight_decay) == ("lamb", 0.02)
    assert (cfg.mixup.mixup_alpha, cfg.mixup.cutmix_alpha, cfg.mixup.label_smoothing) == (
        0.0, 1.0, 0.1)  # fmt: skip
    assert cfg.data.three_augment and cfg.data.src and cfg.data.repeats == 1
    assert not cfg.loss.bce
    cfg = recipes.recipe("deit3-21k-ft", model)
    assert scaled_lr(cfg.optim, cfg.batch_size) == pytest.approx(3e-4)
    assert (cfg.model.drop_path_rate, cfg.optim.epochs, cfg.data.img_size) == (ft, 50, 224)
    assert cfg.data.src and cfg.optim.opt == "lamb" and cfg.optim.weight_decay == 0.02


def parse(*argv: str):
    return cli_train.parse(list(argv))[0]


def test_the_size_comes_from_the_model_flag_the_config_file_or_the_checkpoint(tmp_path):
    assert parse("--recipe", "deit3").model.name == "deit3_small_patch16_224"
    base = parse("--recipe", "deit3", "--model", "deit3_base_patch16_224")
    assert (base.data.img_size, base.model.drop_path_rate) == (192, 0.2)
    # a partial file naming the model
    (tmp_path / "c.json").write_text(
        json.dumps({"recipe": "deit3", "model": {"name": "deit3_large_patch16_224"}})
    )
    assert parse("--config", str(tmp_path / "c.json")).model.drop_path_rate == 0.45
    assert recipes.from_dict(json.loads((tmp_path / "c.json").read_text())).data.img_size == 192
    # a checkpoint's config.json names its variant
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"variant": "deit3_huge_patch14_224"}))
    cfg = parse("--recipe", "deit3-ft", "--finetune", str(ckpt))
    assert cfg.model.drop_path_rate == 0.55 and cfg.finetune == str(ckpt)


def test_an_official_deit3_command_gives_the_recipe():
    # README_revenge.md's ViT-B ImageNet-1k command (--batch 256 x 8 GPUs as the global batch;
    # launcher, path, --sched cosine, --drop 0.0, --nb-classes and --seed dropped)
    command = (
        "--model deit3_base_patch16_224 --batch-size 2048 --lr 3e-3 --epochs 800 "
        "--weight-decay 0.05 --input-size 192 --reprob 0.0 --smoothing 0.0 --warmup-epochs 5 "
        "--opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.2 --cutmix 1.0 --unscale-lr "
        "--repeated-aug --bce-loss --color-jitter 0.3 --ThreeAugment"
    )
    argv = command.split()
    # the official default is --distillation-type none; this project's imagenet recipe distils
    cfg = cli_train.parse(["--recipe", "imagenet", *argv, "--distillation", "none"])[0]
    want = recipes.recipe("deit3", "deit3_base_patch16_224")
    assert cfg.optim.lr == 3e-3 == pytest.approx(scaled_lr(want.optim, 2048))
    assert cfg.optim.opt == "lamb" and cfg.loss == want.loss
    assert cfg.mixup == want.mixup and cfg.erasing.prob == 0.0
    assert cfg.data.three_augment and cfg.data.img_size == 192 and cfg.data.repeats == 3
    assert cfg.model.drop_path_rate == 0.2


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_sized_deit3_config_round_trips(suffix, tmp_path, capsys):
    argv = ["train", "--recipe", "deit3", "--model", "deit3_large_patch16_224", "--print-config"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    path = tmp_path / f"c{suffix}"
    path.write_text(printed)
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert json.loads(printed)["recipe"] == "deit3"


def test_bce_with_label_smoothing_is_one_line(capsys):
    assert cli.main(["train", "--bce-loss", "--smoothing", "0.1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--loss.bce with --mixup.label-smoothing 0.1; expected 0" in err
    assert "\n" not in err and "Traceback" not in err


def test_deit3_small_is_small_with_deit3s_changes():
    small, d3 = recipes.small(), recipes.recipe("deit3-small")
    assert d3.model.name == "deit3_digits_patch4_16" and d3.model.drop_path_schedule == "uniform"
    assert (d3.batch_size, d3.data.img_size, d3.time_budget) == (
        small.batch_size, small.data.img_size, small.time_budget)  # fmt: skip
    assert d3.loss.bce and d3.loss.distillation == "none" and d3.optim.opt == "lamb"
    assert d3.data.three_augment and d3.data.randaugment is None and d3.erasing.prob == 0.0
    # small's student dropped mixup/cutmix below 112 px; DeiT III keeps its 10% share.
    assert small.mixup.prob == 0.0 and d3.mixup.prob == 0.1 and d3.mixup.label_smoothing == 0.0


@pytest.mark.slow
def test_a_tiny_deit3_trains_end_to_end_on_digits(tmp_path):
    # The deit3-small recipe on the built-in digits with the tiny DeiT III test variant for 3
    # epochs (no warm-up, to see it learn that soon): LAMB, BCE, 3-Augment, uniform drop path,
    # checkpoints and the export, through the whole run.
    from deit import export, run

    cfg = parse(
        "--recipe", "deit3-small", "--model", "deit3_test_patch4_32", "--epochs", "3",
        "--warmup-epochs", "0", "--time-budget", "None", "--batch-size", "64",
        "--output", str(tmp_path / "run"), "--progress", "none", "--log-every", "1",
    )  # fmt: skip
    assert cfg.data.three_augment and cfg.loss.bce and cfg.optim.opt == "lamb"
    results = run.train_and_evaluate(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 3 * (1437 // 64)
    # BCE over 10 classes starts at ln 2 per entry, and falls
    assert losses[0] == pytest.approx(np.log(2.0), abs=0.05)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert results["epochs"] == 3 and set(results["val"]) == {"avg", "cls"}
    _, _, config = export.load_model(tmp_path / "run" / "final")
    assert config["variant"] == "deit3_test_patch4_32"
