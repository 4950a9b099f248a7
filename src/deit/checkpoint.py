"""Train-state checkpoints with Orbax: atomic (written to a temporary folder, then renamed),
asynchronous (the loop goes on while a save is written; the next save and `wait` wait for it),
keep-last-N, each with a manifest of checksums, restored onto whatever devices and shardings the
resuming run has.

A checkpoint is *usable* when Orbax's metadata reads and every file matches the manifest
(`MANIFEST`: size and SHA-256 of every file, written into the temporary folder once Orbax has
finished writing it, so it is renamed together with the rest). Orbax checks nothing of the
sort: a file truncated or changed afterwards is otherwise found only by a confusing restore
error, or not at all. `usable_step` goes back from the newest to the first usable one.

The data pipeline has no state of its own to save: batches derive from `(seed, epoch, position)`,
so the step number in the train state is the iterator position (see `data.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deit import diskspace, runlock
from deit.errors import InputError

log = logging.getLogger("deit")

MANIFEST = "deit_manifest.json"
# Test-only: seconds every checkpoint write sleeps in Orbax's background thread, as on a slow
# network filesystem (tests/test_resume.py checks the loop does not wait for it).
SLOW_WRITE_ENV = "DEIT_TEST_SLOW_CHECKPOINT_S"
# Rewritten by Orbax when it renames the folder (the commit time), after the manifest: only
# checked to parse.
STEP_METADATA = "_CHECKPOINT_METADATA"
CORRUPT = "checkpoints-corrupt"  # beside checkpoints/: unusable newer ones, kept for a look


def state_bytes(state: Any) -> int:
    """Bytes of every array of `state` (global shapes), what one checkpoint of it takes at most
    (before Orbax's compression)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def least_free(path: Path) -> int:
    """Free bytes where `path` is written, the least any process sees (they write shards of
    one checkpoint each, and all must stop together when one has no room)."""
    free = diskspace.free_bytes(path)
    if jax.process_count() == 1:
        return free
    # In whole MiB: JAX's collectives carry int32 (x64 off), which bytes overflow past 2 GiB.
    mib = np.int32(min(free >> 20, np.iinfo(np.int32).max))
    return int(np.min(multihost_utils.process_allgather(mib))) << 20


class Checkpoints:
    """`OUTPUT/checkpoints/<step>/{state,meta,deit_manifest.json}`; every process calls `save`
    (a collective)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        self.directory = Path(directory).absolute()  # Orbax requires absolute paths
        self._writing: int | None = None  # the step whose save is in flight
        self._needed = 0
        self._failed = False  # a save failed and was reported: `close` does not raise it again
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._written),
            ),
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
        """Start writing `state` at `step` (returns once it is copied to the host); `wait`: also
        until it is on disk. A full disk is `NoSpaceError`, before the write when the free space
        is short already, and at the next save or `wait` when the write itself ran out."""
        self.wait()  # the previous save first: its errors are its own
        self._needed = state_bytes(state)
        diskspace.check(self.directory / str(step), self._needed, least_free(self.directory))
        self._writing = step
        self._guard(
            lambda: self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        )
        if wait:
            self.wait()

    def _guard(self, call: Any) -> None:
        """`call()`, with a write that ran out of space (in Orbax's background thread, reported
        now) as `NoSpaceError`, and its temporary folder removed to give the space back."""
        try:
            call()
        except Exception as err:
            if not diskspace.is_no_space(err):
                raise
            self._failed = True
            step, self._writing = self._writing, None
            if jax.process_index() == 0:
                for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise diskspace.no_space(self.directory / str(step), self._needed) from None

    def _written(self) -> None:
        """Orbax's post-finalization callback (its background thread, every process): all
        processes have written the step; its folder is not renamed yet."""
        delay = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        if jax.process_index() != 0 or self._writing is None:
            return
        step = self._writing
        folders = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        write_manifest(folders[-1] if folders else self.directory / str(step))

    def usable_step(self) -> int | None:
        """The newest checkpoint that is complete and intact, after one line for each newer one
        that is not (those are moved to `checkpoints-corrupt/`, so that the resumed run can
        write its steps again); None when there are none. InputError when there are
        checkpoints but none is usable, naming each with what is wrong."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        chosen, problems = -1, []
        if jax.process_index() == 0:  # one verdict, shared: every process restores one step
            for step in steps:
                problem = self.problem(step)
                if problem is None:
                    chosen = step
                    break
                problems.append((step, problem))
            for step, problem in problems if chosen >= 0 else []:
                log.warning(
                    f"checkpoint {self.directory / str(step)} is unusable ({problem}); "
                    f"resuming from the previous complete one, step {chosen}"
                )
                aside = self.directory.parent / CORRUPT / str(step)
                aside.parent.mkdir(exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(self.directory / str(step), aside)
        if jax.process_count() > 1:
            chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        if chosen < 0:
            tried = "; ".join(f"{self.directory / str(s)}: {p}" for s, p in problems)
            raise InputError(
                f"no usable checkpoint to resume from (tried {tried or self.directory}); "
                "nothing was changed: restore a good checkpoint there, or choose another "
                "output folder"
            )
        if chosen != steps[0]:
            self.manager.reload()  # the moved folders are no longer steps
        return chosen

    def problem(self, step: int) -> str | None:
        """What makes the checkpoint at `step` unusable (None: nothing)."""
        problem = manifest_problem(self.directory / str(step))  # the more precise message
        if problem is not None:
            return problem
        try:
            _shapes(self.manager.item_metadata(step)["state"].tree)
        except Exception as err:  # any failure to read Orbax's own metadata
            return f"Orbax cannot read its metadata: {str(err).splitlines()[0][:200]}"
        return None

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
        """Until the save in flight is on disk (`NoSpaceError` if it ran out of space)."""
        self._guard(self.manager.wait_until_finished)
        self._writing = None

    def close(self) -> None:
        """Wait for the save in flight, then release Orbax's threads. A failed save already
        reported (`NoSpaceError`) is not raised again: Orbax keeps its error and would."""
        if self._failed:
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        self.wait()
        self.manager.close()


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """`MANIFEST` in `folder`: size and SHA-256 of every other file in it."""
    skip = {MANIFEST, STEP_METADATA}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    entries = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _digest(p)} for p in files
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": entries}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def manifest_problem(folder: Path) -> str | None:
    """What in `folder` differs from its manifest (None: nothing)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save never finished"
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is damaged"
    if (folder / STEP_METADATA).exists():
        try:
            json.loads((folder / STEP_METADATA).read_text())
        except ValueError:
            return f"{STEP_METADATA} is damaged"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written"
        if _digest(path) != entry["sha256"]:
            return f"{name} differs from what was written (checksum)"
    return None


def layout_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """`None` when two `{path: shape}` maps agree; otherwise one line naming missing,
    unexpected and wrongly shaped arrays (the first few of each)."""
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    common = sorted(set(saved) & set(wanted))
    wrong = [f"{k} {saved[k]} != {wanted[k]}" for k in common if saved[k] != wanted[k]]
    if not (missing or unexpected or wrong):
        return None

    def show(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

    return f"missing [{show(missing)}], unexpected [{show(unexpected)}], shapes [{show(wrong)}]"


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


# ----------------------------------------------------------------------------- resume inspection

# `export.CONFIG`, written out: export imports this module (`layout_mismatch`), so this one
# cannot import it; a run's `final/` (or its teacher's) holds it once the run has finished.
_EXPORTED = "config.json"


def finished_steps(folder: Path) -> list[int]:
    """Finished Orbax checkpoints in `folder` (a step folder is renamed to its bare number only
    once it is complete)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def saved_progress(output: str | Path) -> str | None:
    """What `deit train --resume --output OUTPUT` would continue from, in words, or None when
    nothing there can be resumed (no checkpoint of the student or the teacher, no finished
    teacher or run)."""
    out = Path(output).absolute()
    if (out / "final" / _EXPORTED).is_file():
        return f"a finished run ({out / 'final'})"
    if steps := finished_steps(out / "checkpoints"):
        return f"the student's checkpoint at step {steps[-1]}"
    if (out / "teacher" / "final" / _EXPORTED).is_file():
        return "the trained teacher (the student starts)"
    if steps := finished_steps(out / "teacher" / "checkpoints"):
        return f"the teacher's checkpoint at step {steps[-1]}"
    return None


def check_resumable(output: str | Path) -> str:
    """`saved_progress`, or an InputError naming the folder and what it holds: a resume never
    silently starts a fresh run (a mistyped output folder would go unnoticed)."""
    out = Path(output).absolute()
    found = saved_progress(out)
    if found is not None:
        return found
    if not out.is_dir():
        held = "it does not exist"
    else:
        names = sorted(
            p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != runlock.LOCK
        )
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        held = f"it holds {shown}" if names else "it is empty"
    raise InputError(
        f"nothing to resume in {out}: no checkpoint of a run ({held}); expected the output "
        "folder of a stopped run, or start a new run without resume"
    )
