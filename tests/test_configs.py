"""The config tree's backend-dependent default (the compute dtype), and the `small` recipe's
choices from a folder's survey (`recipes.small`, issue 25)."""

import dataclasses

import pytest
import yaml

from deit import configs, recipes, variants
from deit.data.survey import DataSurvey


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_elsewhere():
    cfg = recipes.imagenet()
    assert cfg.model.dtype == "auto"
    assert configs.resolve_dtype(cfg, "gpu").model.dtype == "bfloat16"
    assert configs.resolve_dtype(cfg, "cpu").model.dtype == "float32"
    chosen = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    assert configs.resolve_dtype(chosen, "gpu").model.dtype == "float32"
    assert configs.resolve_dtype(cfg, "gpu").optim == cfg.optim


def survey(count=3000, side=28, channels=1, classes=10, balance=1.0):
    return DataSurvey("folder", count, classes, side, channels, balance)


def test_28px_grey_3000_images_get_the_light_small_image_recipe():
    cfg = recipes.small(survey())
    assert cfg.recipe == "small" and cfg.time_budget == "15m"
    # 8x8 patches on the image upsampled to 32: 16 tokens (49 at patches of 4).
    assert cfg.model.name == "deit_digits_distilled_patch8_32" and cfg.data.img_size == 32
    assert cfg.batch_size == 64 and cfg.optim.lr == pytest.approx(2e-3 * (64 / 128) ** 0.5)
    assert cfg.optim.warmup_epochs == 2 and cfg.epochs == recipes.SMALL_EPOCHS[1]  # a ceiling
    assert cfg.teacher.arch == "resnet8"
    assert cfg.teacher.optim.epochs == recipes.SMALL_TEACHER_EPOCHS
    d = cfg.data
    assert d.scale == (0.6, 1.0) and d.randaugment is None
    assert d.hflip == 0.0 and d.crop_pct == 1.0 and d.repeats == 1
    assert cfg.mixup.prob == 0.0 and cfg.mixup.label_smoothing == 0.0
    assert cfg.erasing.prob == 0.0 and cfg.model.drop_path_rate == 0.0
    assert cfg.optim.weight_decay == recipes.SMALL_WEIGHT_DECAY
    # The teacher keeps its own regularisation: only the student's is lightened.
    assert cfg.teacher.optim.weight_decay == recipes.digits().teacher.optim.weight_decay


def test_flips_only_for_colour():
    assert recipes.small(survey(channels=1)).data.hflip == 0.0
    assert recipes.small(survey(channels=3)).data.hflip == 0.5


def test_large_images_keep_deit_tiny_and_the_stronger_augmentation():
    cfg = recipes.small(survey(count=5000, side=200, channels=3))
    assert cfg.model.name == "deit_tiny_distilled_patch16_224" and cfg.data.img_size == 192
    assert cfg.data.scale == (0.35, 1.0) and cfg.data.randaugment == "rand-m5-mstd0.5-inc1"
    assert cfg.data.crop_pct == 0.875 and cfg.model.drop_path_rate == 0.1
    assert cfg.mixup == recipes.digits().mixup and cfg.optim.weight_decay == 0.05


@pytest.mark.parametrize(
    ("count", "batch"), [(40, 8), (300, 16), (1252, 32), (2000, 32), (3000, 64), (9000, 128)]
)
def test_the_batch_leaves_enough_steps_per_epoch(count, batch):
    assert recipes.small_batch(count) == batch
    assert count // batch >= 4


def test_the_grid_stays_whole_for_any_size():
    for side, count in [(8, 1437), (28, 40), (50, 300), (150, 500), (640, 2000), (30, 20000)]:
        cfg = recipes.small(survey(count=count, side=side, channels=3))
        spec = variants.get_spec(cfg.model.name)
        assert cfg.data.img_size % spec.patch_size == 0 and cfg.data.img_size <= 224
        assert 0.9 <= cfg.ema.decay <= 0.9999


def test_the_budget_is_checked_where_it_is_set():
    from deit.errors import InputError

    with pytest.raises(InputError, match="time_budget"):
        configs.TrainConfig(time_budget="soon")
    assert recipes.from_dict({"recipe": "digits", "time_budget": "5m"}).time_budget == "5m"
    assert recipes.digits().time_budget is None and recipes.imagenet().time_budget is None


def test_the_survey_describes_what_chose_the_recipe():
    text = survey().describe()
    assert (
        text
        == "3,000 training images (under 10,000) of ~28 px (under 112), grey, 10 classes, balanced"
    )
    assert "smallest class 25% of largest" in survey(balance=0.25).describe()


@pytest.mark.parametrize(
    ("side", "model", "size"),
    [
        (8, "deit_digits_distilled_patch4_16", 16),
        (20, "deit_digits_distilled_patch4_16", 20),
        (28, "deit_digits_distilled_patch8_32", 32),
        (48, "deit_digits_distilled_patch8_32", 48),
        (100, "deit_digits_distilled_patch8_32", 64),
        (112, "deit_tiny_distilled_patch16_224", 112),
    ],
)
def test_the_model_and_size_follow_the_side(side, model, size):
    cfg = recipes.small(survey(side=side))
    assert (cfg.model.name, cfg.data.img_size) == (model, size)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_a_printed_config_read_back_prints_identically(name, suffix, tmp_path, capsys):
    """`deit train --print-config > c.yaml; deit train --config c.yaml` (issue 26): YAML 1.1
    reads the printed `1e-08` as a string, and a recipe's int in a float field (`1`) must not
    come back as `1.0`."""
    from deit import cli

    assert cli.main(["train", "--recipe", name, "--print-config"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / f"c{suffix}"
    path.write_text(printed)
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_scientific_notation_is_a_number_wherever_the_field_is_a_float():
    values = yaml.safe_load("optim: {eps: 1e-08, base_lr: 5e-4, warmup_epochs: 1}")
    assert values["optim"]["eps"] == "1e-08"  # what YAML 1.1 gives: the reason for the fix
    cfg = recipes.from_dict({"recipe": "digits", **values})
    assert cfg.optim.eps == 1e-8 and cfg.optim.base_lr == 5e-4
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    with pytest.raises(configs.ConfigError, match=r"optim\.eps 'small'; expected float"):
        recipes.from_dict({"optim": {"eps": "small"}})
    # A string field keeps its text, number-like or not.
    assert recipes.from_dict({"output": "1e3"}).output == "1e3"
