"""Per-head evaluation: top-1 / top-5 / cross-entropy of the class head, the distillation head
and their average (the paper's Table 3 reports all three), over a whole validation set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HEADS = ("cls", "dist", "avg")


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the batch of top-1 hits, top-5 hits and cross-entropy, weighted by `mask`.

    `logits (B, K)` float, `labels (B,)` int, `mask (B,)` 1 for real samples, 0 for padding.
    With fewer than 5 classes top-5 is top-K.
    """
    logits = logits.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank of the true class = how many classes score strictly higher; ties count as hits.
    rank = jnp.sum(logits > true, axis=-1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return {
        "top1": jnp.sum((rank < 1) * mask),
        "top5": jnp.sum((rank < k) * mask),
        "loss": jnp.sum(nll * mask),
        "count": jnp.sum(mask),
    }


def head_sums(
    cls_logits: jax.Array, dist_logits: jax.Array | None, labels: jax.Array, mask: jax.Array
) -> dict[str, dict[str, jax.Array]]:
    """`batch_sums` for each head; a plain model has only `cls` (reported as `avg` too)."""
    if dist_logits is None:
        sums = batch_sums(cls_logits, labels, mask)
        return {"cls": sums, "avg": sums}
    return {
        "cls": batch_sums(cls_logits, labels, mask),
        "dist": batch_sums(dist_logits, labels, mask),
        "avg": batch_sums((cls_logits + dist_logits) / 2, labels, mask),
    }


def finish(totals: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Sums -> percentages for top-1/top-5 and the mean loss, per head."""
    out = {}
    for head, sums in totals.items():
        n = max(float(sums["count"]), 1.0)
        out[head] = {
            "top1": 100.0 * float(sums["top1"]) / n,
            "top5": 100.0 * float(sums["top5"]) / n,
            "loss": float(sums["loss"]) / n,
            "count": int(sums["count"]),
        }
    return out


def accumulate(totals: dict[str, dict[str, float]], sums: dict[str, dict[str, Any]]) -> None:
    """Add one batch's `head_sums` (device arrays are fetched) into `totals`, in place."""
    for head, values in jax.device_get(sums).items():
        acc = totals.setdefault(head, dict.fromkeys(values, 0.0))
        for key, value in values.items():
            acc[key] += float(np.asarray(value))


def evaluate(
    step_fn: Callable[[dict[str, jax.Array]], dict[str, dict[str, jax.Array]]],
    batches: Iterable[dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """Run `step_fn` (a jitted function of one batch returning `head_sums`) over all batches."""
    totals: dict[str, dict[str, float]] = {}
    for batch in batches:
        accumulate(totals, step_fn(batch))
    return finish(totals)
