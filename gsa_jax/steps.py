"""The train state, its shardings, and the jitted train / eval steps.

    state = TrainState(step, params, opt_state, rng)       params: f32 master copy
    train step: grads of Σ_tokens loss over the batch (optionally in micro-batches, summed),
                divided by the token count; clip + AdamW update.     batch: dict of [B, T]
    eval step:  (Σ CE, token count) of a batch

Both are `jax.jit`-ed with explicit in/out shardings over the mesh (see `gsa_jax.sharding`); the
model is traced under the mesh and the logical rules, so its activation constraints apply.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gsa_jax import sharding as shd
from gsa_jax.optim import LossSums, loss_sums

BATCH_KEYS = ("tokens", "targets", "segment_ids", "mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32, optimizer steps done
    params: Any            # the model's "params" collection (unboxed)
    opt_state: Any
    rng: jax.Array         # [2] uint32 raw key data, for stochastic layers (none yet)


class StateLayout(NamedTuple):
    abstract: TrainState   # jax.ShapeDtypeStruct leaves with their shardings
    shardings: TrainState  # NamedSharding leaves


def _init_tokens() -> jax.Array:
    # Parameter shapes do not depend on the length: initialise on the cheapest input.
    return jnp.zeros((1, 1), jnp.int32)


def state_layout(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
    """Shapes and shardings of the train state (nothing is allocated)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), _init_tokens())["params"]
    param_sh = shd.logical_shardings(boxed, mesh)
    params = nn.meta.unbox(boxed)
    opt_abstract = jax.eval_shape(tx.init, params)
    rep = shd.replicated(mesh)
    # The optimizer's moment trees mirror the parameters: shard them the same way (that is FSDP
    # for the optimizer state); scalars such as the step count are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                                   transform_non_params=lambda _: rep)
    shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_abstract, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return StateLayout(abstract, shardings)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
               layout: StateLayout, mesh: Mesh) -> TrainState:
    """A fresh state, created directly in its sharded layout (no full copy on one device)."""
    def init(key):
        k_params, k_state = jax.random.split(key)
        params = nn.meta.unbox(model.init(k_params, _init_tokens())["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=jax.random.key_data(k_state))
    with shd.sharding_context(mesh):
        return jax.jit(init, out_shardings=layout.shardings)(jax.random.key(seed))


def batch_shardings(mesh: Mesh) -> dict:
    return {k: shd.batch_sharding(mesh) for k in BATCH_KEYS}


def device_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (NumPy [B, T], the same global batch on every process) -> global jax.Arrays.

    Each process fills only the rows its own devices hold.
    """
    out = {}
    for key in BATCH_KEYS:
        value = np.ascontiguousarray(batch[key])
        out[key] = jax.make_array_from_callback(value.shape, shd.batch_sharding(mesh, value.ndim),
                                                lambda index, v=value: v[index])
    return out


def _split_micro(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [A, B/A, ...], micro-batch k = rows k, k+A, k+2A, ...

    Strided, so each device's contiguous block of rows holds B/(A·devices) rows of every
    micro-batch: the split needs no communication."""
    B = x.shape[0]
    y = x.reshape(B // count, count, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(y, P(None, shd.BATCH_AXES, *([None] * (x.ndim - 1))))


def _model_loss(model: nn.Module, z_loss: float):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
        sums = loss_sums(logits, batch["targets"], batch["mask"], z_loss)
        return sums.total, sums
    return loss_fn


def _global_norm(tree) -> jax.Array:
    # Written out: optax renamed global_norm (tree.norm) between the versions we support.
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    layout: StateLayout, mesh: Mesh, *, grad_accum: int = 1,
                    z_loss: float = 0.0) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics). The input state is donated (updated in place).
    step.lower(state, batch): the lowered step (for compile-time and HLO inspection).

    The loss is the mean over the batch's tokens (mask-weighted), the same whether the batch
    runs at once or as `grad_accum` micro-batches (sums of losses and gradients, then one
    division by the total token count).
    """
    grad_fn = jax.grad(_model_loss(model, z_loss), has_aux=True)
    param_sh = layout.shardings.params

    def step(state: TrainState, batch: dict):
        if grad_accum == 1:
            grads, sums = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)

            def body(acc, mb):
                g, s = grad_fn(state.params, mb)
                g = jax.lax.with_sharding_constraint(g, param_sh)
                return jax.tree.map(jnp.add, acc, (g, s)), None

            zero = (jax.tree.map(jnp.zeros_like, state.params),
                    LossSums(*(jnp.zeros((), jnp.float32) for _ in LossSums._fields)))
            (grads, sums), _ = jax.lax.scan(body, zero, micro)
        count = jnp.maximum(sums.count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": sums.ce / count, "z_loss": sums.z / count,
                   "grad_norm": _global_norm(grads), "lr": schedule(state.step),
                   "tokens": sums.count}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    rep = shd.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(layout.shardings, batch_shardings(mesh)),
                     out_shardings=(layout.shardings, rep), donate_argnums=(0,))

    def run(state: TrainState, batch: dict):
        with shd.sharding_context(mesh):
            return jitted(state, batch)

    def lower(state, batch):
        """The jitted step lowered for these (abstract or concrete) arguments, traced under the
        mesh like `run`: `.as_text()` is its StableHLO, `.compile()` the partitioned program."""
        with shd.sharding_context(mesh):
            return jitted.lower(state, batch)
    run.lower = lower
    return run


def make_eval_step(model: nn.Module, layout: StateLayout, mesh: Mesh
                   ) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """step(params, batch) -> (Σ CE over the batch's tokens, token count), float32 scalars."""
    def step(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
        sums = loss_sums(logits, batch["targets"], batch["mask"])
        return sums.ce, sums.count

    rep = shd.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(layout.shardings.params, batch_shardings(mesh)),
                     out_shardings=(rep, rep))

    def run(params, batch):
        with shd.sharding_context(mesh):
            return jitted(params, batch)
    return run


def unreplicated_state(state: TrainState) -> TrainState:
    """The state as host NumPy arrays (gathers sharded arrays; single-process use)."""
    return jax.tree.map(np.asarray, state)


def named(tree: Any) -> dict[str, Any]:
    """{'path': leaf} of a pytree (for comparisons and messages)."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
