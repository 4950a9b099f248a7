"""`deit train`'s command line over the config tree: dotted flags, aliases, config files,
`--print-config`, and each bad input as one line with exit 2."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import yaml

from deit import cli, cli_train, configs, recipes, variants
from deit.configs import ConfigError


def parse(*argv: str) -> configs.TrainConfig:
    return cli_train.parse(list(argv))[0]


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_round_trips_through_print_config(name, tmp_path, capsys):
    assert cli.main(["train", "--recipe", name, "--print-config"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "config.json"
    path.write_text(printed)
    assert parse("--config", str(path)) == recipes.recipe(name)
    assert recipes.from_dict(json.loads(printed)) == recipes.recipe(name)


# Each official main.py flag (and the older short names) with a value and the field it sets.
ALIASES = [
    ("--data-path", "/data/in1k", ("data", "dataset"), "/data/in1k"),
    ("--input-size", "384", ("data", "img_size"), 384),
    ("--aa", "rand-m7-mstd0.5-inc1", ("data", "randaugment"), "rand-m7-mstd0.5-inc1"),
    ("--train-interpolation", "bilinear", ("data", "interpolation"), "bilinear"),
    ("--eval-crop-ratio", "0.9", ("data", "crop_pct"), 0.9),
    ("--num_workers", "3", ("data", "workers"), 3),
    ("--model", "deit_small_patch16_224", ("model", "name"), "deit_small_patch16_224"),
    ("--drop-path", "0.2", ("model", "drop_path_rate"), 0.2),
    ("--epochs", "7", ("optim", "epochs"), 7),
    ("--lr", "1e-3", ("optim", "base_lr"), 1e-3),
    ("--opt", "sgd", ("optim", "opt"), "sgd"),
    ("--opt-eps", "1e-6", ("optim", "eps"), 1e-6),
    ("--momentum", "0.8", ("optim", "momentum"), 0.8),
    ("--weight-decay", "0.3", ("optim", "weight_decay"), 0.3),
    ("--clip-grad", "1.5", ("optim", "clip_grad_norm"), 1.5),
    ("--warmup-epochs", "2", ("optim", "warmup_epochs"), 2.0),
    ("--warmup-lr", "1e-7", ("optim", "warmup_lr"), 1e-7),
    ("--min-lr", "2e-6", ("optim", "min_lr"), 2e-6),
    ("--smoothing", "0.2", ("mixup", "label_smoothing"), 0.2),
    ("--mixup", "0.5", ("mixup", "mixup_alpha"), 0.5),
    ("--cutmix", "0", ("mixup", "cutmix_alpha"), 0.0),
    ("--mixup-prob", "0.7", ("mixup", "prob"), 0.7),
    ("--mixup-switch-prob", "0.2", ("mixup", "switch_prob"), 0.2),
    ("--reprob", "0.4", ("erasing", "prob"), 0.4),
    ("--remode", "const", ("erasing", "mode"), "const"),
    ("--model-ema-decay", "0.999", ("ema", "decay"), 0.999),
    ("--distillation-type", "soft", ("loss", "distillation"), "soft"),
    ("--distillation-alpha", "0.3", ("loss", "alpha"), 0.3),
    ("--distillation-tau", "3", ("loss", "tau"), 3.0),
    ("--teacher-path", "/ckpt/regnety", ("teacher", "path"), "/ckpt/regnety"),
    ("--teacher-model", "resnet50", ("teacher", "arch"), "resnet50"),
    ("--teacher-epochs", "4", ("teacher", "optim", "epochs"), 4),
    ("--output_dir", "/tmp/somewhere", ("output",), "/tmp/somewhere"),
    ("--img-size", "32", ("data", "img_size"), 32),
    ("--workers", "1", ("data", "workers"), 1),
    ("--color-jitter", "0.4", ("data", "color_jitter"), 0.4),
    ("--opt", "lamb", ("optim", "opt"), "lamb"),
    ("--opt", "fusedlamb", ("optim", "opt"), "lamb"),  # apex's LAMB, the DeiT III commands'
]


def _get(cfg, path):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


@pytest.mark.parametrize(("flag", "value", "path", "expected"), ALIASES)
def test_each_alias_sets_its_field(flag, value, path, expected):
    default = _get(parse(), path)
    assert default != expected  # the flag changes something
    assert _get(parse(flag, value), path) == expected
    assert _get(parse(f"{flag}={value}"), path) == expected


def test_official_switches():
    assert parse("--no-model-ema").ema.enabled is False
    assert parse("--repeated-aug").data.repeats == 3
    assert parse("--recipe", "imagenet", "--no-repeated-aug").data.repeats == 1
    assert parse("--fsdp").parallel.fsdp is True
    assert parse("--remat").model.remat is True
    # DeiT III's (README_revenge.md)
    assert parse("--bce-loss", "--smoothing", "0").loss.bce is True
    assert parse("--ThreeAugment").data.three_augment is True
    assert parse("--ThreeAugment", "--src").data.src is True
    # --unscale-lr: --lr is the peak lr itself; alone it leaves the recipe's lr
    cfg = parse("--recipe", "imagenet", "--lr", "4e-3", "--unscale-lr")
    assert cfg.optim.lr == 4e-3 and cfg.optim.base_lr == recipes.imagenet().optim.base_lr
    assert parse("--unscale-lr", "--lr=1e-3").optim.lr == 1e-3
    assert parse("--recipe", "imagenet", "--unscale-lr").optim == recipes.imagenet().optim


def test_dotted_flags_reach_nested_fields():
    cfg = parse("--optim.weight-decay", "0.01", "--mixup.cutmix-alpha", "0", "--ema.warmup")
    assert cfg.optim.weight_decay == 0.01 and cfg.mixup.cutmix_alpha == 0.0 and cfg.ema.warmup
    cfg = parse("--data.scale", "0.2", "0.9", "--optim.lr", "None", "--teacher.optim.lr", "0.1")
    assert cfg.data.scale == (0.2, 0.9) and cfg.optim.lr is None and cfg.teacher.optim.lr == 0.1
    # Untouched fields keep the recipe's values.
    assert dataclasses.replace(cfg, data=recipes.digits().data, optim=recipes.digits().optim,
                               teacher=recipes.digits().teacher) == recipes.digits()  # fmt: skip


def test_a_paper_readme_command_runs_through_the_parser():
    # The official README's DeiT-S distillation command (paths and --nodes dropped).
    argv = "--model deit_small_distilled_patch16_224 --batch-size 128 --data-path /data/in1k "
    argv += "--output_dir /out --distillation-type hard --teacher-model regnety_160 "
    argv += "--teacher-path /ckpt/regnety_160 --lr 5e-4 --drop-path 0.1 --smoothing 0.1 "
    argv += "--reprob 0.25 --mixup 0.8 --cutmix 1.0 --aa rand-m9-mstd0.5-inc1 --warmup-epochs 5"
    cfg = parse(*argv.split())
    assert cfg.recipe == "imagenet" and cfg.data.dataset == "/data/in1k"
    assert cfg.teacher.path == "/ckpt/regnety_160" and cfg.loss.distillation == "hard"


def test_a_partial_yaml_file_then_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"optim": {"weight_decay": 0.01}, "ema": {"decay": 0.9}}))
    cfg = parse("--config", str(path), "--ema.decay", "0.8")
    assert cfg.optim.weight_decay == 0.01 and cfg.ema.decay == 0.8
    assert cfg.optim.lr == recipes.digits().optim.lr  # the rest: the recipe


def test_resume_reads_the_runs_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = dataclasses.replace(recipes.digits(), seed=7, output=str(run))
    (run / "config.json").write_text(json.dumps(configs.to_dict(saved)))
    cfg = parse("--resume", "--output", str(run))
    assert cfg == saved
    assert parse("--resume", "--output", str(run), "--seed", "8").seed == 8


def test_help_shows_meanings_and_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--optim.weight-decay" in text and "Decoupled weight decay" in text
    assert "--model-ema-decay" in text or "--ema.decay" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--optim.weigth-decay", "1"],
            "unknown option(s) --optim.weigth-decay; did you mean --optim.weight-decay?",
        ),
        (["--optim.lr", "abc"], "--optim.lr 'abc'; expected {None}|FLOAT"),
        (["--epochs", "x"], "--optim.epochs 'x'; expected an integer"),
        (["--weight-decay", "much"], "--optim.weight-decay 'much'; expected a number"),
        (["--optim.weight-decay", "-1"], "--optim.weight-decay -1.0; expected a value >= 0"),
        (
            ["--drop-path", "0.2", "--model.drop-path-rate", "0.1"],
            "--model.drop-path-rate and --drop-path are the same setting",
        ),
        (["--loss.distillation", "sof"], "invalid choice 'sof'"),
        (["--batch-size", "0"], "--batch-size 0; expected a positive number"),
        (["--recipe", "cifar"], "unknown recipe 'cifar'"),
        (["--config", "/nonexistent.json"], "config file /nonexistent.json does not exist"),
    ],
)
def test_bad_command_lines_are_one_line(argv, message, capsys):
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optim": {"warmup_lr": -1}}, "optim.warmup_lr -1.0; expected a value >= 0"),
        ({"optim": {"lr": "fast"}}, "optim.lr 'fast'; expected float"),
        ({"ema": {"decay": 2}}, "ema.decay 2.0; expected a value in [0, 1)"),
        ({"data": {"scale": [0.5]}}, "data.scale [0.5]; expected 2 values"),
        ({"loss": {"distillation": "kd"}}, "loss.distillation 'kd'; expected one of"),
        (
            {"optim": {"lookahead": 1}, "colour": 2},
            "unknown setting(s) optim.lookahead, colour",
        ),
        ({"optim": {"weight_decy": 0.1}}, "(did you mean optim.weight_decay?)"),
        ({"version": 9}, "version 9; this deit reads config version 1"),
    ],
)
def test_bad_config_files_are_one_line(values, message, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err, err


def test_a_file_that_does_not_parse(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "does not parse" in capsys.readouterr().err


def test_config_error_keeps_its_setting():
    with pytest.raises(ConfigError) as err:
        recipes.from_dict({"optim": {"epochs": 0}})
    assert err.value.key == "optim.epochs"


def _documented_fields(cls) -> set[str]:
    """Fields of a dataclass followed by a docstring in its source (tyro's help text)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id
        for a, b in itertools.pairwise(body)
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(getattr(b, "value", None), ast.Constant)
    }


def test_every_setting_has_a_help_text():
    import typing

    todo, missing = [configs.TrainConfig], []
    while todo:
        cls = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                todo.append(hints[f.name])  # a group: its class docstring heads the section
            elif f.name not in _documented_fields(cls):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing


def _folder(root, per_class, size, classes=("cat", "dog")):
    """`root/{train,val}/<class>/<i>.png`: `per_class` training images, 5 val, `size` px."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 5)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_a_small_folder_gets_the_small_recipe_sized_from_its_images(tmp_path, capsys):
    from deit import data, report
    from deit.model import create_model

    root = _folder(tmp_path / "small", per_class=20, size=(28, 28))  # 40 train images
    argv = ["--data", str(root), "--output", str(tmp_path / "run")]
    cfg = parse(*argv)
    assert cfg.recipe == "small" and cfg.data.dataset == str(root)
    patch = variants.get_spec(cfg.model.name).patch_size
    assert cfg.data.img_size == 32 and cfg.data.img_size % patch == 0  # a whole patch grid
    assert cfg.batch_size <= 40 // 4 and cfg.batch_size & (cfg.batch_size - 1) == 0
    assert cfg.teacher.arch == "resnet8" and cfg.epochs <= 300
    why = cli_train.recipe_reason(argv)
    assert "small image folder" in why and "40 training images" in why and "~28 px" in why
    train, val = data.load_sources(cfg.data)
    student = create_model(cfg.model.name, num_classes=2, img_size=cfg.data.img_size)
    capsys.readouterr()
    report.announce(cfg, student, train, val, why=why)
    header = capsys.readouterr().err
    assert f"recipe     small ({why})" in header and "at 32x32" in header


def test_the_small_recipe_keeps_the_grid_whole_for_any_size():
    from deit.data.survey import DataSurvey

    for side, count in [(8, 1437), (28, 40), (50, 300), (150, 500), (640, 2000), (30, 20000)]:
        cfg = recipes.small(DataSurvey("folder", count, 3, side))
        spec = variants.get_spec(cfg.model.name)
        assert cfg.data.img_size % spec.patch_size == 0 and cfg.data.img_size <= 224
        assert 1 <= cfg.batch_size <= max(1, count // 4) and cfg.batch_size <= 128
        assert 10 <= cfg.epochs <= 300
    # The default: the built-in digits, with the small recipe's lighter augmentation.
    d, digits = recipes.small().data, recipes.digits().data
    assert (
        (d.dataset, d.img_size, d.hflip, d.workers)
        == ("digits", 16, 0.0, 0)
        == (
            digits.dataset,
            digits.img_size,
            digits.hflip,
            digits.workers,
        )
    )


def test_a_large_folder_keeps_the_imagenet_recipe(tmp_path, monkeypatch):
    from deit.data import survey

    root = _folder(tmp_path / "big", per_class=1, size=(120, 160))
    monkeypatch.setattr(survey, "SMALL_COUNT", 2)  # 2 train images: "many" here
    cli_train._survey.cache_clear()
    argv = ["--data", str(root)]
    assert parse(*argv).recipe == "imagenet"
    assert "large image folder, 2 training images of ~120 px" in cli_train.recipe_reason(argv)
    cli_train._survey.cache_clear()
    assert parse("--data", "/nonexistent/folder").recipe == "imagenet"  # the run names it
