"""Which records each batch of a run holds: the epoch order (repeated augmentation spread over
the batch) and the `Plan`, a run's batches in the order the loop takes them.

Both are functions of `(seed, epoch)` and the sizes alone, so the batches do not depend on the
worker count, a run that resumes at step `s` takes the batches an uninterrupted run would have,
and each process of a multi-host run reads its own disjoint share of the same global order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from deit.errors import InputError


def _spread(global_batch: int, repeats: int) -> np.ndarray:
    """Positions `p -> i` that move sample `i` of a batch (copies of one image adjacent) so the
    copies sit `ceil(B / repeats)` or one fewer apart."""
    cols = -(-global_batch // repeats)
    grid = np.full(cols * repeats, -1)
    grid[:global_batch] = np.arange(global_batch)
    order = grid.reshape(cols, repeats).T.ravel()
    return order[order >= 0]


def epoch_order(n: int, epoch: int, seed: int, global_batch: int, repeats: int) -> np.ndarray:
    """Record indices of one epoch as `(steps, global_batch)`, the last partial batch dropped.

    Repeated augmentation (Hoffer et al. 2020; DeiT §6): a shuffled `1/repeats` of the records,
    each `repeats` times, so an epoch still has `n` samples. Within a batch the copies of one
    image sit about `global_batch / repeats` apart, so whenever the batch is split into
    contiguous shards over `d >= repeats` devices (any `d` dividing the batch), every copy is on
    a different device, as the official sampler deals them out. With fewer devices than repeats
    (1 or 2 for the recipe's 3) a device necessarily holds two copies. The layout does not depend
    on the device count, so 1 and 8 devices train on identical batches.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order = np.repeat(rng.permutation(n), repeats)[:n]
    steps = n // global_batch
    if steps == 0:
        raise InputError(
            f"the training set has {n} samples, fewer than the global batch {global_batch}; "
            f"expected a batch of at most {n}"
        )
    order = order[: steps * global_batch].reshape(steps, global_batch)
    if repeats > 1:
        order = order[:, _spread(global_batch, repeats)]
    return order


@functools.lru_cache(maxsize=2)
def cached_order(n: int, epoch: int, seed: int, global_batch: int, repeats: int) -> np.ndarray:
    return epoch_order(n, epoch, seed, global_batch, repeats)


@dataclass(frozen=True)
class Plan:
    """The batches of a run in the order the loop takes them: per epoch `steps_per_epoch`
    training batches, then `eval_steps` validation batches (the whole set, padded)."""

    train_size: int
    val_size: int
    global_batch: int
    epochs: int = 1
    seed: int = 0
    repeats: int = 1
    process_index: int = 0
    process_count: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.global_batch

    @property
    def eval_steps(self) -> int:
        return -(-self.val_size // self.global_batch)

    @property
    def local(self) -> int:
        return self.global_batch // self.process_count

    def __len__(self) -> int:
        return self.epochs * (self.steps_per_epoch + self.eval_steps)

    def element(self, k: int) -> tuple[str, int, int]:
        """`("train", epoch, step in epoch)` or `("eval", epoch, batch)` of element `k`."""
        epoch, j = divmod(k, self.steps_per_epoch + self.eval_steps)
        if j < self.steps_per_epoch:
            return "train", epoch, j
        return "eval", epoch, j - self.steps_per_epoch

    def position(self, step: int) -> int:
        """The element of global training step `step` (the first of an epoch after its end)."""
        if self.steps_per_epoch == 0:
            return 0
        epoch, j = divmod(step, self.steps_per_epoch)
        return epoch * (self.steps_per_epoch + self.eval_steps) + j
