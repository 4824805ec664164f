"""Everything a run builds from its `Config`: mesh, data, model, optimizer, state layout, jitted
steps, checkpointer; and the state itself, fresh or restored. Shared by training, standalone
evaluation and generation."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gsa_jax import checkpoint as checkpoint_lib
from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.checkpoint import Checkpointer
from gsa_jax.config import Config
from gsa_jax.data import Datasets, load_datasets
from gsa_jax.data.datasets import SPLITS
from gsa_jax.models.config import remat_policy_name
from gsa_jax.models.lm import CausalLM
from gsa_jax.optim import make_optimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Session:
    config: Config
    mesh: Mesh
    data: Datasets
    model: CausalLM
    tx: Any
    schedule: Callable
    layout: steps.StateLayout
    train_step: Callable
    eval_step: Callable
    checkpointer: Checkpointer

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return self.checkpointer.directory


def checkpoint_dir(config: Config) -> pathlib.Path:
    return pathlib.Path(config.checkpoint.directory or pathlib.Path(config.run_dir) / "checkpoints")


def check_compatible(config: Config, data: Datasets, num_batch_shards: int) -> None:
    """Clear errors for settings that cannot work together."""
    V = config.model.vocab_size
    for path, max_id in data.max_ids.items():
        if max_id >= V:
            understated = (f" (its sidecar's vocab_size {data.vocab_size} understates the "
                           f"vocabulary)" if data.vocab_size is not None
                           and data.vocab_size <= max_id else "")
            raise ValueError(f"token file {str(path)!r} holds ids up to {max_id}, but "
                             f"model.vocab_size = {V} (ids >= {V} have no embedding){understated}"
                             f"; set model.vocab_size >= {max_id + 1}")
    if data.vocab_size is not None and data.vocab_size > config.model.vocab_size:
        raise ValueError(f"model.vocab_size = {config.model.vocab_size} is smaller than the "
                         f"data's vocabulary ({data.vocab_size} ids, tokenizer "
                         f"{data.tokenizer!r}); set model.vocab_size >= {data.vocab_size}")
    T = config.data.seq_len
    if data.val is not None and len(data.val) < T + 1:
        where = f"{config.data.val_path!r}" if config.data.val_path else "of the stdlib source"
        raise ValueError(f"the validation data {where} has {len(data.val)} tokens, fewer than "
                         f"one sequence of data.seq_len + 1 = {T + 1}")
    B, A = config.data.batch_size, config.optim.grad_accum
    if B % A:
        raise ValueError(f"data.batch_size {B} is not divisible by optim.grad_accum {A}")
    if (B // A) % num_batch_shards:
        raise ValueError(f"the micro-batch (data.batch_size / optim.grad_accum = {B // A}) is "
                         f"not divisible by the {num_batch_shards} batch shards of the mesh "
                         f"(data x fsdp); change the batch size or the mesh")
    eval_b = config.eval.batch_size or B
    if eval_b % num_batch_shards:
        raise ValueError(f"the eval batch size {eval_b} is not divisible by the "
                         f"{num_batch_shards} batch shards of the mesh (data x fsdp)")


def build(config: Config, *, read_only: bool = False, devices: Optional[list] = None,
          splits: tuple[str, ...] = SPLITS) -> Session:
    """Builds the session (compiles nothing yet; the steps compile on first call).

    read_only: the checkpointer only reads (nothing is created or cleaned up; a missing
    checkpoint directory reads as one without checkpoints).
    splits: the data splits to load ("train", "validation"; the others stay None and their
    files unopened): ("validation",) for evaluation, () for generation (the tokenizer only)."""
    mesh = shd.make_mesh(config.mesh, devices)
    data = load_datasets(config.data, splits)
    check_compatible(config, data, shd.data_parallel_size(mesh))
    model = CausalLM(config.model)
    tx, schedule = make_optimizer(config.optim, config.steps)
    layout = steps.state_layout(model, tx, mesh)
    train_step = steps.make_train_step(model, tx, schedule, layout, mesh,
                                       grad_accum=config.optim.grad_accum,
                                       z_loss=config.optim.z_loss)
    eval_step = steps.make_eval_step(model, layout, mesh)
    checkpointer = Checkpointer(checkpoint_dir(config), config.checkpoint, read_only=read_only)
    return Session(config, mesh, data, model, tx, schedule, layout, train_step, eval_step,
                   checkpointer)


def open_for_writing(session: Session) -> None:
    """Replaces a read-only session's checkpointer by a writing one (which creates the
    directory and removes the temporary directories of saves cut short): for a trainer that
    holds the run directory's lock."""
    session.checkpointer.close()
    session.checkpointer = Checkpointer(session.checkpoint_dir, session.config.checkpoint)


def restore_or_init(session: Session, step: Optional[int] = None, resume: bool = True,
                    init_from: Optional[str] = None) -> tuple[steps.TrainState, Optional[dict]]:
    """(state, meta): the checkpoint's (latest, or `step`) when there is one and `resume`, else a
    fresh state and None; `init_from` (a params checkpoint) supplies a fresh state's params.

    A run that already has checkpoints resumes from them and ignores `init_from`: a preempted
    finetune continues where it stopped instead of starting over."""
    latest = session.checkpointer.latest_step()
    if not resume and latest is not None:
        # Fresh steps would interleave with the old run's checkpoints (and a later resume would
        # pick whichever step is highest): refuse rather than mix two runs.
        raise ValueError(f"checkpoint.resume is false but {session.checkpoint_dir} holds "
                         f"checkpoints (latest step {latest}); use another run_dir (or "
                         f"checkpoint.directory), or remove the old checkpoints")
    if resume and (latest is not None or step is not None):
        state, meta = _restore(session, step)
        log.info("restored step %d from %s", int(state.step), session.checkpoint_dir)
        if init_from is not None:
            log.warning("resuming %s at step %d: --init-from %s is not used",
                        session.checkpoint_dir, int(state.step), init_from)
        return state, meta
    if init_from is not None:
        return init_from_params(session, init_from), None
    return steps.init_state(session.model, session.tx, session.config.seed, session.layout,
                            session.mesh), None


def init_from_params(session: Session, directory: str) -> steps.TrainState:
    """A fresh train state (step 0, zero optimizer moments, the seed's RNG) whose params are
    those of the params checkpoint in `directory` (`gsa-jax convert` output), sharded as the
    session's layout says.

    Raises ValueError naming the differing arrays and model config fields when the checkpoint
    was written for another model.
    """
    layout = session.layout
    try:
        params, _ = checkpoint_lib.restore_params(directory, layout.abstract.params)
    except checkpoint_lib.CheckpointShapeError as err:
        raise with_model_diff(err, session.config.model.to_dict(), " (set them in the training "
                              "config's model section)") from None
    # The same RNG split as steps.init_state, so a run's RNG depends on its seed only.
    _, k_state = jax.random.split(jax.random.key(session.config.seed))
    with shd.sharding_context(session.mesh):
        opt_state = jax.jit(session.tx.init, out_shardings=layout.shardings.opt_state)(params)
    return steps.TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), layout.shardings.step),
        params=params, opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(k_state), layout.shardings.rng))


def _model_diff(saved: dict, mine: dict) -> list[str]:
    if "remat" in saved:  # true/false in configs saved before the named policies
        saved = {**saved, "remat": remat_policy_name(saved["remat"])}
    return [f"{k}: checkpoint {saved.get(k)!r} vs config {mine.get(k)!r}"
            for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]


def restore_params(session: Session, step: Optional[int] = None) -> tuple[Any, dict]:
    """(params, meta) of a checkpoint (FileNotFoundError when there is none). Only the params
    are read (orbax's partial restore): the optimizer moments are neither read nor allocated."""
    return _restore(session, step, params_only=True)


def _restore(session: Session, step: Optional[int], params_only: bool = False):
    """Checkpointer.restore, with the model config fields that differ added to a shape error."""
    abstract = session.layout.abstract
    try:
        return session.checkpointer.restore(abstract.params if params_only else abstract, step,
                                            params_only=params_only)
    except checkpoint_lib.CheckpointShapeError as err:
        raise with_model_diff(err, session.config.model.to_dict(), "") from None


def with_model_diff(err: checkpoint_lib.CheckpointShapeError, mine: dict,
                    where: str) -> ValueError:
    """The shape error with the model config fields that differ from the checkpoint's config
    appended (`where` says where to set them); the error itself when the meta has no config."""
    saved = err.meta.get("config", {}).get("model", {})
    diff = _model_diff(saved, mine) if saved else []
    if not diff:
        return err
    return ValueError(f"{err}\nModel config fields that differ{where}: " + "; ".join(diff))


def replicated_params(params: Any, mesh: Mesh) -> Any:
    """The parameters replicated on every device of the mesh (for generation)."""
    return jax.device_put(params, shd.replicated(mesh))
