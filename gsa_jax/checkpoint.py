"""Checkpoints with orbax's `CheckpointManager`: one step directory per save holding

    state/   the train state pytree (step, params, optimizer state, RNG key data), sharded arrays
    meta/    JSON: step, the data position, the full config

Orbax writes each save into a temporary directory and renames it when complete (and, with async
saving, only after the background write finished), so a run killed at any moment, even while
saving, leaves the previous complete checkpoints intact; `latest_step()` never sees a partial one.

A params checkpoint (`save_params` / `restore_params`: what `gsa-jax convert` writes and
`gsa-jax train --init-from` reads) has the same layout with state = {"params": tree} at step 0
and meta {"kind": "params", "config": {"model": ...}, ...}: weights without optimizer state.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000            # save every N optimizer steps (0: only at the end)
    keep: int = 3                # keep the last K checkpoints
    async_save: bool = True      # write in a background thread while training continues
    resume: bool = True          # continue from the latest checkpoint of the run directory
    directory: Optional[str] = None  # default: <run_dir>/checkpoints

    def __post_init__(self):
        for name in ("every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"checkpoint: {name} must be an int >= 0, got {value!r}")
        if self.keep < 1:
            raise ValueError(f"checkpoint: keep must be >= 1, got {self.keep}")


def _path(key_path) -> str:
    """'params/layer_0/mixer/q_proj/kernel': orbax's metadata tree has dicts and lists where the
    state has dataclasses and tuples, so compare paths by their names only."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


class Checkpointer:
    """Saves / restores (train state, meta dict) pairs under `directory`."""

    def __init__(self, directory: str | pathlib.Path, config: CheckpointConfig = CheckpointConfig(),
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=config.async_save,
            # Leftover temporary directories of a run killed while saving are removed.
            cleanup_tmp_directories=not read_only)
        # Handlers named up front: a fresh process (resume, eval) reads metadata before any save.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving (asynchronously when configured); call `wait()` before exiting."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          force=True)

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: latest), placed as `abstract_state` says.

        abstract_state: the state pytree as jax.ShapeDtypeStruct with `sharding` set.
        Raises ValueError naming the differing arrays when the checkpoint holds another shape.
        """
        step = self._step(step)
        self.check_shapes(abstract_state, step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def check_shapes(self, abstract_state: Any, step: int) -> None:
        saved = self.manager.item_metadata(step)["state"]
        saved_shapes = {_path(p): tuple(getattr(x, "shape", ()))
                        for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
        want = {_path(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        problems = []
        # Parameters first: they name the model difference most directly.
        for key in sorted(set(saved_shapes) | set(want),
                          key=lambda k: (not k.startswith("params/"), k)):
            if key not in saved_shapes:
                problems.append(f"{key}: missing in the checkpoint")
            elif key not in want:
                problems.append(f"{key}: in the checkpoint but not in this model")
            elif saved_shapes[key] != want[key]:
                problems.append(f"{key}: checkpoint {saved_shapes[key]} vs model {want[key]}")
        if problems:
            shown = "\n  ".join(problems[:8])
            more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise ValueError(f"checkpoint {self.directory} step {step} was saved from a model "
                             f"of another shape ({len(problems)} arrays differ):\n  {shown}{more}"
                             f"\nUse the config it was trained with (see its meta/config), or "
                             f"another run directory.")

    def _step(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        return step

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


PARAMS_KIND = "params"


def save_params(directory: str | pathlib.Path, params: Any, meta: dict) -> None:
    """Writes a params checkpoint (step 0, synchronously) into an empty `directory`.

    params: a pytree of NumPy or jax arrays; meta: JSON-ready dict (should hold
    {"config": {"model": ModelConfig.to_dict()}} for the shape-mismatch hints).
    """
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=1, async_save=False))
    try:
        if checkpointer.latest_step() is not None:
            raise ValueError(f"{checkpointer.directory} already holds a checkpoint; write the "
                             f"converted weights into a new directory")
        checkpointer.save(0, {"params": params}, {**meta, "kind": PARAMS_KIND, "step": 0})
        checkpointer.wait()
    finally:
        checkpointer.close()


def restore_params(directory: str | pathlib.Path, abstract_params: Any) -> tuple[Any, dict]:
    """(params, meta) of the params checkpoint in `directory`, placed as `abstract_params`
    (jax.ShapeDtypeStruct leaves with shardings) says.

    Raises FileNotFoundError when there is no checkpoint, ValueError when it is not a params
    checkpoint or its arrays have other shapes (naming them).
    """
    path = pathlib.Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no params checkpoint directory {str(path)!r}")
    checkpointer = Checkpointer(path, read_only=True)
    try:
        meta = checkpointer.restore_meta()
        if meta.get("kind") != PARAMS_KIND:
            raise ValueError(f"{checkpointer.directory} is not a params checkpoint (the kind "
                             f"`gsa-jax convert` writes); to start from a training run's "
                             f"weights, convert them first: gsa-jax convert --run-dir RUN "
                             f"--mixer attention --output DIR")
        state, meta = checkpointer.restore({"params": abstract_params})
    finally:
        checkpointer.close()
    return state["params"], meta
