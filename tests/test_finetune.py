import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import deit
from deit import cli, data, export, recipes
from deit.model import adapt_params
from deit.optim import scaled_lr
from deit.teacher import create_teacher


def test_adapt_params_resamples_the_grid_and_keeps_the_prefix_tokens():
    src = deit.create_model("deit_test_distilled_patch4_32")  # 8x8 grid, 10 classes
    params = deit.init_params(src, 0)
    dst = src.clone(img_size=16, num_classes=3)  # 4x4 grid, 3 classes
    out = adapt_params(params, src, dst, rng=7)
    assert out["pos_embed"].shape == (1, 2 + 16, 32)
    # cls and dist rows untouched; the patch rows are the bicubic resampling of the old grid.
    np.testing.assert_array_equal(out["pos_embed"][:, :2], params["pos_embed"][:, :2])
    want = deit.resample_pos_embed(params["pos_embed"], (4, 4), 2)
    np.testing.assert_array_equal(out["pos_embed"], want)
    # Fresh heads for the new class count; everything else is the checkpoint's.
    fresh = deit.init_params(dst, 7)
    for head in ("cls_head", "dist_head"):
        assert out[head]["kernel"].shape == (32, 3)
        np.testing.assert_array_equal(out[head]["kernel"], fresh[head]["kernel"])
    for name in ("patch_embed", "blocks_0", "norm", "cls_token", "dist_token"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, out[name], params[name])
    # The adapted params run in the new model.
    logits = dst.apply({"params": out}, jnp.zeros((2, 16, 16, 3))).logits
    assert logits.shape == (2, 3)
    # Same class count, same size: nothing changes.
    same = adapt_params(params, src, src)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, params)


def test_adapt_params_refuses_another_architecture():
    src = deit.create_model("deit_test_distilled_patch4_32")
    with pytest.raises(ValueError, match="embed_dim 32 -> 64"):
        adapt_params(deit.init_params(src, 0), src, src.clone(embed_dim=64, mlp_dim=128))


def test_finetune_recipes_follow_the_reference():
    small = recipes.recipe("finetune")
    assert small.optim.opt == "sgd" and small.batch_size == 768
    assert small.optim.weight_decay == 1e-4 and small.epochs == 1000
    assert small.erasing.prob == 0.0 and small.model.drop_path_rate == 0.0
    # The official linear scaling: 0.01 quoted, 0.015 at a batch of 768.
    assert scaled_lr(small.optim, small.batch_size) == pytest.approx(0.015)
    big = recipes.recipe("finetune-384")
    assert big.data.img_size == 384 and big.epochs == 30 and big.batch_size == 512
    assert scaled_lr(big.optim, big.batch_size) == pytest.approx(5e-6)
    assert big.optim.min_lr == 5e-6 and big.optim.weight_decay == 1e-8


def _image_folder(root, classes=3, train=6, val=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.slow
def test_finetune_at_another_resolution_and_class_count(tmp_path, capsys):
    # The checkpoint: the tiny DeiT at 32x32 with 10 classes.
    src = deit.create_model("deit_test_distilled_patch4_32")
    params = deit.init_params(src, 0)
    export.save_model(
        tmp_path / "ckpt", src, {"params": params}, variant="deit_test_distilled_patch4_32"
    )
    # A frozen 3-class teacher at 16x16, to keep distillation on during fine-tuning.
    teacher = create_teacher("resnet8", 3)
    variables = jax.jit(lambda k: teacher.init(k, jnp.zeros((1, 16, 16, 3))))(jax.random.PRNGKey(1))
    mean, std = list(data.IMAGENET_MEAN), list(data.IMAGENET_STD)
    export.save_model(tmp_path / "teacher", teacher, variables, mean=mean, std=std, img_size=16)
    _image_folder(tmp_path / "images")  # 18 train images: 2 steps of 8

    out = tmp_path / "run"
    args = ["train", "--finetune", str(tmp_path / "ckpt"), "--data", str(tmp_path / "images")]
    args += ["--img-size", "16", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    args += ["--distillation", "hard", "--teacher", str(tmp_path / "teacher")]
    args += ["--output", str(out), "--log-every", "1"]
    assert cli.main(args) == 0
    assert "distillation head" in capsys.readouterr().out

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in steps] == [1, 2]
    assert all(x["kd_loss"] > 0 for x in steps)
    summary = json.loads((out / "results.json").read_text())
    assert summary["finetuned_from"] == str((tmp_path / "ckpt").absolute())
    model, tuned, config = export.load_model(out / "final")
    assert (model.num_classes, model.img_size, config["classes"][0]) == (3, 16, "class0")
    assert config["finetuned_from"] == summary["finetuned_from"]
    tuned = tuned["params"]
    assert tuned["pos_embed"].shape == (1, 18, 32)
    # Two SGD steps at 0.01 * 8 / 512 barely move the weights: they are the checkpoint's.
    np.testing.assert_allclose(
        tuned["blocks_0"]["attn"]["qkv"]["kernel"],
        params["blocks_0"]["attn"]["qkv"]["kernel"],
        atol=1e-3,
    )


def test_finetune_flag_conflicts_with_model(tmp_path, capsys):
    args = ["train", "--finetune", str(tmp_path), "--model", "deit_test_patch4_32"]
    assert cli.main([*args, "--output", str(tmp_path / "o")]) == 2
    assert "the fine-tuned network is the checkpoint's" in capsys.readouterr().err
