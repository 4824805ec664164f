"""Checkpoints with orbax's `CheckpointManager`: one step directory per save holding

    state/   the train state pytree (step, params, optimizer state, RNG key data), sharded arrays
    meta/    JSON: step, the data position, the full config

Orbax writes each save into a temporary directory and renames it when complete (and, with async
saving, only after the background write finished), so a run killed at any moment, even while
saving, leaves the previous complete checkpoints intact; `latest_step()` never sees a partial one.

A complete checkpoint can still be damaged afterwards (a truncated array file, a deleted
`state/_METADATA`, a cut `meta/metadata`): `restore()` without a step then skips it with a
warning naming the file and the cause and restores the newest intact one
(`CorruptCheckpointError` when none is); a checkpoint of another model shape is a
`CheckpointShapeError`, never taken for a damaged one. A checkpoint written with the other layer
layout (scanned layers, params under "layers" stacked [L, ...], vs the list "layer_0", ...) is
converted while it is restored (gsa_jax.layer_layout), params and optimizer moments alike.

A params checkpoint (`save_params` / `restore_params`: what `gsa-jax convert` writes and
`gsa-jax train --init-from` reads) has the same layout with state = {"params": tree} at step 0
and meta {"kind": "params", "config": {"model": ...}, ...}: weights without optimizer state.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from gsa_jax import layer_layout

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged or missing files); the message names them."""


class CheckpointShapeError(ValueError):
    """A readable checkpoint saved from a model of another shape; `meta` is its meta dict."""

    def __init__(self, message: str, meta: dict):
        super().__init__(message)
        self.meta = meta


class _QuietReadOnly(logging.Filter):
    """Drops orbax's notes that a read-only manager is read-only (three lines on every eval)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or "directory is read only" in message)


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _is_closed_loop_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _from_orbax(obj: Any) -> bool:
    """A coroutine, task or traceback whose code lies in orbax (its abandoned array reads)."""
    code = getattr(obj, "cr_code", None) or getattr(getattr(obj, "get_coro", lambda: None)(),
                                                    "cr_code", None)
    if code is not None:
        return "orbax" in code.co_filename
    tb = obj
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _AbandonedReadFilter(logging.Filter):
    """asyncio's 'Task exception was never retrieved' for orbax's other reads of a checkpoint
    whose damage was already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and _from_orbax(exc.__traceback__))


def _quiet_late_read_callbacks() -> None:
    """After a failed array read, orbax's event loop is closed while tensorstore's other reads
    of that checkpoint are still in flight. As they finish (from tensorstore's threads, any time
    later) they print tracebacks: 'RuntimeError: Event loop is closed' through sys.excepthook or
    sys.unraisablehook, and their own read errors as 'Exception ignored in: <coroutine ...>' or
    asyncio's 'Task exception was never retrieved'. The damage is already reported in one line,
    so exactly these are dropped (closed-loop errors, and errors raised in orbax's coroutines);
    any other is printed."""
    if getattr(sys.excepthook, "_gsa_quiet", False):
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, value, tb):
        if not _is_closed_loop_error(value):
            excepthook(kind, value, tb)

    def quiet_unraisablehook(info):
        if not (_is_closed_loop_error(info.exc_value) or _from_orbax(info.object)
                or _from_orbax(info.exc_traceback)):
            unraisablehook(info)

    quiet_excepthook._gsa_quiet = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


def _cause(err: BaseException, limit: int = 400) -> str:
    """The first line of the innermost error of a chain (tensorstore's is the informative one),
    with its type, cut to `limit` characters."""
    while err.__cause__ is not None or (err.__context__ is not None
                                        and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def _placed(tree: Any, abstract: Any) -> Any:
    """`tree`'s arrays placed with the shardings of `abstract` (jax.ShapeDtypeStruct leaves)."""
    return jax.tree.map(lambda x, a: x if getattr(a, "sharding", None) is None
                        else jax.device_put(x, a.sharding), tree, abstract)


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
        self.skipped: list[tuple[int, str]] = []   # (step, why) skipped by the last restore()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving (asynchronously when configured); call `wait()` before exiting."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          force=True)

    def restore_meta(self, step: Optional[int] = None) -> dict:
        """The meta dict of `step` (default: latest); CorruptCheckpointError names the file
        when it cannot be read."""
        step = self._step(step)
        item = self.step_dir(step) / "meta"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # JSON, I/O or orbax errors alike: the file is unusable
            name = item / "metadata" if (item / "metadata").is_file() else item
            raise CorruptCheckpointError(f"{name}: {_cause(err)}") from err
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{item}: expected a JSON object, got "
                                         f"{type(meta).__name__}")
        return meta

    def restore(self, abstract_state: Any, step: Optional[int] = None, *,
                params_only: bool = False) -> tuple[Any, dict]:
        """(state, meta) of `step`, or without a step of the newest intact checkpoint, placed as
        `abstract_state` says.

        abstract_state: the state pytree as jax.ShapeDtypeStruct with `sharding` set.
        params_only: `abstract_state` is the params tree alone, and only the params are read
          (orbax's partial restore): the optimizer moments, twice the parameters' size, are
          neither read nor allocated. Returns (params, meta).
        Without a step, a newer checkpoint that cannot be read is skipped with a warning naming
        its file and the cause (`self.skipped` lists the steps skipped); CorruptCheckpointError
        when no checkpoint is intact, or when the `step` asked for is not. Raises
        CheckpointShapeError naming the differing arrays when the checkpoint holds another shape.
        """
        self.skipped = []
        if step is not None:
            return self._restore_step(abstract_state, self._step(step), params_only)
        candidates = sorted(self.all_steps(), reverse=True)
        if not candidates:
            self._step(None)  # raises FileNotFoundError naming the directory
        for candidate in candidates:
            try:
                return self._restore_step(abstract_state, candidate, params_only)
            except CorruptCheckpointError as err:
                log.warning("skipping checkpoint step %d: %s", candidate, err)
                self.skipped.append((candidate, str(err)))
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory}: steps {candidates} cannot be read "
            f"(newest: {self.skipped[0][1]})")

    def _restore_step(self, abstract_state: Any, step: int,
                      params_only: bool = False) -> tuple[Any, dict]:
        meta = self.restore_meta(step)
        wanted = {"params": abstract_state} if params_only else abstract_state
        # A checkpoint written with the other layer layout (scanned "layers" vs "layer_i"):
        # read it in its own layout, then convert (gsa_jax.layer_layout).
        on_disk = layer_layout.layout_of_paths(self._saved_shapes(step))
        target = layer_layout.is_scanned(wanted)
        relayout = on_disk is not None and target is not None and on_disk != target
        if relayout:
            log.info("checkpoint step %d holds the %s layer layout; converting it to the %s "
                     "one", step, *(("scanned", "unscanned") if on_disk
                                    else ("unscanned", "scanned")))
            read_as = layer_layout.to_layout(wanted, on_disk)
        else:
            read_as = wanted
        self.check_shapes(read_as, step, meta, partial=params_only)
        _quiet_late_read_callbacks()  # before the read: the callbacks can come at any time
        try:
            if params_only:
                # A PyTree reader of the state item alone: the manager's handler for it
                # (StandardCheckpointHandler) has no partial restore; the files are the same.
                with ocp.PyTreeCheckpointer() as reader:
                    restored = reader.restore(self.step_dir(step) / "state",
                                              args=ocp.args.PyTreeRestore(
                        item=read_as, partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(read_as)))
            else:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(read_as)))["state"]
        except Exception as err:  # tensorstore/orbax read errors: a damaged array file
            raise CorruptCheckpointError(f"{self.step_dir(step) / 'state'}: "
                                         f"{_cause(err)}") from err
        if relayout:
            restored = _placed(layer_layout.to_layout(restored, target), wanted)
        return (restored["params"] if params_only else restored), meta

    def _saved_shapes(self, step: int) -> dict[str, tuple]:
        """{"params/layer_0/mlp/up_proj/kernel": shape} of the arrays `step` holds, from its
        metadata; CorruptCheckpointError when that cannot be read."""
        state_dir = self.step_dir(step) / "state"
        if not (state_dir / "_METADATA").is_file():
            raise CorruptCheckpointError(f"{state_dir / '_METADATA'}: missing (the list of "
                                         f"the checkpoint's arrays)")
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as err:
            raise CorruptCheckpointError(f"{state_dir / '_METADATA'}: {_cause(err)}") from err
        if saved is None:  # orbax returns None where it cannot parse the metadata
            raise CorruptCheckpointError(f"{state_dir / '_METADATA'}: cannot be read")
        return {_path(p): tuple(getattr(x, "shape", ()))
                for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}

    def check_shapes(self, abstract_state: Any, step: int, meta: Optional[dict] = None, *,
                     partial: bool = False) -> None:
        """CheckpointShapeError when `step` holds arrays of other shapes than `abstract_state`
        (with `partial`, a subtree of the state: only its top-level keys are compared);
        CorruptCheckpointError when its array metadata cannot be read."""
        saved_shapes = self._saved_shapes(step)
        want = {_path(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        if partial:
            tops = {key.split("/")[0] for key in want}
            saved_shapes = {k: v for k, v in saved_shapes.items() if k.split("/")[0] in tops}
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
            raise CheckpointShapeError(
                f"checkpoint {self.directory} step {step} was saved from a model of another "
                f"shape ({len(problems)} arrays differ):\n  {shown}{more}\nUse the config it "
                f"was trained with (see its meta/config), or another run directory.",
                meta if meta is not None else {})

    def set_aside(self, step: int) -> pathlib.Path:
        """Renames an unreadable step directory to `<step>.corrupt` (orbax ignores the name), so
        the run can save that step again; returns the new path. Nothing is deleted."""
        src = self.step_dir(step)
        dst = src.with_name(f"{step}.corrupt")
        n = 0
        while dst.exists():
            n += 1
            dst = src.with_name(f"{step}.corrupt{n}")
        src.rename(dst)
        self.manager.reload()
        return dst

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
