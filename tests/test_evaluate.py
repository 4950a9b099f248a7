import jax.numpy as jnp
import numpy as np
import pytest

from deit import evaluate


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
