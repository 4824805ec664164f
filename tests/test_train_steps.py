"""The jitted train step against an independent loss/gradient, gradient accumulation, AdamW.

An "optimizer" that stores the gradient in its state exposes the step's gradient for comparison
with `jax.grad` of a separately written masked-mean cross-entropy.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.models import CausalLM, get_preset
from gsa_jax.optim import OptimConfig, make_optimizer

V = 264


class _Grads(NamedTuple):
    grads: Any


def grad_recorder() -> optax.GradientTransformation:
    """An "optimizer" that leaves the parameters alone and keeps the step's gradient in its
    state: the gradient read back exactly, with no subtraction of nearly equal numbers."""
    return optax.GradientTransformation(
        lambda params: _Grads(jax.tree.map(jnp.zeros_like, params)),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), _Grads(grads)))


def make_batch(B=8, T=32, seed=0, partial_mask=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 257, (B, T + 1))
    tokens[rng.random((B, T + 1)) < 0.05] = 256
    inputs = tokens[:, :-1]
    mask = (rng.random((B, T)) < 0.7) if partial_mask else np.ones((B, T), bool)
    mask[0] = False                      # a padding row: uneven token counts per micro-batch
    return {"tokens": inputs.astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "segment_ids": np.cumsum(inputs == 256, axis=1).astype(np.int32),
            "mask": mask.astype(np.float32)}


def reference_grads(model, params, batch, z_loss=0.0):
    """Masked-mean CE (+ z-loss) gradient, written independently of gsa_jax.optim."""
    return _reference(model)(params, batch, z_loss)


@functools.lru_cache(maxsize=None)
def _reference(model):
    def loss(p, batch, z_loss):
        logits = model.apply({"params": p}, batch["tokens"], batch["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        log_z = jax.scipy.special.logsumexp(logits, axis=-1)
        per_token = ce + z_loss * log_z ** 2
        return jnp.sum(per_token * batch["mask"]) / jnp.sum(batch["mask"])
    return jax.jit(jax.value_and_grad(loss))  # one compilation for every test of the module


@pytest.fixture(scope="module")
def setup():
    # One GSA layer: the properties do not depend on depth, and compiling is the test's cost.
    model = CausalLM(get_preset("gsa-tiny", vocab_size=V, num_layers=1))
    mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
    return model, mesh


_CACHE: dict = {}


def step_grads(model, mesh, batch, grad_accum, z_loss=0.0):
    """(params, gradient of one step, metrics, new step), cached per (grad_accum, z_loss): the
    tests share one batch."""
    key = (grad_accum, z_loss)
    if key not in _CACHE:
        _CACHE[key] = _step_grads(model, mesh, batch, grad_accum, z_loss)
    return _CACHE[key]


def _step_grads(model, mesh, batch, grad_accum, z_loss):
    tx = grad_recorder()
    layout = steps.state_layout(model, tx, mesh)
    state = steps.init_state(model, tx, 0, layout, mesh)
    params = jax.tree.map(np.asarray, state.params)
    step = steps.make_train_step(model, tx, lambda s: 1.0, layout, mesh, grad_accum=grad_accum,
                                 z_loss=z_loss)
    new_state, metrics = step(state, steps.device_batch(batch, mesh))
    grads = jax.tree.map(np.asarray, new_state.opt_state.grads)
    return params, grads, metrics, int(new_state.step)


@pytest.mark.parametrize("grad_accum,z_loss", [(1, 0.0),
                                               pytest.param(2, 1e-3, marks=pytest.mark.slow),
                                               pytest.param(4, 0.0, marks=pytest.mark.slow)])
def test_step_gradient_matches_reference(setup, grad_accum, z_loss):
    model, mesh = setup
    batch = make_batch()
    params, grads, metrics, new_step = step_grads(model, mesh, batch, grad_accum, z_loss)
    ref_loss, ref_grads = reference_grads(model, params, batch, z_loss)
    assert new_step == 1
    assert float(metrics["tokens"]) == batch["mask"].sum()
    if z_loss == 0:
        assert float(metrics["loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
    else:   # the reported loss is the CE part; the z part is reported on its own
        total = float(metrics["loss"]) + z_loss * float(metrics["z_loss"])
        assert total == pytest.approx(float(ref_loss), rel=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(ref_grads)):
        scale = float(np.abs(r).max()) + 1e-12
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # 20-28 s on the 2-core CI machine: CI's second step
def test_accumulation_equals_the_large_batch(setup):
    """Micro-batches with uneven token counts add up to the large batch's mean, not the mean
    of micro-batch means."""
    model, mesh = setup
    batch = make_batch()
    _, g1, m1, _ = step_grads(model, mesh, batch, 1)
    _, g4, m4, _ = step_grads(model, mesh, batch, 4)
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.slow  # 20-28 s on the 2-core CI machine: CI's second step
def test_adamw_steps_match_optax_with_reference_grads(setup):
    """Two steps of the real optimizer (clip + AdamW + schedule) against optax driven by the
    reference gradients."""
    model, mesh = setup
    cfg = OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=0.5)
    tx, schedule = make_optimizer(cfg, 10)
    layout = steps.state_layout(model, tx, mesh)
    state = steps.init_state(model, tx, 0, layout, mesh)
    params = jax.tree.map(np.asarray, state.params)
    opt_state = tx.init(params)
    step = steps.make_train_step(model, tx, schedule, layout, mesh)
    for i in range(2):
        batch = make_batch(seed=20 + i, partial_mask=False)
        state, metrics = step(state, steps.device_batch(batch, mesh))
        _, grads = reference_grads(model, params, batch)
        updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        assert float(metrics["lr"]) == pytest.approx(float(schedule(i)))
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                           for g in jax.tree.leaves(grads)))
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides,shards,match", [
    (["data.batch_size=6", "optim.grad_accum=4"], 1, "not divisible by optim.grad_accum"),
    (["data.batch_size=6"], 4, "batch shards"),
    (["data.batch_size=8", "eval.batch_size=6"], 4, "eval batch size"),
    (["model.vocab_size=256"], 1, "vocab_size"),
])
def test_incompatible_settings_are_clear_errors(overrides, shards, match):
    from types import SimpleNamespace
    from gsa_jax.config import load_config
    from gsa_jax.session import check_compatible
    data = SimpleNamespace(vocab_size=257, tokenizer="bytes", max_ids={}, val=None)
    with pytest.raises(ValueError, match=match):
        check_compatible(load_config(None, overrides), data, shards)


@pytest.mark.slow  # ~11 s; test_layer_layout checks every remat policy (also in the slow tier)
def test_remat_gives_the_same_gradient(setup):
    """model.remat (recompute each block in the backward pass) changes memory, not values."""
    model, mesh = setup
    batch = make_batch()
    _, ref, _, _ = step_grads(model, mesh, batch, 1)
    remat = CausalLM(model.config.replace(remat=True))
    _, grads, _, _ = _step_grads(remat, mesh, batch, 1, 0.0)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))

    # ... and the switch really inserts rematerialisation (jax's `checkpoint`/`remat` primitive).
    def primitives(m):
        params = jax.eval_shape(m.init, jax.random.key(0), batch["tokens"][:1])
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: m.apply(p, batch["tokens"]).sum()))(params)
        return str(jaxpr)
    assert "remat" in primitives(remat) or "checkpoint" in primitives(remat)
    plain = primitives(model)
    assert "remat" not in plain and "checkpoint[" not in plain


@pytest.mark.slow  # 20-28 s on the 2-core CI machine: CI's second step
def test_bf16_compute_keeps_f32_master_params(setup):
    """dtype=bfloat16 computes in bf16; parameters, gradients and optimizer state stay f32 and
    the loss stays close to the f32 one."""
    model, mesh = setup
    batch = make_batch()
    _, _, ref_metrics, _ = step_grads(model, mesh, batch, 1)
    bf16 = CausalLM(model.config.replace(dtype="bfloat16"))
    tx, schedule = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    layout = steps.state_layout(bf16, tx, mesh)
    state = steps.init_state(bf16, tx, 0, layout, mesh)
    step = steps.make_train_step(bf16, tx, schedule, layout, mesh)
    state, metrics = step(state, steps.device_batch(batch, mesh))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state[1][0].mu)} == {jnp.dtype(jnp.float32)}
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=2e-2)
