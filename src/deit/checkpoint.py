"""Train-state checkpoints with Orbax: atomic (written to a temporary folder, then renamed),
keep-last-N, restored onto whatever devices and shardings the resuming run has.

The data pipeline has no state of its own to save: batches derive from `(seed, epoch, position)`,
so the step number in the train state is the iterator position (see `data.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from deit.errors import InputError
from deit.export import layout_mismatch


class Checkpoints:
    """`OUTPUT/checkpoints/<step>/{state,meta}`; every process calls `save` (a collective)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        self.directory = Path(directory).absolute()  # Orbax requires absolute paths
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            # Named handlers: a fresh process (a resumed run) can then read the metadata of a
            # checkpoint before restoring it (`_check_layout`).
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, wait: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state at `step` (default latest) laid out like `abstract_state`
        (`jax.ShapeDtypeStruct`s with shardings), and its metadata."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise InputError(f"no checkpoint in {self.directory} to resume from")
        self._check_layout(step, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def _check_layout(self, step: int, abstract_state: Any) -> None:
        """ValueError naming the differing arrays when the checkpoint is of another model."""
        saved = _shapes(self.manager.item_metadata(step)["state"].tree)
        diff = layout_mismatch(saved, _shapes(abstract_state))
        if diff:
            raise InputError(
                f"the checkpoint at step {step} in {self.directory} is of another model or "
                f"config: {diff}; resume with the flags of the run that wrote it"
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """Shape, dtype and sharding of every array of `state`, for `Checkpoints.restore`."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"params/blocks_0/attn/qkv/kernel": shape}` for a state or Orbax's metadata of one."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )[0]
    out = {}
    for path, leaf in flat:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(parts)] = tuple(getattr(leaf, "shape", ()))
    return out
