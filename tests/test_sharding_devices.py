"""Sharded training on 8 simulated CPU devices against the single-device computation.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts: `test_sharding.py`
runs this file in a subprocess with it set; collected in a normal (1-device) session, it skips.

Gradients are compared through an optimizer that stores them in its state; AdamW runs are
compared on their loss curves, since Adam's first update g/(|g| + eps) amplifies rounding
differences of near-zero gradients into visible parameter differences.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.checkpoint import CheckpointConfig, Checkpointer
from gsa_jax.data import PackedBatches
from gsa_jax.models import CausalLM, get_preset
from gsa_jax.optim import OptimConfig, make_optimizer

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 devices (run through tests/test_sharding.py)")

# A GSA layer and a softmax-attention layer: heads, kv heads, MLP and vocabulary all shard.
CONFIG = get_preset("gsa-hybrid-tiny", vocab_size=264, num_layers=2, attn_layers=[1])
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (2, 1, 4), "3d": (2, 2, 2)}
B, T = 16, 32


class _Grads(NamedTuple):
    grads: Any


def grad_recorder() -> optax.GradientTransformation:
    """An "optimizer" that leaves the parameters alone and keeps the step's gradient in its
    state: the gradient read back exactly, with no subtraction of nearly equal numbers."""
    return optax.GradientTransformation(
        lambda params: _Grads(jax.tree.map(jnp.zeros_like, params)),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), _Grads(grads)))


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 256, 20000).astype(np.uint16)
    stream[rng.random(stream.size) < 0.03] = 256
    loader = PackedBatches(stream, batch_size=B, seq_len=T, seed=seed, bos_id=256)
    return [next(loader) for _ in range(n)]


def mesh_of(shape):
    if shape == (1, 1, 1):
        return shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
    return shd.make_mesh(shd.MeshConfig(*shape))


def run(shape, tx, schedule, n_steps, grad_accum=1):
    """(initial params, final state, losses) of n_steps on the mesh `shape`."""
    model = CausalLM(CONFIG)
    mesh = mesh_of(shape)
    layout = steps.state_layout(model, tx, mesh)
    state = steps.init_state(model, tx, 0, layout, mesh)
    init = jax.tree.map(np.asarray, state.params)
    step = steps.make_train_step(model, tx, schedule, layout, mesh, grad_accum=grad_accum)
    losses = []
    for batch in batches(n_steps):
        state, metrics = step(state, steps.device_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return init, state, losses


@pytest.fixture(scope="module")
def grad_reference():
    return run((1, 1, 1), grad_recorder(), lambda s: 1.0, 1)


@pytest.fixture(scope="module")
def adamw_reference():
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=1), 10)
    return run((1, 1, 1), tx, schedule, 3)


def assert_trees_close(a, b, rtol, what):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        scale = float(np.abs(y).max()) + 1e-12
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_gradient_equals_single_device(name, grad_reference):
    init_ref, state_ref, loss_ref = grad_reference
    init, state, losses = run(MESHES[name], grad_recorder(), lambda s: 1.0, 1)
    # Initialisation does not depend on the layout (partitionable threefry).
    assert_trees_close(init, init_ref, 1e-7, "init")
    assert losses[0] == pytest.approx(loss_ref[0], rel=1e-5)
    assert_trees_close(state.opt_state.grads, state_ref.opt_state.grads, 1e-4, f"{name} grad")
    # The recorded gradient is laid out like the parameters (sharded on this mesh).
    for g, p in zip(jax.tree.leaves(state.opt_state.grads), jax.tree.leaves(state.params)):
        assert g.sharding == p.sharding


def test_sharded_accumulation_equals_single_device_large_batch(grad_reference):
    init_ref, state_ref, loss_ref = grad_reference
    init, state, losses = run((2, 4, 1), grad_recorder(), lambda s: 1.0, 1, grad_accum=2)
    assert losses[0] == pytest.approx(loss_ref[0], rel=1e-5)
    assert_trees_close(state.opt_state.grads, state_ref.opt_state.grads, 1e-4, "accum grad")


@pytest.mark.parametrize("name", ["fsdp"])
def test_adamw_loss_curve_equals_single_device(name, adamw_reference):
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=1), 10)
    _, state, losses = run(MESHES[name], tx, schedule, 3)
    np.testing.assert_allclose(losses, adamw_reference[2], rtol=1e-5)
    # FSDP: parameters and both Adam moments are split over the devices, not replicated.
    mesh_shape = MESHES[name]
    q = state.params["layer_0"]["mixer"]["q_proj"]["kernel"]
    adam = state.opt_state[1][0]
    for array in (q, adam.mu["layer_0"]["mixer"]["q_proj"]["kernel"],
                  adam.nu["layer_0"]["mixer"]["q_proj"]["kernel"]):
        assert array.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        shard = array.addressable_shards[0].data.shape
        assert shard == (q.shape[0] // mesh_shape[1], q.shape[1] // mesh_shape[2])


def test_checkpoint_restores_into_another_mesh(tmp_path):
    """Saved from a data-parallel mesh, restored into FSDP x tensor: same values."""
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=1), 10)
    _, state, _ = run((8, 1, 1), tx, schedule, 1)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False))
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    mesh = mesh_of((1, 2, 4))
    layout = steps.state_layout(CausalLM(CONFIG), tx, mesh)
    restored, meta = ckpt.restore(layout.abstract)
    assert meta == {"step": 1} and int(restored.step) == 1
    assert_trees_close(restored, state, 0.0, "restored")
    q = restored.params["layer_0"]["mixer"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_mesh_must_divide_the_devices():
    assert shd.MeshConfig(-1, 2, 2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        shd.make_mesh(shd.MeshConfig(-1, 3, 1))
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        shd.make_mesh(shd.MeshConfig(2, 2, 1))


def test_indivisible_dimensions_are_replicated():
    """A vocabulary of 257 rows cannot split over tensor=8: that dimension is replicated (jit
    would reject the sharding), the others keep theirs."""
    mesh = mesh_of((1, 1, 8))
    cfg = get_preset("gsa-tiny", vocab_size=257)        # 257 rows: prime
    tx, _ = make_optimizer(OptimConfig(), 10)
    layout = steps.state_layout(CausalLM(cfg), tx, mesh)
    emb = layout.shardings.params["embed"]["embedding"]
    assert emb.spec == jax.sharding.PartitionSpec(None, "fsdp")   # vocab 257 not split
    head = layout.shardings.params["lm_head"]["kernel"]
    assert head.spec == jax.sharding.PartitionSpec("fsdp", None)
    # gsa-tiny scans its layers: the stacked [L] axis ("layers") is never split.
    up = layout.shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # width 256 over 8
