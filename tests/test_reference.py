"""The NumPy references themselves, and every form, against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ops_util import FORMS, assert_close, gsa_fn, gsa_inputs, step_fn
from reference import gla_reference, gsa_reference


def _hand_case():
    """B = H = K = V = 1, M = 2 slots, T = 2, scale = 1, gates exp g = (1/2, 1/4) at both steps.

    q = (1, 2), k = (1, −1), v = (3, 4), s_1 = (1, 1), s_2 = (0, 1).

    t = 1 (zero state):  Hk_1 = k_1 s_1ᵀ = [1, 1];           z_1 = q_1 Hk_1 = (1, 1)
                         p_1 = (1/2, 1/2);  Hv_1 = s_1 v_1 = (3, 3)ᵀ;  o_1 = 3
    t = 2:               Hk_2 = [1·1/2, 1·1/4] + (−1)(0, 1) = [1/2, −3/4]
                         z_2 = 2 · (1/2, −3/4) = (1, −3/2);  p_2 = softmax(z_2)
                         Hv_2 = (3/2, 3/4)ᵀ + (0, 1)ᵀ · 4 = (3/2, 19/4)ᵀ
                         o_2 = 3/2 · p_2[0] + 19/4 · p_2[1]
                         with p_2[1] = e^{−5/2} / (1 + e^{−5/2})
    """
    shape = (1, 2, 1, 1)
    q = np.array([1.0, 2.0]).reshape(shape)
    k = np.array([1.0, -1.0]).reshape(shape)
    v = np.array([3.0, 4.0]).reshape(shape)
    s = np.array([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    g = np.log(np.array([[0.5, 0.25], [0.5, 0.25]])).reshape(1, 2, 1, 2)
    p2_second = math.exp(-2.5) / (1.0 + math.exp(-2.5))
    o = np.array([3.0, 1.5 * (1.0 - p2_second) + 4.75 * p2_second]).reshape(1, 2, 1, 1)
    hk = np.array([0.5, -0.75]).reshape(1, 1, 1, 2)
    hv = np.array([1.5, 4.75]).reshape(1, 1, 2, 1)
    return (q, k, v, s, g), o, (hk, hv)


def test_reference_hand_computed():
    inputs, o, (hk, hv) = _hand_case()
    o_ref, (hk_ref, hv_ref) = gsa_reference(*inputs, scale=1.0)
    assert_close(o_ref, o, rtol=1e-14, atol=1e-14)
    assert_close(hk_ref, hk, rtol=1e-14, atol=1e-14)
    assert_close(hv_ref, hv, rtol=1e-14, atol=1e-14)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", FORMS)
def test_forms_hand_computed(impl):
    inputs, o, (hk, hv) = _hand_case()
    o_jax, (hk_jax, hv_jax) = gsa_fn(impl, chunk_size=1 if impl == "chunk" else 16,
                                     scale=1.0)(*inputs)
    assert o_jax.dtype == np.float64
    assert_close(o_jax, o, rtol=1e-13, atol=1e-13)
    assert_close(hk_jax, hk, rtol=1e-13, atol=1e-13)
    assert_close(hv_jax, hv, rtol=1e-13, atol=1e-13)


@pytest.mark.usefixtures("x64")
def test_step_hand_computed():
    (q, k, v, s, g), o, (hk, hv) = _hand_case()
    step = step_fn(scale=1.0)
    state = None
    for t in range(2):
        o_t, state = step(q[:, t], k[:, t], v[:, t], s[:, t], g[:, t], state)
        assert_close(o_t, o[:, t], rtol=1e-13, atol=1e-13)
    assert_close(state[0], hk, rtol=1e-13, atol=1e-13)
    assert_close(state[1], hv, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("slot_activation", ["softmax", "relu2"])
def test_reference_gsa_is_two_gla_passes(slot_activation):
    """GSA = GLA gated on its value axis (q, k, s) -> activation -> GLA gated on its key axis
    (p, s, v), with grouped heads, an initial state and segments: the two references agree."""
    x = gsa_inputs(0, B=2, T=9, H=4, Hkv=2, K=3, V=2, M=4)
    segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5, 2, 2, 2]])
    o, (hk, hv) = gsa_reference(*x[:5], initial_state=x.state, segment_ids=segment_ids,
                                slot_activation=slot_activation)
    z, hk_gla = gla_reference(x.q, x.k, x.s, x.g, gate_axis="value", initial_state=x.hk0,
                              segment_ids=segment_ids)
    p = {"softmax": lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True),
         "relu2": lambda z: np.maximum(z, 0.0) ** 2}[slot_activation](z)
    # Pass 2 per q-head: its key is s of the head's kv group; expand s and v to the q heads.
    group = x.q.shape[2] // x.k.shape[2]
    s_rep, v_rep, g_rep = (np.repeat(a, group, axis=2) for a in (x.s, x.v, x.g))
    o_gla, hv_gla = gla_reference(p, s_rep, v_rep, g_rep, gate_axis="key", scale=1.0,
                                  initial_state=np.repeat(x.hv0, group, axis=1),
                                  segment_ids=segment_ids)
    assert_close(o, o_gla, rtol=1e-12, atol=1e-12)
    assert_close(hk, hk_gla, rtol=1e-12, atol=1e-12)
    assert_close(hv, hv_gla[:, ::group], rtol=1e-12, atol=1e-12)
