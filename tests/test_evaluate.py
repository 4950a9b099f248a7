import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import deit
from deit import data, evaluate, export
from deit.teacher import create_teacher
from deit.transforms import eval_transform
from deit.variants import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def test_batch_sums_on_fixed_logits():
    # 4 samples, 6 classes; true classes ranked 1st, 2nd, 6th, 1st; the last one is padding.
    logits = jnp.array(
        [
            [5.0, 1, 0, 0, 0, 0],
            [3.0, 4, 0, 0, 0, 0],
            [0.0, 1, 2, 3, 4, 5],
            [0.0, 0, 9, 0, 0, 0],
        ]
    )
    labels = jnp.array([0, 0, 0, 2])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    sums = evaluate.batch_sums(logits, labels, mask)
    assert float(sums["top1"]) == 1.0
    assert float(sums["top5"]) == 2.0  # rank 6 is outside the top 5
    assert float(sums["count"]) == 3.0
    logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    expected = -(logp[0, 0] + logp[1, 0] + logp[2, 0])
    assert float(sums["loss"]) == pytest.approx(expected, rel=1e-6)


def test_per_head_and_averaged():
    cls = jnp.array([[2.0, 0.0], [2.0, 0.0]])
    dist = jnp.array([[0.0, 1.0], [0.0, 3.0]])
    labels = jnp.array([0, 1])
    sums = evaluate.head_sums(cls, dist, labels, jnp.ones(2))
    result = evaluate.finish({k: {m: float(v) for m, v in s.items()} for k, s in sums.items()})
    assert result["cls"]["top1"] == 50.0  # right on sample 0
    assert result["dist"]["top1"] == 50.0  # right on sample 1
    # Averages: [1, 0.5] -> class 0 (right), [1, 1.5] -> class 1 (right).
    assert result["avg"]["top1"] == 100.0
    assert result["avg"]["top5"] == 100.0
    plain = evaluate.head_sums(cls, None, labels, jnp.ones(2))
    assert set(plain) == {"cls", "avg"}


def test_evaluate_accumulates_over_batches():
    batches = [
        {"logits": jnp.array([[1.0, 0.0]]), "label": jnp.array([0])},
        {"logits": jnp.array([[1.0, 0.0], [1.0, 0.0]]), "label": jnp.array([1, 1])},
    ]

    def step(b):
        return {"avg": evaluate.batch_sums(b["logits"], b["label"], jnp.ones(len(b["label"])))}

    result = evaluate.evaluate(step, batches)
    assert result["avg"]["count"] == 3
    assert result["avg"]["top1"] == pytest.approx(100 / 3)


def test_per_class_sums_on_fixed_logits_and_over_batches():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0], [4.0, 0.0, 0.0]])
    labels = jnp.array([0, 2, 2, 1])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last is padding
    sums = evaluate.per_class_sums(logits, labels, mask)
    np.testing.assert_array_equal(sums["hits"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(sums["count"], [1.0, 0.0, 2.0])
    # Accumulated with the heads' sums, kept apart from them by `evaluate`.
    step = lambda b: {
        "avg": evaluate.batch_sums(b["logits"], b["label"], b["mask"]),
        "per_class": evaluate.per_class_sums(b["logits"], b["label"], b["mask"]),
    }
    batch = {"logits": logits, "label": labels, "mask": mask}
    out = evaluate.evaluate(step, [batch, batch])
    np.testing.assert_array_equal(out["per_class"]["hits"], [2.0, 0.0, 2.0])
    np.testing.assert_array_equal(out["per_class"]["count"], [2.0, 0.0, 4.0])
    assert out["avg"]["count"] == 6 and out["avg"]["top1"] == pytest.approx(100 * 4 / 6)


def test_preprocessing_from_config_fills_in_the_registry():
    base384 = deit.create_model("deit_base_patch16_384")
    prep = Preprocessing.from_config({"variant": "deit_base_patch16_384"}, base384)
    assert prep == Preprocessing(384, IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic")
    tiny = deit.create_model("deit_tiny_patch16_224")
    assert Preprocessing.from_config({"variant": "deit_tiny_patch16_224"}, tiny).crop_pct == 0.875
    # A converted model at another size keeps its variant's crop; its size is the model's.
    big_tiny = deit.create_model("deit_tiny_patch16_224", img_size=288)
    prep = Preprocessing.from_config({"variant": "deit_tiny_patch16_224"}, big_tiny)
    assert (prep.img_size, prep.crop_pct) == (288, 0.875)
    # What the folder says wins, and to_config writes exactly what from_config reads.
    written = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}
    written["interpolation"] = "bilinear"
    prep = Preprocessing.from_config({"variant": "deit_tiny_patch16_224", **written}, tiny)
    assert prep == Preprocessing(16, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    assert prep.to_config() == written
    assert Preprocessing.from_config(prep.to_config(), tiny) == prep
    # No variant and no size: a ResNet gets the registry's defaults at 224.
    resnet = create_teacher("resnet8", 10)
    assert Preprocessing.from_config({}, resnet) == Preprocessing(224)
    assert Preprocessing.from_data(data.DataConfig(img_size=16, crop_pct=1.0)).crop_pct == 1.0


def test_preprocessing_refuses_bad_values():
    with pytest.raises(ValueError, match="img_size 0"):
        Preprocessing(0)
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing(32, mean=(0.5,), std=(0.2, 0.2, 0.2))


def test_preprocessing_inputs_are_the_crop_normalised_on_the_device():
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    prep = Preprocessing(32, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1), crop_pct=0.875)
    x = prep.inputs([image, image[::-1]])
    assert isinstance(x, jax.Array) and x.dtype == jnp.float32 and x.shape == (2, 32, 32, 3)
    crop = eval_transform(image, 32, crop_pct=0.875)
    want = (crop / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.25, 0.2, 0.1])
    np.testing.assert_allclose(x[0], want, atol=1e-5)
    np.testing.assert_array_equal(prep.crop([image]), crop[None])


def test_predict_is_the_model_on_the_exported_preprocessing(tmp_path):
    model = deit.create_model("deit_test_distilled_patch4_32")
    variables = {"params": deit.init_params(model, 0)}
    prep = Preprocessing(32, (0.5,) * 3, (0.25,) * 3, crop_pct=1.0, interpolation="bilinear")
    classes = [f"c{i}" for i in range(10)]
    export.save_model(tmp_path / "m", model, variables, classes=classes, **prep.to_config())
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    top = evaluate.predict(tmp_path / "m", paths, top=3)
    probs = np.asarray(jax.nn.softmax(model.apply(variables, prep.inputs(images)).logits))
    for row, p in zip(top, probs, strict=True):
        assert [name for name, _ in row] == [classes[j] for j in np.argsort(-p)[:3]]
        np.testing.assert_allclose([q for _, q in row], np.sort(p)[::-1][:3], rtol=1e-5)


def test_predict_features_saves_pre_logits_of_a_folder_in_order(tmp_path, capsys):
    """Three images in a folder (one in a subfolder), batches of two (the last one padded): the
    rows are `features.pre_logits` of the exported preprocessing's inputs, in the order written
    beside them, and the bar counts the images."""
    from deit.features import pre_logits

    model = deit.create_model("deit_test_distilled_patch4_32")
    variables = {"params": deit.init_params(model, 0)}
    prep = Preprocessing(32, (0.5,) * 3, (0.25,) * 3, crop_pct=1.0, interpolation="bilinear")
    export.save_model(tmp_path / "m", model, variables, **prep.to_config())
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(3)]
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "b.png", folder / "sub" / "c.png"]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "feats" / "f.npy"
    got = evaluate.predict_features(tmp_path / "m", [folder], out, batch_size=2, progress="bars")
    want = pre_logits(model, variables, prep.inputs(images))
    assert got.shape == (3, model.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    assert out.with_suffix(".txt").read_text().split() == [str(p) for p in paths]
    assert "3/3" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^--features f.bin; expected a file name ending in"):
        evaluate.predict_features(tmp_path / "m", [folder], "f.bin")
    with pytest.raises(ValueError, match=r"holds no images; expected files ending in .jpg"):
        evaluate.predict_features(tmp_path / "m", [folder / "sub" / ".." / ".." / "feats"], out)


def test_preprocessing_normalises_exactly_as_training_does():
    """`Preprocessing.normalize` writes out `augment.normalize` (the registry cannot import it):
    the same float32 values, so evaluation sees what training's validation saw."""
    from deit.augment import normalize

    batch = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    prep = Preprocessing(8, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    want = normalize(jnp.asarray(batch), prep.mean, prep.std)  # as the step gets it: on device
    np.testing.assert_array_equal(prep.normalize(batch), want)
