"""Gradients in float64: the vjp of every form equals the recurrent form's, with respect to every
input and both initial states, for random cotangents on the output and on the final state; the
recurrent form's own gradient is checked against finite differences."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from gsa_jax.ops import gated_linear_attention, gated_slot_attention
from ops_util import SLOT_ACTIVATIONS, assert_close, gla_inputs, gsa_inputs

pytestmark = pytest.mark.usefixtures("x64")

TOL = dict(rtol=1e-9, atol=1e-9)
GSA_ARGS = ("q", "k", "v", "s", "g", "Hk0", "Hv0")


@functools.lru_cache(maxsize=None)
def _gsa_vjp(impl, chunk_size, slot_activation):
    """jit of (inputs, cotangents[, segment_ids]) -> gradients w.r.t. q, k, v, s, g, Hk0, Hv0."""
    def run(q, k, v, s, g, hk0, hv0, segment_ids):
        return gated_slot_attention(
            q, k, v, s, g, initial_state=(hk0, hv0), return_final_state=True,
            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size,
            slot_activation=slot_activation)

    def grads(args, cotangents, segment_ids):
        _, vjp = jax.vjp(lambda *a: run(*a, segment_ids), *args)
        return vjp(cotangents)

    return jax.jit(grads)


def _gsa_grads(impl, x, cotangents, segment_ids=None, chunk_size=8, slot_activation="softmax"):
    fn = _gsa_vjp(impl, chunk_size, slot_activation)
    return fn(tuple(x), cotangents, segment_ids)


def _cotangents(seed, x):
    """Random cotangents on o [B, T, H, V] and on the final state (Hk, Hv)."""
    rng = np.random.default_rng(seed)
    B, T, H, _ = x.q.shape
    V = x.v.shape[-1]
    return (rng.standard_normal((B, T, H, V)),
            (rng.standard_normal(x.hk0.shape), rng.standard_normal(x.hv0.shape)))


def _assert_grads_close(grads, grads_ref, names):
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert np.all(np.isfinite(g)), name
        assert np.abs(g_ref).max() > 0, f"reference gradient of {name} is zero: test is vacuous"
        assert_close(g, g_ref, **TOL, what=f"d/d{name}")


# name: (B, T, H, Hkv, K, V, M, chunk size, segment_ids or None)
CASES = {
    "gqa_ragged_C8": (2, 23, 4, 2, 3, 4, 5, 8, None),
    "chunk7": (1, 23, 2, 1, 4, 3, 6, 7, None),
    "segments": (2, 24, 2, 1, 3, 4, 5, 8,
                 np.repeat(np.array([[0, 1, 2, 3], [4, 4, 5, 6]]), [7, 1, 9, 7], axis=1)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["parallel", "chunk"])
def test_gsa_vjp_matches_recurrent(impl, case):
    B, T, H, Hkv, K, V, M, C, segment_ids = CASES[case]
    x = gsa_inputs(20, B, T, H, Hkv, K, V, M)
    ct = _cotangents(21, x)
    grads = _gsa_grads(impl, x, ct, segment_ids, chunk_size=C)
    grads_ref = _gsa_grads("recurrent", x, ct, segment_ids, chunk_size=C)
    _assert_grads_close(grads, grads_ref, GSA_ARGS)


@pytest.mark.parametrize("with_segments", [False, True])
def test_chunk_vjp_across_sub_chunks(with_segments):
    """Chunk size 32 = two sub-chunks of 16, so pairs in different sub-chunks go through the
    reference-point factorisation; T = 45 leaves a padded last chunk; segments cut inside a
    sub-chunk (5), inside the next one with a segment spanning the sub-chunk boundary 16 (25),
    and on a chunk boundary (32)."""
    x = gsa_inputs(28, B=1, T=45, H=2, Hkv=1, K=3, V=4, M=5)
    ct = _cotangents(29, x)
    segment_ids = (np.repeat(np.array([[0, 1, 2, 3]]), [5, 20, 7, 13], axis=1)
                   if with_segments else None)
    grads = _gsa_grads("chunk", x, ct, segment_ids, chunk_size=32)
    grads_ref = _gsa_grads("recurrent", x, ct, segment_ids, chunk_size=32)
    _assert_grads_close(grads, grads_ref, GSA_ARGS)


@pytest.mark.parametrize("slot_activation", SLOT_ACTIVATIONS)
def test_gsa_vjp_slot_activations(slot_activation):
    x = gsa_inputs(22, B=1, T=19, H=2, Hkv=1, K=3, V=2, M=4)
    ct = _cotangents(23, x)
    grads = _gsa_grads("chunk", x, ct, slot_activation=slot_activation)
    grads_ref = _gsa_grads("recurrent", x, ct, slot_activation=slot_activation)
    _assert_grads_close(grads, grads_ref, GSA_ARGS)


@pytest.mark.parametrize("gate_axis", ["key", "value"])
@pytest.mark.parametrize("impl", ["parallel", "chunk"])
def test_gla_vjp_matches_recurrent(impl, gate_axis):
    """Grouped heads, initial state, segments; chunk size 32 (two sub-chunks), T = 45."""
    q, k, v, g, S0 = gla_inputs(24, B=2, T=45, H=4, Hkv=2, K=3, V=5, gate_axis=gate_axis)
    segment_ids = np.repeat(np.array([[0, 1, 2], [3, 3, 4]]), [9, 14, 22], axis=1)
    rng = np.random.default_rng(25)
    ct = (rng.standard_normal((2, 45, 4, 5)), rng.standard_normal(S0.shape))

    def grads(form):
        def run(*args):
            return gated_linear_attention(*args[:4], gate_axis=gate_axis, initial_state=args[4],
                                          return_final_state=True, segment_ids=segment_ids,
                                          impl=form, chunk_size=32)
        return jax.jit(lambda args: jax.vjp(run, *args)[1](ct))((q, k, v, g, S0))

    _assert_grads_close(grads(impl), grads("recurrent"), ("q", "k", "v", "g", "S0"))


@pytest.mark.parametrize("with_segments", [False, True])
def test_recurrent_gradient_finite_differences(with_segments):
    """The reference gradient itself: central differences of the recurrent form (float64),
    through grouped heads, both initial states and a segment reset."""
    x = gsa_inputs(26, B=1, T=5, H=2, Hkv=1, K=2, V=2, M=3)
    segment_ids = np.array([[0, 0, 1, 1, 1]]) if with_segments else None

    @jax.jit
    def f(q, k, v, s, g, hk0, hv0):
        o, (hk, hv) = gated_slot_attention(
            q, k, v, s, g, initial_state=(hk0, hv0), return_final_state=True,
            segment_ids=segment_ids, impl="recurrent")
        # A scalar that weighs the output and both final states (fixed random weights).
        return (o * weights[0]).sum() + (hk * weights[1]).sum() + (hv * weights[2]).sum()

    rng = np.random.default_rng(27)
    weights = (rng.standard_normal((1, 5, 2, 2)), rng.standard_normal(x.hk0.shape),
               rng.standard_normal(x.hv0.shape))
    check_grads(f, tuple(x), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def _has_checkpoint(jaxpr) -> bool:
    """Whether a jaxpr holds a rematerialisation ("remat2" in jax 0.10, "checkpoint" later)."""
    return any(e.primitive.name in ("remat2", "checkpoint", "remat") for e in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_recompute_states_same_vjp_with_a_checkpoint(impl):
    """recompute_states=True keeps only the inputs for the backward (a checkpoint around both
    passes) and gives the same gradients of every input and both states."""
    B, T, H, Hkv, K, V, M, C, segment_ids = CASES["segments"]
    x = gsa_inputs(30, B, T, H, Hkv, K, V, M)
    ct = _cotangents(31, x)

    def vjp(recompute):
        def run(*args):
            return gated_slot_attention(
                *args[:5], initial_state=args[5:], return_final_state=True,
                segment_ids=segment_ids, impl=impl, chunk_size=C, recompute_states=recompute)
        return lambda *args: jax.vjp(run, *args)[1](ct)

    assert _has_checkpoint(jax.make_jaxpr(vjp(True))(*x))
    assert not _has_checkpoint(jax.make_jaxpr(vjp(False))(*x))
    _assert_grads_close(jax.jit(vjp(True))(*x), jax.jit(vjp(False))(*x), GSA_ARGS)
